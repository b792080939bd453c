"""Saved-guard size for an ImageNet-size model with many classes, part by part (no fit needed: the size is set by the layout).

A random-weight torchvision model (default ``resnet50``, 1000 classes) at 224x224: the guard chooses its layers and
sizes on one batch of 2 images exactly as ``fit`` does, allocates its state with every linear probe kept (the
largest case: ``fit`` leaves out near-linear ones), and is saved; the file's size and each part's share are reported.

Run:  python benchmarks/state_size.py [--model resnet50] [--classes 1000] [--size 224]
Writes benchmarks/results/state-size.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torchvision

import hfguard
from hfguard.fitting import choose_layout


def main(model_name: str, classes: int, size: int) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None, num_classes=classes).eval()
    guard = hfguard.protect(model, progress=False)
    with torch.no_grad():
        layout = choose_layout(guard, torch.rand(2, 3, size, size))
    guard._allocate(layout)
    guard.calibrated_threshold.fill_(1.0)
    state = guard.guard_state()
    parts: dict[str, int] = {}
    for k, v in state.items():
        part = k.split(".")[0]
        parts[part] = parts.get(part, 0) + v.numel() * v.element_size()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "g.safetensors")
        guard.save(path)
        file_mb = os.path.getsize(path) / 2**20
    result = {
        "command": "python " + " ".join(sys.argv),
        "model": model_name, "classes": classes, "input": [3, size, size],
        "layers": layout["layers"], "feature_dims": layout["dims"], "probe_dim": layout["probe_dim"],
        "score_features": len(layout["score_features"]), "heads": layout["heads"],
        "saved_file_mb": file_mb,
        "tensor_mb_by_part": {k: v / 2**20 for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
    }
    print(json.dumps(result, indent=1))
    out = Path(__file__).resolve().parent / "results" / "state-size.json"
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--size", type=int, default=224)
    a = ap.parse_args()
    main(a.model, a.classes, a.size)
