"""The heads' own settings (the logistic penalty, the clean tail they are aligned at, the sharpness of the maximum over
them), measured on a VALIDATION split.

For each Fashion-MNIST model the default guard is fitted as the README shows (training split, ``calibration_data`` = the
5000 held-out training images); its clean rows, self-attacks and their evidence are kept (as in
``benchmarks/standardiser_source.py``), then only the heads are refitted under each setting and the threshold set again
on the calibration images. Scored on attacks of test images 5000-5999 (the bench reports on 0-999; torchattacks' Square
on 5000-5499). The default row is checked against the fitted guard's own buffers.

Run:  python benchmarks/head_settings.py
Writes benchmarks/results/head-settings.{json,md}.
"""

from __future__ import annotations

import functools
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import hfguard
from hfguard import calibrate, combiner, fitting
from hfguard.evaluate import auroc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from combiner_validation import square_validation_attack, validation_attacks  # noqa: E402
from standardiser_source import captured_default_fit  # noqa: E402

DEFAULT = {"l2": 1e-3, "tail": combiner.TAIL_QUANTILE, "sharpness": combiner.SHARPNESS}
#: name -> overrides of DEFAULT
SETTINGS = {
    "default (l2 1e-3, tail 0.99, sharpness 8)": {},
    "l2 1e-4": {"l2": 1e-4},
    "l2 1e-2": {"l2": 1e-2},
    "l2 3e-2": {"l2": 3e-2},
    "l2 1e-1": {"l2": 1e-1},
    "tail 0.98": {"tail": 0.98},
    "tail 0.995": {"tail": 0.995},
    "sharpness 4": {"sharpness": 4.0},
    "sharpness 16": {"sharpness": 16.0},
}


def study(arch: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    _, xv, yv, model, guard, rec = captured_default_fit(arch)
    mean, std = guard.evidence_mean.clone(), guard.evidence_std.clone()
    ev_h, pred_h = fitting._evidence_of_rows(guard, rec["hold"])
    ev_c, pred_c = fitting._evidence_of_rows(guard, rec["calib"])
    ev_adv, pred_adv = rec["adv"]
    z_hold, z_adv, z_cal = (calibrate.standardize(e, p, mean, std) for e, p in ((ev_h, pred_h), (ev_adv, pred_adv), (ev_c, pred_c)))
    z_val = calibrate.standardize(*fitting._evidence_of_pixels(guard, xv), mean, std)
    val = validation_attacks(model, xv, yv)
    val["Square 0.1"] = square_validation_attack(model, xv, yv)
    z_att = {name: calibrate.standardize(*fitting._evidence_of_pixels(guard, x), mean, std) for name, x in val.items()}
    rows: dict[str, dict[str, float]] = {}
    saved = (combiner.fit_logistic_head, combiner.TAIL_QUANTILE, combiner.SHARPNESS)
    for name, overrides in SETTINGS.items():
        s = {**DEFAULT, **overrides}
        combiner.fit_logistic_head = functools.partial(saved[0], l2=s["l2"])
        combiner.TAIL_QUANTILE, combiner.SHARPNESS = s["tail"], s["sharpness"]
        try:
            w, b, _ = fitting.family_heads(z_hold, z_adv, rec["attacks"], guard.attack_families, guard.temperature)
        finally:
            combiner.fit_logistic_head, combiner.TAIL_QUANTILE, combiner.SHARPNESS = saved
        thr = calibrate.threshold_at_fpr(combiner.head_score(z_cal, w, b, guard.temperature), guard.fpr)
        sv = combiner.head_score(z_val, w, b, guard.temperature)
        row = {"clean FPR": float((sv > thr).float().mean())}
        for attack, z in z_att.items():
            sa = combiner.head_score(z, w, b, guard.temperature)
            row[attack] = auroc(sv, sa, bootstrap=0)[0]
            if attack in ("PGD 0.1", "CW"):
                row[f"TPR {attack}"] = float((sa > thr).float().mean())
        rows[name] = row
        print(arch, name, {k: round(v, 3) for k, v in row.items()}, flush=True)
        if not overrides:  # the library's own fit must be the default row
            gap = max(float((w - guard.head_weight).abs().max()), abs(thr - float(guard.calibrated_threshold)))
            assert gap < 1e-4, f"the default row no longer matches fit (gap {gap})"
    return {"watched": guard.layers, "validation adversarials": {a: len(x) for a, x in val.items()}, "settings": rows,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    warnings.simplefilter("ignore")
    out = {"command": "python benchmarks/head_settings.py", "hfguard": hfguard.__version__,
           "machine": f"torch {torch.__version__}, {torch.get_num_threads()} threads"}
    lines = ["# The heads' settings", "",
             f"Command: `{out['command']}` (hfguard {hfguard.__version__}). One default fit per model (calibration_data = the 5000 held-out "
             "training images); only the heads and the threshold are refitted per setting. Validation attacks on Fashion-MNIST test images "
             "5000-5999 (torchattacks' Square on 5000-5499; the bench reports on 0-999). AUROC over successful adversarials; TPR at the "
             "threshold; clean FPR measured on the 1000 validation images; thresholds at 5 %.", ""]
    for arch in ("cnn", "resnet"):
        res = out[arch] = study(arch)
        cols = ["FGSM 0.1", "PGD 0.1", "PGD 0.05", "PGD 0.03", "L2 1.0", "CW", "Square 0.1", "TPR PGD 0.1", "TPR CW", "clean FPR"]
        lines += [f"## {arch} (watched {res['watched']}; successful validation adversarials {res['validation adversarials']})", "",
                  "| heads | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |" for n, r in res["settings"].items()]
        lines.append("")
    res_dir = Path(__file__).resolve().parent / "results"
    (res_dir / "head-settings.json").write_text(json.dumps(out, indent=2))
    (res_dir / "head-settings.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
