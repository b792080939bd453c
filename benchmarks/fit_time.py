"""Wall time of the bench's default hfguard fit on a Fashion-MNIST model, alone on the machine.

The bench times its fits inside one long run; when something else shares the CPU during a fit (as in 0.7.3's run,
whose CNN fits overlapped test runs), its fit column is inflated. This times the same fit (the model trained on all
training images but the last 5000, fitted on those 55000 with ``calibration_data`` = the 5000, default settings) with
nothing else running, ``--repeats`` times, and reports each run and the parts ``fit_report["seconds"]`` gives.

Run:  python benchmarks/fit_time.py [--arch cnn] [--repeats 2]
Writes benchmarks/results/fit-time-<arch>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

import hfguard
from hfguard.data import CALIBRATION_HOLDOUT, cached_model, load_dataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=("cnn", "resnet"), default="cnn")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    split = load_dataset("fashion-mnist")
    fit_data, calibration = split.holdout(CALIBRATION_HOLDOUT["fashion-mnist"])
    model = cached_model("fashion-mnist", args.arch, holdout=CALIBRATION_HOLDOUT["fashion-mnist"]).eval()
    runs = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        guard = hfguard.protect(model, progress=False).fit(fit_data, calibration_data=calibration)
        runs.append({"seconds": round(time.perf_counter() - t, 1), "parts": {k: round(v, 1) for k, v in guard.fit_report["seconds"].items()}})
    out = {
        "command": "python " + " ".join(sys.argv),
        "hfguard": hfguard.__version__,
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads, nothing else running",
        "arch": args.arch, "fit_images": len(fit_data[0]), "calibration_images": len(calibration[0]), "runs": runs,
    }
    print(json.dumps(out, indent=2))
    (Path(__file__).resolve().parent / "results" / f"fit-time-{args.arch}.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
