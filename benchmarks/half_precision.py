"""Scores of a guard fitted on the float32 digits CNN, loaded onto its float16 / bfloat16 copy (the setting of
``tests/test_model_families.py::test_half_precision_model_scores_close_to_float32``, which requires 0.05 / 0.2).

Run:  python benchmarks/half_precision.py
Writes benchmarks/results/half-precision.json: per dtype, the largest score difference in clean-score standard
deviations and the share of the 256 test images whose flag agrees.
"""

from __future__ import annotations

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
    digits = load_digits()
    torch.manual_seed(0)
    model = train_classifier(small_cnn(1, 10, 8), digits.x_train, digits.y_train, epochs=15, seed=0)  # the tests' fixture
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = hfguard.protect(model, progress=False).fit((digits.x_train, digits.y_train))
    x = digits.x_test[:256]
    ref = guard.score(x).detach()
    out = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "score_features": guard.fit_report["score_features"], "dtypes": {}}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "g.safetensors")
        guard.save(path)
        for dtype in (torch.float16, torch.bfloat16):
            half = hfguard.load(path, copy.deepcopy(model).to(dtype))
            s = half.score(x.to(dtype)).detach()
            out["dtypes"][str(dtype)] = {
                "max_abs_difference_in_clean_sd": float((s - ref).abs().max() / ref.std()),
                "flags_agree": float(((s > guard.threshold) == (ref > guard.threshold)).float().mean()),
            }
    print(json.dumps(out["dtypes"], indent=1))
    (Path(__file__).resolve().parent / "results" / "half-precision.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
