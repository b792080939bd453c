"""Does ``fpr=0.05`` hold on images nobody has seen? A memorised model, with and without ``calibration_data``.

Setup (issue 13): a digits CNN trained to convergence on its training split; the guard is fitted on that
same split (``fit(train)``, what users do first) or with the documented workflow
(``fit(train, calibration_data=validation)``, the validation images being held out of the model's training).
The clean FPR is measured on the test split, which neither the model nor ``fit`` has seen. Repeated over
several seeds (model initialisation, data split) for both combiners.

Run:  python benchmarks/calibration_fpr.py
Writes benchmarks/results/calibration-fpr.{json,md}.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import hfguard
from hfguard.data import load_digits, small_cnn, train_classifier
from hfguard.evaluate import jsonable


def main(seeds: int = 5, holdout: int = 300, epochs: int = 60, fpr: float = 0.05) -> None:
    torch.set_num_threads(2)
    t0 = time.time()
    rows = []
    for seed in range(seeds):
        split = load_digits(seed=seed)
        (train, validation) = split.holdout(holdout)
        torch.manual_seed(seed)
        model = train_classifier(small_cnn(1, 10, 8), *train, epochs=epochs, seed=seed)
        with torch.no_grad():
            train_acc = float((model(train[0]).argmax(1) == train[1]).float().mean())
            test_acc = float((model(split.x_test).argmax(1) == split.y_test).float().mean())
        for cal in ("self-attack", "clean"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                naive = hfguard.protect(model, progress=False, calibration=cal, fpr=fpr).fit(train)
                right = hfguard.protect(model, progress=False, calibration=cal, fpr=fpr).fit(train, calibration_data=validation)
            rows.append({
                "seed": seed, "calibration": cal, "train_accuracy": train_acc, "test_accuracy": test_acc,
                "test_fpr_fit_only": float(naive.detect(split.x_test).float().mean()),
                "test_fpr_with_calibration_data": float(right.detect(split.x_test).float().mean()),
                "n_test": len(split.x_test), "n_calibration": holdout, "n_fit": len(train[0]),
            })
            print(rows[-1], flush=True)
    summary = {}
    for cal in ("self-attack", "clean"):
        r = [x for x in rows if x["calibration"] == cal]
        summary[cal] = {k: {"mean": statistics.mean(x[k] for x in r), "sd": statistics.stdev(x[k] for x in r)}
                        for k in ("test_fpr_fit_only", "test_fpr_with_calibration_data", "train_accuracy", "test_accuracy")}
    res = {"command": "python " + " ".join(sys.argv), "target_fpr": fpr, "epochs": epochs, "rows": rows, "summary": summary, "seconds": time.time() - t0}
    out = Path("benchmarks/results")
    (out / "calibration-fpr.json").write_text(json.dumps(jsonable(res), indent=2))
    md = ["# Clean FPR on unseen images: fit data only vs `calibration_data`", "",
          f"Command: `{res['command']}`. Digits CNN trained {epochs} epochs on each seed's training split minus {holdout} images; "
          f"target fpr {fpr}; FPR measured on the {rows[0]['n_test']} test digits (seen by neither the model nor `fit`).", "",
          "| combiner | train acc. | test acc. | test FPR, `fit(train)` | test FPR, `fit(train, calibration_data=held-out 300)` |",
          "|---|---|---|---|---|"]
    for cal, sm in summary.items():
        md.append(f"| {cal} | {sm['train_accuracy']['mean']:.3f} | {sm['test_accuracy']['mean']:.3f} | "
                  f"{sm['test_fpr_fit_only']['mean']:.3f} +/- {sm['test_fpr_fit_only']['sd']:.3f} | "
                  f"**{sm['test_fpr_with_calibration_data']['mean']:.3f} +/- {sm['test_fpr_with_calibration_data']['sd']:.3f}** |")
    md += ["", f"Mean +/- sd over {seeds} seeds. Per seed:", "", "| seed | combiner | fit only | with calibration_data |", "|---|---|---|---|"]
    md += [f"| {x['seed']} | {x['calibration']} | {x['test_fpr_fit_only']:.3f} | {x['test_fpr_with_calibration_data']:.3f} |" for x in rows]
    (out / "calibration-fpr.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
