"""How far a model's fingerprint moves when the same model runs in another precision (``load``'s weights check).

:mod:`hfguard.fingerprint` compares a model's logits on two fixed probe images with those recorded at fit time,
in units of their spread, and refuses the model above ``TOLERANCE``. This measures the distance for float16,
bfloat16 and float64 copies of the same model (which must pass) and for the same architecture with other
weights (which must not): the digits demo CNN (trained) and a random-weight torchvision resnet50 at 64x64.

Run:  python benchmarks/fingerprint_precision.py
Writes benchmarks/results/fingerprint-precision.json.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torchvision

import hfguard
from hfguard.bench.synthetic import IMAGENET_NORMALIZE
from hfguard.data import cached_model, small_cnn
from hfguard.fingerprint import TOLERANCE, fingerprint_distance, model_fingerprint


def distances(model: torch.nn.Module, other: torch.nn.Module, guard, shape: tuple[int, ...]) -> dict[str, float]:
    ref = model_fingerprint(model, guard, shape, guard.input_range)
    out = {str(dt).replace("torch.", ""): fingerprint_distance(ref, model_fingerprint(copy.deepcopy(model).to(dt), guard, shape, guard.input_range))
           for dt in (torch.float16, torch.bfloat16, torch.float64)}
    out["other weights"] = fingerprint_distance(ref, model_fingerprint(other, guard, shape, guard.input_range))
    return out


def main() -> None:
    torch.manual_seed(0)
    cnn = cached_model("digits", "cnn")
    other_cnn = small_cnn(1, 10, 8).eval()
    r50 = torchvision.models.resnet50(num_classes=1000).eval()
    other_r50 = torchvision.models.resnet50(num_classes=1000).eval()
    result = {
        "command": "python " + " ".join(sys.argv),
        "tolerance": TOLERANCE,
        "distance in units of the fingerprint's logit spread": {
            "digits CNN (trained)": distances(cnn, other_cnn, hfguard.protect(cnn), (1, 8, 8)),
            "resnet50 (random weights), 64x64": distances(r50, other_r50, hfguard.protect(r50, normalize=IMAGENET_NORMALIZE), (3, 64, 64)),
        },
    }
    print(json.dumps(result, indent=2))
    (Path(__file__).resolve().parent / "results" / "fingerprint-precision.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
