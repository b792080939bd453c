"""Which self-attack families should ``fit`` generate? Full fits compared on a VALIDATION split (never the bench's images).

For each Fashion-MNIST model the guard is fitted as the README shows (training split, ``calibration_data`` = the 5000
held-out training images) with the default families (``"auto"``, 0.6), with all seven (``"all"``: the default plus the
minimal PGD L2 attacks, ``boundary-l2``), with the default leaving out each family added in 0.6 (``cw-l2``:
Carlini-Wagner L2, 30 steps; ``square-linf``: a gradient-free random search with Square's proposals, 200 queries), and
with 0.5's five families. Each guard is scored on attacks of test images 5000-5999 (the bench reports on 0-999;
torchattacks' Square on 5000-5499), thresholded at its own calibrated threshold.

Run:  python benchmarks/self_attack_families.py
Writes benchmarks/results/self-attack-families.{json,md}.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import torch
from combiner_validation import FAMILIES as FAMILIES_0_5  # benchmarks/combiner_validation.py
from combiner_validation import square_validation_attack, validation_attacks, validation_split

import hfguard
from hfguard.data import cached_model
from hfguard.evaluate import auroc, jsonable
from hfguard.selfattack import DEFAULT_FAMILIES

VARIANTS = {
    "auto (0.6 default)": "auto",
    "all seven": "all",
    "auto without cw-l2": [f for f in DEFAULT_FAMILIES if f != "cw-l2"],
    "auto without square-linf": [f for f in DEFAULT_FAMILIES if f != "square-linf"],
    "0.5's five families": FAMILIES_0_5,
}


def main() -> None:
    t0 = time.time()
    train, validation, xv, yv = validation_split(1000)
    result: dict = {"command": "python " + " ".join(sys.argv), "validation_images": "test[5000:6000] (torchattacks Square: test[5000:5500])",
                    "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}", "archs": {}}
    lines = ["# Self-attack families: full fits on a validation split", "", f"`{result['command']}`; attacks on test images 5000-5999 "
             "(not the bench's 0-999); AUROC, and TPR / FPR at each guard's calibrated threshold.", ""]
    for arch in ("cnn", "resnet"):
        torch.manual_seed(0)
        model = cached_model("fashion-mnist", arch)
        adv = validation_attacks(model, xv, yv)
        adv["Square 0.1"] = square_validation_attack(model, xv, yv)
        rows = {}
        for name, families in VARIANTS.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                g = hfguard.protect(model, progress=False, attack_families=families).fit(train, calibration_data=validation)
            with torch.no_grad():
                clean = g.score(xv)
                scores = {k: g.score(v) for k, v in adv.items()}
            rep = g.fit_report
            rows[name] = {"auroc": {k: auroc(clean, s, bootstrap=0)[0] for k, s in scores.items()},
                          "tpr": {k: float((s > g.threshold).float().mean()) for k, s in scores.items()},
                          "fpr": float((clean > g.threshold).float().mean()),
                          "self_attacks": {"succeeded": rep["self_attacks"]["succeeded"], "attempted": rep["self_attacks"]["attempted"]},
                          "fit_seconds": rep["seconds"]}
            print(arch, name, {k: round(v, 3) for k, v in rows[name]["auroc"].items()}, f"fpr {rows[name]['fpr']:.3f}", flush=True)
        result["archs"][arch] = {"n_successful": {k: len(v) for k, v in adv.items()}, "variants": rows}
        attacks = list(adv)
        lines += [f"## {arch}", "", "| fit | " + " | ".join(f"{a} (n={len(adv[a])})" for a in attacks) + " | TPR PGD 0.1 | TPR CW | FPR | self-attacks s |",
                  "|---" * (len(attacks) + 5) + "|"]
        for name, r in rows.items():
            lines.append(f"| {name} | " + " | ".join(f"{r['auroc'][a]:.3f}" for a in attacks)
                         + f" | {r['tpr']['PGD 0.1']:.3f} | {r['tpr']['CW']:.3f} | {r['fpr']:.3f} | {r['fit_seconds'].get('self_attacks', 0):.1f} |")
        lines += ["", "Successful self-attacks per family (default fit): " + ", ".join(f"{f} {n}" for f, n in rows[next(iter(VARIANTS))]["self_attacks"]["succeeded"].items()), ""]
    result["seconds"] = time.time() - t0
    out = Path(__file__).resolve().parent / "results"
    (out / "self-attack-families.json").write_text(json.dumps(jsonable(result), indent=2))
    (out / "self-attack-families.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
