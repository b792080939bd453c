"""How many epochs the digits checker of ``hfguard bench --dataset digits --checker`` needs (a fit-side measurement).

The bench's digits fit split has 958 images, 8 batches an epoch, so the 6 epochs that suit Fashion-MNIST's 55,000
leave the checker undertrained. Each setting trains :func:`hfguard.checker.adversarial_training` (PGD-5 at eps 0.15,
seed 0) on the fit images and scores it on the 300 calibration images that the bench's digits model never trained on
(never on test images): clean accuracy and accuracy under PGD-40 at eps 0.15 and 0.05.

Run:  OMP_NUM_THREADS=1 python benchmarks/checker_epochs.py     (about 2 minutes)
Writes benchmarks/results/checker-epochs.{json,md}.
"""

from __future__ import annotations

import sys
import time

import torch
from combiner_validation import write_results  # benchmarks/

import hfguard
from hfguard.attacks import pgd
from hfguard.bench.config import preset
from hfguard.checker import adversarial_training
from hfguard.data import load_dataset, small_cnn


def main() -> None:
    t0 = time.time()
    cfg = preset("digits")
    s = load_dataset("digits")
    n = len(s.x_train)
    x, y = s.x_train[: n - cfg.n_cal], s.y_train[: n - cfg.n_cal]
    xv, yv = s.x_train[n - cfg.n_cal :], s.y_train[n - cfg.n_cal :]
    rows = {}
    for epochs in (6, 60, 150):
        torch.manual_seed(0)
        t = time.time()
        net = adversarial_training(small_cnn(1, 10, 8), x, y, eps=cfg.eps_hi, epochs=epochs, steps=cfg.checker_steps)
        seconds = time.time() - t
        with torch.no_grad():
            row = {"training_seconds": seconds, "clean_accuracy": float((net(xv).argmax(1) == yv).float().mean())}
        for e in (0.15, 0.05):
            row[f"pgd40_accuracy_{e}"] = float((net(pgd(net, xv, yv, e, steps=40)).argmax(1) == yv).float().mean())
        rows[epochs] = row
        print(epochs, {k: round(v, 3) for k, v in row.items()}, flush=True)
    command = "OMP_NUM_THREADS=1 python benchmarks/" + " ".join([sys.argv[0].split("/")[-1], *sys.argv[1:]])
    result = {"command": command, "hfguard": hfguard.__version__, "fit_images": len(x), "calibration_images": len(xv), "epochs": rows}
    md = ["# Epochs of the digits checker (fit-side: the 300 calibration images)", "", f"Command: `{command}`. " + __doc__.split("\n\n")[1].replace("\n", " "), "",
          "| epochs | training (s) | clean accuracy | PGD-40 accuracy eps 0.15 | PGD-40 accuracy eps 0.05 |", "|---|---|---|---|---|"]
    md += [f"| {e} | {r['training_seconds']:.0f} | {r['clean_accuracy']:.3f} | {r['pgd40_accuracy_0.15']:.3f} | {r['pgd40_accuracy_0.05']:.3f} |" for e, r in rows.items()]
    write_results("checker-epochs", result, md + [""], t0)


if __name__ == "__main__":
    main()
