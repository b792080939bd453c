"""Where should the per-class evidence standardiser and the heads' clean rows come from? Measured on a VALIDATION split.

``fit(train, calibration_data=val)`` has two kinds of clean rows: the fit hold-out (training images, which the model
may have memorised, and the images the self-attacks start from) and the calibration images (never trained on). For
each Fashion-MNIST model the guard is fitted as the README shows; its evidence of both kinds of rows, of its own
self-attacks, and of attacks on test images 5000-5999 (the bench reports on 0-999) is computed once, then the
standardiser and the heads are refitted under each variant:

* 0.7.0: standardiser and heads' clean rows on the fit hold-out, threshold on the calibration images;
* the calibration images for both (half of them; the other half sets the threshold);
* the calibration images for the standardiser, the fit hold-out for the heads (half / all of the calibration images
  for the threshold; ``all``, with a prior from the fit hold-out, is what ``fit`` does since 0.7.1: checked against
  the fitted guard's own buffers);
* both kinds pooled.

Second table: how optimistic is a threshold set on the same calibration rows that set the standardiser? For many
random draws of a calibration set (2000 or 300 of the calibration images), the false-alarm rate of each threshold
rule is measured on the remaining calibration images, which neither fit saw.

Run:  python benchmarks/standardiser_source.py
Writes benchmarks/results/standardiser-source.{json,md}.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import hfguard
from hfguard import calibrate, combiner, fitting
from hfguard.data import CALIBRATION_HOLDOUT, cached_model
from hfguard.evaluate import auroc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from combiner_validation import validation_attacks, validation_split  # noqa: E402


def _capture_fit(model: torch.nn.Module, train: Any, calib: Any) -> tuple[Any, dict[str, Any]]:
    """Fits the default guard, keeping its hold-out and calibration rows, self-attacks and their evidence."""
    rec: dict[str, Any] = {}
    originals = fitting.self_attacks, fitting._evidence_of_pixels, fitting._calibrate

    def attacks(*a: Any, **k: Any) -> Any:
        rec["attacks"] = originals[0](*a, **k)
        return rec["attacks"]

    def evidence(guard: Any, pixels: Any, left_out: Any = None) -> Any:
        out = originals[1](guard, pixels, left_out)
        if "attacks" in rec and "adv" not in rec:
            rec["adv"] = out
        return out

    def calibrate_(guard: Any, layout: Any, hold: Any, calib_rows: Any, sample: Any, **kw: Any) -> Any:
        rec["hold"], rec["calib"] = hold, calib_rows
        return originals[2](guard, layout, hold, calib_rows, sample, **kw)

    fitting.self_attacks, fitting._evidence_of_pixels, fitting._calibrate = attacks, evidence, calibrate_
    try:
        guard = hfguard.protect(model, progress=False).fit(train, calibration_data=calib)
    finally:
        fitting.self_attacks, fitting._evidence_of_pixels, fitting._calibrate = originals
    return guard, rec


def captured_default_fit(arch: str) -> tuple[tuple, torch.Tensor, torch.Tensor, torch.nn.Module, Any, dict[str, Any]]:
    """The validation split (``(train, calibration)``, validation images and labels), the bench's Fashion-MNIST ``arch``
    and its default guard fitted as the README shows, with what :func:`_capture_fit` kept."""
    train, calib, xv, yv = validation_split(1000)
    model = cached_model("fashion-mnist", arch, holdout=CALIBRATION_HOLDOUT["fashion-mnist"]).eval()
    guard, rec = _capture_fit(model, train, calib)
    return (train, calib), xv, yv, model, guard, rec


def study(arch: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    (train, calib), xv, yv, model, guard, rec = captured_default_fit(arch)
    k, temp = guard.layout["num_classes"], guard.temperature
    ev_h, pred_h = fitting._evidence_of_rows(guard, rec["hold"])
    ev_c, pred_c = fitting._evidence_of_rows(guard, rec["calib"])
    ev_adv, pred_adv = rec["adv"]
    sa = rec["attacks"]
    ev_v, pred_v = fitting._evidence_of_pixels(guard, xv)
    val = validation_attacks(model, xv, yv)
    ev_a = {name: fitting._evidence_of_pixels(guard, x) for name, x in val.items()}

    def heads(z_clean: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``fit``'s head fits (``fitting.family_heads``) on given clean rows and standardiser."""
        w, b, _ = fitting.family_heads(z_clean, calibrate.standardize(ev_adv, pred_adv, mean, std), sa, guard.attack_families, temp)
        return w, b

    def scorer(std_rows: tuple, head_rows: tuple, prior: tuple | None = None) -> Any:
        mean, std = calibrate.fit_standardizer(*std_rows, k, prior=prior)
        w, b = heads(calibrate.standardize(*head_rows, mean, std), mean, std)
        return lambda e, p: combiner.head_score(calibrate.standardize(e, p, mean, std), w, b, temp), (mean, std, w, b)

    half = torch.randperm(len(ev_c), generator=torch.Generator().manual_seed(11))
    a_idx, b_idx = half[: len(half) // 2], half[len(half) // 2 :]
    hold, cal, cal_a, cal_b = (ev_h, pred_h), (ev_c, pred_c), (ev_c[a_idx], pred_c[a_idx]), (ev_c[b_idx], pred_c[b_idx])
    prior = calibrate.fit_standardizer(ev_h, pred_h, k)
    variants = {
        "0.7.0: standardiser and heads on the fit hold-out; threshold on all calibration images": (hold, hold, cal, None),
        "standardiser and heads on calibration half A; threshold on half B": (cal_a, cal_a, cal_b, None),
        "standardiser and heads on fit hold-out + calibration half A; threshold on half B": (
            (torch.cat([ev_h, cal_a[0]]), torch.cat([pred_h, cal_a[1]])), None, cal_b, None),
        "standardiser on calibration half A, heads on the fit hold-out; threshold on half B": (cal_a, hold, cal_b, None),
        "standardiser on all calibration images (prior: fit hold-out), heads on the fit hold-out; threshold on all calibration images (0.7.1)": (
            cal, hold, cal, prior),
    }
    rows: dict[str, dict[str, float]] = {}
    for name, (std_rows, head_rows, thr_rows, pri) in variants.items():
        score, parts = scorer(std_rows, head_rows if head_rows is not None else std_rows, pri)
        thr = calibrate.threshold_at_fpr(score(*thr_rows), guard.fpr)
        sv = score(ev_v, pred_v)
        row = {"clean FPR": float((sv > thr).float().mean())}
        for attack, (e, p) in ev_a.items():
            s = score(e, p)
            row[attack] = auroc(sv, s, bootstrap=0)[0]
            if attack == "PGD 0.1":
                row["TPR PGD 0.1"] = float((s > thr).float().mean())
        rows[name] = row
        if name.endswith("(0.7.1)"):  # the library's own fit must be this variant
            gap = max(float((parts[0] - guard.evidence_mean).abs().max()), float((parts[2] - guard.head_weight).abs().max()),
                      abs(thr - float(guard.calibrated_threshold)))
            assert gap < 1e-4, f"fit no longer matches the variant it is documented as (gap {gap})"
    optimism: dict[str, dict[str, Any]] = {}
    for size in (2000, 300):
        rules: dict[str, list[float]] = {"same rows set the standardiser and the threshold (0.7.1)": [], "halves: standardiser on one, threshold on the other": []}
        for seed in range(8):
            perm = torch.randperm(len(ev_c), generator=torch.Generator().manual_seed(100 + seed))
            a, rest = perm[:size], perm[size:]
            fresh = (ev_c[rest], pred_c[rest])
            score, _ = scorer((ev_c[a], pred_c[a]), hold, prior)
            thr = calibrate.threshold_at_fpr(score(ev_c[a], pred_c[a]), guard.fpr)
            rules["same rows set the standardiser and the threshold (0.7.1)"].append(float((score(*fresh) > thr).float().mean()))
            a1, a2 = a[: size // 2], a[size // 2 :]
            score, _ = scorer((ev_c[a1], pred_c[a1]), hold, prior)
            thr = calibrate.threshold_at_fpr(score(ev_c[a2], pred_c[a2]), guard.fpr)
            rules["halves: standardiser on one, threshold on the other"].append(float((score(*fresh) > thr).float().mean()))
        optimism[str(size)] = {r: {"mean": statistics.mean(v), "sd": statistics.stdev(v), "runs": v} for r, v in rules.items()}
    return {"watched": guard.layers, "rows": {"fit hold-out": len(ev_h), "calibration": len(ev_c), "self-attacks": len(ev_adv)},
            "validation adversarials": {a: len(x) for a, x in val.items()}, "variants": rows, "optimism": optimism,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    warnings.simplefilter("ignore")
    out = {"command": "python " + " ".join(sys.argv), "hfguard": hfguard.__version__, "machine": f"torch {torch.__version__}, {torch.get_num_threads()} threads"}
    lines = ["# Where the evidence standardiser and the heads' clean rows come from", "",
             f"Command: `{out['command']}` (hfguard {hfguard.__version__}). Validation attacks on Fashion-MNIST test images 5000-5999 (the bench reports "
             "on 0-999); the fit hold-out is training images, the calibration images are the 5000 the models never trained on (at most 4000 kept). "
             "AUROC over successful adversarials; clean FPR measured on the 1000 validation images; thresholds at 5 %.", ""]
    for arch in ("cnn", "resnet"):
        res = out[arch] = study(arch)
        cols = ["FGSM 0.1", "PGD 0.1", "PGD 0.05", "PGD 0.03", "L2 1.0", "CW", "TPR PGD 0.1", "clean FPR"]
        lines += [f"## {arch} (watched {res['watched']}; rows {res['rows']}; successful validation adversarials {res['validation adversarials']})", "",
                  "| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |" for n, r in res["variants"].items()]
        lines += ["", "Threshold optimism: clean FPR on calibration images no fit saw, over 8 random calibration sets (mean +/- sd):", "",
                  "| calibration images | rule | FPR |", "|---|---|---|"]
        lines += [f"| {size} | {rule} | {v['mean']:.4f} +/- {v['sd']:.4f} |" for size, rules in res["optimism"].items() for rule, v in rules.items()]
        lines.append("")
        print("\n".join(lines[-20:]), flush=True)
    res_dir = Path(__file__).resolve().parent / "results"
    (res_dir / "standardiser-source.json").write_text(json.dumps(out, indent=2))
    (res_dir / "standardiser-source.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
