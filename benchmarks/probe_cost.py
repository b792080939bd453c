"""What the linear probes cost: ``fit`` and ``check`` of the Fashion-MNIST guards with and without them, in one process.

Each model gets two guards fitted on the same data (training split, ``calibration_data`` = the 5000 held-out
training images): the default (probes of every watched layer whose residual is kept) and one whose
``score_features`` leave the probes out (0.4's evidence; no probe is fitted or computed). Fits alternate
(A, B, A, B), and ``check`` on 256 test images is timed in a shuffled order with the bare forward, every
repeat; medians. Timings on this shared 2-core machine vary between processes: only compare within a run.

Run:  python benchmarks/probe_cost.py [--repeats 30]
Writes benchmarks/results/probe-cost.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import hfguard
from hfguard.data import CALIBRATION_HOLDOUT, cached_model, load_dataset
from hfguard.evidence import LOGITS, SPECTRUM, feature_names


def main(repeats: int) -> None:
    torch.set_num_threads(2)
    split = load_dataset("fashion-mnist")
    train, validation = split.holdout(CALIBRATION_HOLDOUT["fashion-mnist"])
    x = split.x_test[:256]
    result = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()}, 2 torch threads, torch {torch.__version__}",
              "batch": 256, "archs": {}}
    for arch in ("cnn", "resnet"):
        model = cached_model("fashion-mnist", arch)
        guards, fit_s = {}, {"with probes": [], "without probes": []}
        for _ in range(2):
            for name in ("with probes", "without probes"):
                options = {}
                if name == "without probes":
                    layers = guards["with probes"].layers
                    options["score_features"] = feature_names([*layers, LOGITS, SPECTRUM])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t = time.perf_counter()
                    g = hfguard.protect(model, progress=False, **options).fit(train, calibration_data=validation)
                    fit_s[name].append(time.perf_counter() - t)
                guards[name] = g
                fit_s.setdefault(name + ": statistics pass", []).append(g.fit_report["seconds"]["statistics"])
        calls = {"bare forward": lambda: model(x), **{f"check {n}": (lambda g=g: g.check(x)) for n, g in guards.items()}}
        times = {k: [] for k in calls}
        with torch.no_grad():
            for f in calls.values():
                f()
            for _ in range(repeats):
                order = list(calls)
                random.shuffle(order)
                for k in order:
                    t = time.perf_counter()
                    calls[k]()
                    times[k].append(time.perf_counter() - t)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        result["archs"][arch] = {
            "probes": guards["with probes"].fit_report["probes"],
            "fit seconds (two fits each, alternating)": fit_s,
            "milliseconds (median)": ms,
            "check over bare forward": {k: ms[k] / ms["bare forward"] for k in ms if k != "bare forward"},
        }
        print(arch, json.dumps(result["archs"][arch], indent=1), flush=True)
    out = Path(__file__).resolve().parent / "results" / "probe-cost.json"
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    main(ap.parse_args().repeats)
