"""Scores of a guard fitted on the float32 digits CNN, loaded onto its float16 / bfloat16 copy (the setting of
``tests/test_model_families.py::test_half_precision_model_scores_close_to_float32``, which requires 0.05 / 0.2).

Run:  python benchmarks/half_precision.py [--device cuda] [--out PATH]
Writes benchmarks/results/half-precision.json (``--device cuda``: half-precision-cuda.json): per dtype, the largest
score difference in clean-score standard deviations and the share of the 256 test images whose flag agrees. On a
GPU the guard (fitted on the CPU, as the tests do) is moved to the device, where its maths runs grouped (see
``FittedState._source_distances``); the file then also holds how far its float32 scores there are from the CPU's,
with the grouped maths and one source at a time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import hfguard
from hfguard.data import load_digits, small_cnn, train_classifier


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    digits = load_digits()
    torch.manual_seed(0)
    model = train_classifier(small_cnn(1, 10, 8), digits.x_train, digits.y_train, epochs=15, seed=0)  # the tests' fixture
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = hfguard.protect(model, progress=False).fit((digits.x_train, digits.y_train))
    x = digits.x_test[:256]
    ref = guard.score(x).detach()
    dev = torch.device(args.device)
    out = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
           "score_features": guard.fit_report["score_features"], "dtypes": {}}
    if dev.type != "cpu":
        on_dev = copy.deepcopy(guard).to(dev)
        grouped = on_dev.score(x.to(dev)).detach().cpu()
        on_dev._grouped = False
        per_source = on_dev.score(x.to(dev)).detach().cpu()
        out["float32_on_device_vs_cpu_max_abs_difference_in_clean_sd"] = {
            "grouped maths (the default off a CPU)": float((grouped - ref).abs().max() / ref.std()),
            "one source at a time": float((per_source - ref).abs().max() / ref.std()),
        }
        ref = ref.to(dev)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "g.safetensors")
        guard.save(path)
        for dtype in (torch.float16, torch.bfloat16):
            half = hfguard.load(path, copy.deepcopy(model).to(dev, dtype))
            s = half.score(x.to(dev, dtype)).detach()
            out["dtypes"][str(dtype)] = {
                "max_abs_difference_in_clean_sd": float((s - ref).abs().max() / ref.std()),
                "flags_agree": float(((s > guard.threshold) == (ref > guard.threshold)).float().mean()),
            }
    print(json.dumps(out, indent=1))
    name = "half-precision.json" if dev.type == "cpu" else f"half-precision-{dev.type}.json"
    Path(args.out or Path(__file__).resolve().parent / "results" / name).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
