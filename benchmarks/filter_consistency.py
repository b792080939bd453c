"""Would a filter-consistency source help the current guard? A prototype measured on a VALIDATION split.

Issue 11 lists an optional source: how much the logits move when the input is low-pass filtered (a second model
pass, so only on request). Its prototype was measured on 0.3's combiner; this script measures it on today's default.
For each Fashion-MNIST model the default guard is fitted as the README shows; then, on pixels only:

* the heads' clean rows are half of the calibration images (the fit hold-out keeps no pixels), the threshold's the
  other half, the adversarial rows the fit's own self-attacks, the standardiser the fitted one;
* two extra features per image, from the logits of the image and of its low-pass copy (the guard's own filter
  sigma): the L1 distance between the two softmax outputs, and how much the predicted class's logit margin falls;
  standardised per predicted class on the heads' clean rows;
* heads refitted (``fitting.family_heads``) with and without the two features, the threshold set on the
  calibration images, and both scored on attacks of test images 5000-5999 (torchattacks' Square on 5000-5499;
  the bench reports on 0-999).

Run:  python benchmarks/filter_consistency.py
Writes benchmarks/results/filter-consistency.{json,md}.
"""

from __future__ import annotations

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
from hfguard.filters import lowpass

sys.path.insert(0, str(Path(__file__).resolve().parent))
from combiner_validation import square_validation_attack, validation_attacks  # noqa: E402
from standardiser_source import captured_default_fit  # noqa: E402


def _margin(logits: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Logit of class ``pred`` (N, 1) minus the largest other logit: (N,)."""
    return logits.gather(1, pred).squeeze(1) - logits.scatter(1, pred, float("-inf")).amax(1)


def consistency(guard: Any, pixels: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """(N, 2): L1 distance between the softmax of the image and of its low-pass copy, and the fall of the predicted
    class's logit margin under the filter."""
    sigma = float(guard.sigma_)
    out = []
    with guard._eval_model(), torch.no_grad():
        for i in range(0, len(pixels), batch):
            p = pixels[i : i + batch]
            z = guard._forward_model(fitting._model_input(guard, p)).float()
            zf = guard._forward_model(fitting._model_input(guard, lowpass(p, sigma))).float()
            pred = z.argmax(1, keepdim=True)
            out.append(torch.stack([(z.softmax(1) - zf.softmax(1)).abs().sum(1), _margin(z, pred) - _margin(zf, pred)], 1))
    return torch.cat(out)


def study(arch: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    (_, calib), xv, yv, model, guard, fit_rec = captured_default_fit(arch)
    k, temp = guard.layout["num_classes"], guard.temperature
    mean, std = guard.evidence_mean, guard.evidence_std
    sa = fit_rec["attacks"]

    def rows(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ev, pred = fitting._evidence_of_pixels(guard, pixels)
        return calibrate.standardize(ev, pred, mean, std), consistency(guard, pixels), pred

    every = rows(calib[0])
    half = torch.randperm(len(calib[0]), generator=torch.Generator().manual_seed(11))
    clean, cal = (tuple(t[i] for t in every) for i in (half[: len(half) // 2], half[len(half) // 2 :]))
    z_adv = calibrate.standardize(*fit_rec["adv"], mean, std)
    adv = (z_adv, consistency(guard, sa.pixels), fit_rec["adv"][1])
    val = validation_attacks(model, xv, yv)
    val["Square 0.1"] = square_validation_attack(model, xv, yv)
    val_clean = rows(xv)
    val_rows = {name: rows(x) for name, x in val.items()}
    c_mean, c_std = calibrate.fit_standardizer(clean[1], clean[2], k)  # the extra features, standardised on the heads' clean rows

    def full(r: tuple) -> torch.Tensor:
        return torch.cat([r[0], calibrate.standardize(r[1], r[2], c_mean, c_std)], 1)

    variants = {"default evidence": lambda r: r[0], "+ filter consistency (2 features)": full}
    result: dict[str, Any] = {"filter_sigma": float(guard.sigma_), "validation adversarials": {a: len(x) for a, x in val.items()}, "variants": {}}
    for name, feats in variants.items():
        w, b, _ = fitting.family_heads(feats(clean), feats(adv), sa, guard.attack_families, temp)

        def score(r: tuple, w: torch.Tensor = w, b: torch.Tensor = b, feats: Any = feats) -> torch.Tensor:
            return combiner.head_score(feats(r), w, b, temp)

        thr = calibrate.threshold_at_fpr(score(cal), guard.fpr)
        sv = score(val_clean)
        row = {"clean FPR": float((sv > thr).float().mean())}
        for attack, r in val_rows.items():
            s = score(r)
            row[attack] = auroc(sv, s, bootstrap=0)[0]
            if attack in ("PGD 0.1", "CW"):
                row[f"TPR {attack}"] = float((s > thr).float().mean())
        if name.startswith("+"):
            row["weight share of the two features"] = {f: float(wi[-2:].abs().sum() / wi.abs().sum()) for f, wi in zip(fitting._head_families(guard.attack_families), w)}
        result["variants"][name] = row
        print(arch, name, {a: round(v, 3) for a, v in row.items() if isinstance(v, float)}, flush=True)
    result["seconds"] = time.perf_counter() - t0
    return result


def main() -> None:
    warnings.simplefilter("ignore")
    out = {"command": "python benchmarks/filter_consistency.py", "hfguard": hfguard.__version__, "machine": f"torch {torch.__version__}, {torch.get_num_threads()} threads"}
    lines = ["# A filter-consistency source on today's guard (prototype, validation split)", "",
             f"Command: `{out['command']}` (hfguard {hfguard.__version__}). Default fit per model; heads refitted on pixels (clean rows: half of "
             "the calibration images; the threshold on the other half), with and without two filter-consistency features (softmax L1 shift and margin fall under "
             "the guard's low-pass filter; a second model pass). Validation attacks on test images 5000-5999 (Square on 5000-5499); thresholds "
             "at 5 %; clean FPR on the 1000 validation images.", ""]
    cols = ["FGSM 0.1", "PGD 0.1", "PGD 0.05", "PGD 0.03", "L2 1.0", "CW", "Square 0.1", "TPR PGD 0.1", "TPR CW", "clean FPR"]
    for arch in ("cnn", "resnet"):
        res = out[arch] = study(arch)
        lines += [f"## {arch} (filter sigma {res['filter_sigma']}; successful validation adversarials {res['validation adversarials']})", "",
                  "| evidence | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |" for n, r in res["variants"].items()]
        shares = next(r for n, r in res["variants"].items() if n.startswith("+"))["weight share of the two features"]
        lines += ["", "Share of each head's absolute weight on the two features: " + ", ".join(f"{f} {v:.0%}" for f, v in shares.items()), ""]
    res_dir = Path(__file__).resolve().parent / "results"
    (res_dir / "filter-consistency.json").write_text(json.dumps(out, indent=2))
    (res_dir / "filter-consistency.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
