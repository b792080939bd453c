"""Why torchattacks' Square scores lower on the Fashion-MNIST ResNet since the linear probes (0.5), on a VALIDATION split.

The default guard is fitted as the README shows; attacks are made on test images 5000-5999 (Square on 5000-5499;
the bench reports on 0-999). Reported: each standardised evidence feature's own AUROC on PGD 0.1 and on Square,
each head's weights, and the guard's score against heads refitted on the same self-attacks with non-negative
weights (a monotone score: no evidence of an attack can lower it), clean rows = training images like fit's hold-out.

Run:  python benchmarks/square_diagnosis.py [--arch resnet]
Writes benchmarks/results/square-diagnosis-<arch>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from combiner_validation import (
    FAMILIES,  # benchmarks/combiner_validation.py: 0.5's five self-attack families, this script's committed results
    square_validation_attack,
    validation_attacks,
    validation_split,
)
from scipy.optimize import minimize

import hfguard
from hfguard import calibrate, combiner
from hfguard.data import cached_model
from hfguard.evaluate import auroc
from hfguard.fitting import _evidence_of_pixels
from hfguard.selfattack import self_attacks


def nonnegative_head(z_clean: torch.Tensor, z_attack: torch.Tensor, l2: float = 1e-3) -> tuple[torch.Tensor, float]:
    """``combiner.fit_logistic_head``'s objective (class-balanced, L2) with every weight bounded below by 0 (L-BFGS-B)."""
    x = torch.cat([z_clean, z_attack]).double().numpy()
    y = np.r_[np.zeros(len(z_clean)), np.ones(len(z_attack))]
    wt = np.where(y > 0, 0.5 / len(z_attack), 0.5 / len(z_clean))

    def objective(p: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = p[:-1], p[-1]
        s = x @ w + b
        g = wt * (1 / (1 + np.exp(-s)) - y)
        return float((wt * (np.logaddexp(0, s) - y * s)).sum() + l2 * (w @ w)), np.r_[x.T @ g + 2 * l2 * w, g.sum()]

    f = x.shape[1]
    r = minimize(objective, np.zeros(f + 1), jac=True, method="L-BFGS-B", bounds=[(0, None)] * f + [(None, None)])
    return torch.tensor(r.x[:-1]), float(r.x[-1])


def main(arch: str) -> None:
    torch.manual_seed(0)
    t0 = time.time()
    train, validation, xv, yv = validation_split(1000)
    model = cached_model("fashion-mnist", arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = hfguard.protect(model, progress=False, attack_families=FAMILIES).fit(train, calibration_data=validation)

    def z_of(x: torch.Tensor) -> torch.Tensor:
        ev, pred = _evidence_of_pixels(g, x)
        return calibrate.standardize(ev, pred, g.evidence_mean, g.evidence_std).double()

    adv = validation_attacks(model, xv, yv)
    adv["Square 0.1"] = square_validation_attack(model, xv, yv)
    zv, zc = {k: z_of(v) for k, v in adv.items()}, z_of(xv)
    names = g.fit_report["score_features"]
    single = {n: {k: auroc(zc[:, j], zv[k][:, j], bootstrap=0)[0] for k in ("PGD 0.1", "Square 0.1")} for j, n in enumerate(names)}
    xs, ys = train[0][:2000], train[1][:2000]
    with torch.no_grad():
        oks = model(xs).argmax(1) == ys
    sa = self_attacks(model, xs[oks], ys[oks], seed=0, families=FAMILIES)
    z_sa, z_fit = z_of(sa.pixels), z_of(train[0][-6000:-1000])  # training images, like fit's hold-out
    rows = {"guard (default heads)": {k: auroc(g.score(xv).detach(), g.score(v).detach(), bootstrap=0)[0] for k, v in adv.items()}}
    for name, fitter in (("heads refitted here, unconstrained (as fit does)", combiner.fit_logistic_head), ("heads refitted here, non-negative weights", nonnegative_head)):
        heads = [combiner.standardised_head(*(lambda w, b: (w.double(), b))(*fitter(z_fit, z_sa[sa.family_mask(f)])), z_fit) for f in FAMILIES]
        w, b = torch.stack([h[0] for h in heads]), torch.tensor([h[1] for h in heads], dtype=torch.float64)

        def score(z: torch.Tensor, w: torch.Tensor = w, b: torch.Tensor = b) -> torch.Tensor:
            return torch.logsumexp(z @ w.T + b, 1)

        rows[name] = {k: auroc(score(zc), score(v), bootstrap=0)[0] for k, v in zv.items()}
    result = {"command": "python " + " ".join(sys.argv), "arch": arch, "validation_images": "test[5000:6000] (Square: test[5000:5500])",
              "n_successful": {k: len(v) for k, v in adv.items()}, "auroc": rows, "single_feature_auroc": single,
              "head_weights": g.fit_report["heads"], "seconds": time.time() - t0}
    print(json.dumps({"auroc": rows}, indent=1))
    (Path(__file__).resolve().parent / "results" / f"square-diagnosis-{arch}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet")
    main(ap.parse_args().arch)
