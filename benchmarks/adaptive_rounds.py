"""Does training the combiner on detector-aware attacks make hfguard harder to evade? (issue 12, idea 2; a VALIDATION run)

For each Fashion-MNIST model the guard is fitted as the bench fits it (training split, ``calibration_data`` = the 5000
held-out training images). Then, for a few rounds, detector-aware PGD (orthogonal and selective, cross-entropy and
margin losses, L-inf budget uniform in [0.02, 0.12]) attacks the *current* guard on training images (fit-side data
only), and one more combiner head learns clean vs every misclassified image those attacks produced so far (clean
side: the first half of the calibration split; the threshold is set again at 5 % on its second half). Each round's
guard is then attacked afresh on test images 5000-5199 (the bench reports on 0-999) by the same four detector-aware
attacks at eps 0.03 and 0.1 (100 steps, best iterate), and its standard AUROCs are measured on the validation attacks
of ``combiner_validation.py``. Evasion: misclassified and not flagged by the real score at its threshold. Round 0 is
the bench's guard as fitted, its threshold set on the whole calibration split; later rounds set theirs on its second
half (both at 5 %).

``--attacks`` picks the detector-aware attacks (for the rounds and the evaluation alike); ``per-image lambda CE`` is
:func:`hfguard.attacks.weighted_pgd` (0.7.3), the strongest single attack of the 0.7.3 bench on two of its four cells.

Run:  python benchmarks/adaptive_rounds.py [--rounds 2] [--archs cnn resnet] [--attacks ...] [--tag NAME]
Writes benchmarks/results/adaptive-rounds[-NAME].{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings

import torch
from combiner_validation import validation_attacks, validation_split, write_results  # benchmarks/

import hfguard
from hfguard import calibrate, combiner
from hfguard.attacks import detector_pgd, weighted_pgd
from hfguard.data import cached_model
from hfguard.evaluate import auroc
from hfguard.fitting import _evidence_of_pixels

ATTACKS = {"orthogonal CE": ("orthogonal", "ce"), "selective CE": ("selective", "ce"),
           "orthogonal margin": ("orthogonal", "margin"), "selective margin": ("selective", "margin"),
           # the weighted sum CE - lambda_i * (score - threshold) / scale, one weight per image (hfguard.attacks.weighted_pgd)
           "per-image lambda CE": ("weighted", "ce")}
#: the four detector-aware PGD variants of the committed run (``--attacks`` picks others)
DEFAULT_ATTACKS = ["orthogonal CE", "selective CE", "orthogonal margin", "selective margin"]


def z_of(g, pixels: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    out = []
    for i in range(0, len(pixels), 512):
        ev, pred = _evidence_of_pixels(g, pixels[i : i + 512])
        out.append(calibrate.standardize(ev, pred, g.evidence_mean, g.evidence_std))
    return torch.cat(out)


def with_head(g, w: torch.Tensor, b: float, z_thr: torch.Tensor):  # noqa: ANN001, ANN201
    """A copy of guard ``g`` with one more head ``(w, b)`` and its threshold set again at 5 % on ``z_thr``."""
    g2 = copy.copy(g)  # shares the model; buffers replaced below
    g2._buffers = dict(g._buffers)
    g2.head_weight = torch.cat([g.head_weight, w[None]])
    g2.head_bias = torch.cat([g.head_bias, torch.tensor([b], dtype=g.head_bias.dtype)])
    with torch.no_grad():
        s = combiner.head_score(z_thr, g2.head_weight, g2.head_bias, g2.temperature)
    g2.calibrated_threshold = torch.tensor(calibrate.threshold_at_fpr(s, 0.05), dtype=g.calibrated_threshold.dtype)
    return g2


def attack(g, x: torch.Tensor, y: torch.Tensor, eps, steps: int, name: str, seed: int = 0, scale: float = 1.0) -> torch.Tensor:  # noqa: ANN001
    """``scale``: the score's clean spread (the weighted sum's unit)."""
    mode, loss = ATTACKS[name]
    thr = float(g.calibrated_threshold)
    out = []
    for i in range(0, len(x), 200):
        e = eps if isinstance(eps, float) else eps[i : i + 200]
        if mode == "weighted":
            out.append(weighted_pgd(g.logits_and_score, x[i : i + 200], y[i : i + 200], e, threshold=thr, scale=scale, loss=loss, steps=steps, seed=seed))
        else:
            out.append(detector_pgd(g.model, g.score, x[i : i + 200], y[i : i + 200], e, threshold=thr, mode=mode, loss=loss, steps=steps, seed=seed))
    return torch.cat(out)


def evasion(g, xa: torch.Tensor, y: torch.Tensor, correct: torch.Tensor) -> tuple[float, torch.Tensor]:  # noqa: ANN001
    with torch.no_grad():
        v = g.check(xa)
    evaded = correct & (v.logits.argmax(1) != y) & ~v.flagged
    return float(evaded.sum() / correct.sum()), evaded


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--archs", nargs="*", default=["cnn", "resnet"])
    ap.add_argument("--train-images", type=int, default=600)
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--eval-images", type=int, default=200)
    ap.add_argument("--eval-steps", type=int, default=100)
    ap.add_argument("--attacks", nargs="*", default=DEFAULT_ATTACKS, choices=list(ATTACKS), help="detector-aware attacks, for the rounds and the evaluation")
    ap.add_argument("--tag", default="", help="results file suffix (adaptive-rounds-TAG), so another study keeps the committed one")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    train, validation, xv, yv = validation_split(1000)
    command = "python " + " ".join(sys.argv)
    result = {"command": command, "archs": {}}
    md = ["# Detector-aware self-attack rounds (validation split)", "", f"Command: `{command}`. " + __doc__.split("\n\n")[1].replace("\n", " "), ""]
    for arch in args.archs:
        model = cached_model("fashion-mnist", arch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = hfguard.protect(model, progress=False).fit(train, calibration_data=validation)
        z_cal = z_of(g, validation[0])
        half = len(z_cal) // 2
        zc_fit, zc_thr = z_cal[:half], z_cal[half:]
        val = {k: z_of(g, v) for k, v in validation_attacks(model, xv, yv).items()}
        z_val_clean = z_of(g, xv)
        xe, ye = xv[: args.eval_images], yv[: args.eval_images]
        with torch.no_grad():
            ok_e = model(xe).argmax(1) == ye
        # fit-side images for the detector-aware self-attacks: training images the bench's fit also saw
        xt, yt = train[0][-args.train_images :], train[1][-args.train_images :]
        with torch.no_grad():
            ok_t = model(xt).argmax(1) == yt
        xt, yt = xt[ok_t], yt[ok_t]
        gen = torch.Generator().manual_seed(1)
        guards, pool, rows = [g], [], {}
        for r in range(args.rounds + 1):
            cur = guards[-1]
            with torch.no_grad():  # the score's clean spread: the weighted sum's unit
                scale = float(combiner.head_score(zc_thr, cur.head_weight, cur.head_bias, cur.temperature).std())
            name = "bench default" if r == 0 else f"round {r}"
            with torch.no_grad():
                thr = float(cur.calibrated_threshold)
                sc = combiner.head_score(z_val_clean, cur.head_weight, cur.head_bias, cur.temperature)
                row = {k: auroc(sc, combiner.head_score(z, cur.head_weight, cur.head_bias, cur.temperature), bootstrap=0)[0] for k, z in val.items()}
                row["clean FPR"] = float((sc > thr).float().mean())
            for eps in (0.03, 0.1):
                best = torch.zeros_like(ok_e)
                for a in args.attacks:
                    e, ev = evasion(cur, attack(cur, xe, ye, eps, args.eval_steps, a, scale=scale), ye, ok_e)
                    row[f"eps {eps} {a}"] = e
                    best |= ev
                row[f"eps {eps} best of all"] = float(best.sum() / ok_e.sum())
            rows[name] = row
            print(arch, name, {k: round(v, 3) for k, v in row.items()}, f"{time.time() - t0:.0f}s", flush=True)
            if r == args.rounds:
                break
            # attack the current guard on fit-side images; every misclassified image joins the adaptive pool
            eps_t = 0.02 + 0.10 * torch.rand(len(xt), generator=gen)
            for a in args.attacks:
                xa = attack(cur, xt, yt, eps_t, args.train_steps, a, seed=r + 1, scale=scale)
                with torch.no_grad():
                    wrong = model(xa).argmax(1) != yt
                pool.append(xa[wrong])
            z_pool = z_of(g, torch.cat(pool))
            w, b = combiner.fit_logistic_head(zc_fit, z_pool)
            w, b = combiner.standardised_head(w, b, zc_fit)
            guards.append(with_head(g, w, b, zc_thr))
        result["archs"][arch] = {"rounds": rows, "adaptive_pool": sum(len(p) for p in pool)}
        cols = list(next(iter(rows.values())))
        md += [f"## {arch}", "", "| guard | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        md += [f"| {n} | " + " | ".join(f"{v[c]:.3f}" for c in cols) + " |" for n, v in rows.items()]
        md.append("")
    write_results("adaptive-rounds" + (f"-{args.tag}" if args.tag else ""), result, md, t0)


if __name__ == "__main__":
    main()
