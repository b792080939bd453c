"""How strong, and how many, should the self-attacks be? Full fits compared on a VALIDATION split (never the bench's images).

The bench's weakest rows are attacks that land close to the decision boundary or search without gradients
(torchattacks' CW with 100 steps and Square with 1000 queries), while ``fit`` generates its CW-L2 family with
``CW_STEPS`` = 30 Adam steps and its random search with ``SQUARE_QUERIES`` = 200 queries. This study refits the
default guard with stronger self-attacks (more queries, more CW steps, both) and scores each fit on attacks of test
images 5000-5999 (the bench reports on 0-999; torchattacks' Square on 5000-5499), thresholded at its own
calibrated threshold. Fit as the README shows: training split, ``calibration_data`` = the 5000 held-out training images.

``--study size`` refits the default guard with fewer images attacked (``attack_size``): what a user who cannot pay
for 2000 attacked images (a large model on a CPU, ``benchmarks/self_attack_cost.py``) gives up.

``--study size-large`` attacks more than the default 2000 (the ResNet's CW and Square rows rose with every step from 250 to 2000).

Run:  python benchmarks/self_attack_strength.py [--study strength|size|size-large] [cnn|resnet ...]
Writes benchmarks/results/self-attack-{study}.{json,md}.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import torch
from combiner_validation import square_validation_attack, validation_attacks, validation_split

import hfguard
import hfguard.selfattack as selfattack
from hfguard.data import cached_model
from hfguard.evaluate import auroc, jsonable

#: study -> variant -> (SQUARE_QUERIES, CW_STEPS, attack_size)
STUDIES = {
    "strength": {
        "default (200 queries, 30 CW steps)": (selfattack.SQUARE_QUERIES, selfattack.CW_STEPS, 2000),
        "500 queries": (500, selfattack.CW_STEPS, 2000),
        "60 CW steps": (selfattack.SQUARE_QUERIES, 60, 2000),
        "500 queries, 60 CW steps": (500, 60, 2000),
    },
    "size": {f"attack_size={n}": (selfattack.SQUARE_QUERIES, selfattack.CW_STEPS, n) for n in (2000, 1000, 500, 250)},
    "size-large": {f"attack_size={n}": (selfattack.SQUARE_QUERIES, selfattack.CW_STEPS, n) for n in (3000, 4000)},
    "square-budget": {"square L-inf 0.01-0.15 (0.7.3)": (selfattack.SQUARE_QUERIES, selfattack.CW_STEPS, 2000, (0.01, 0.15)),
                      "square L-inf 0.06-0.15": (selfattack.SQUARE_QUERIES, selfattack.CW_STEPS, 2000, (0.06, 0.15)),
                      "square L-inf 0.06-0.15, attack_size=3000": (selfattack.SQUARE_QUERIES, selfattack.CW_STEPS, 3000, (0.06, 0.15))},
}


def main() -> None:
    t0 = time.time()
    args = sys.argv[1:]
    study = "strength"
    if args[:1] == ["--study"]:
        study, args = args[1], args[2:]
    variants = STUDIES[study]
    archs = args or ["cnn", "resnet"]
    train, validation, xv, yv = validation_split(1000)
    result: dict = {"command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "hfguard": hfguard.__version__,
                    "validation_images": "test[5000:6000] (torchattacks Square: test[5000:5500])",
                    "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}", "archs": {}}
    lines = [f"# Self-attack {study}: full fits on a validation split", "", f"`{result['command']}`; attacks on test images 5000-5999 "
             "(not the bench's 0-999); AUROC, and TPR / FPR at each guard's calibrated threshold; fit seconds of the whole fit "
             "(the self-attacks' share in brackets).", ""]
    defaults = (selfattack.SQUARE_QUERIES, selfattack.CW_STEPS, selfattack.SQUARE_LINF_RANGE)
    for arch in archs:
        torch.manual_seed(0)
        model = cached_model("fashion-mnist", arch)
        adv = validation_attacks(model, xv, yv)
        adv["Square 0.1"] = square_validation_attack(model, xv, yv)
        rows = {}
        for name, (queries, steps, size, *square_range) in variants.items():
            selfattack.SQUARE_QUERIES, selfattack.CW_STEPS = queries, steps
            selfattack.SQUARE_LINF_RANGE = square_range[0] if square_range else defaults[2]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    g = hfguard.protect(model, progress=False, attack_size=size).fit(train, calibration_data=validation)
            finally:
                selfattack.SQUARE_QUERIES, selfattack.CW_STEPS, selfattack.SQUARE_LINF_RANGE = defaults
            with torch.no_grad():
                clean = g.score(xv)
                scores = {k: g.score(v) for k, v in adv.items()}
            rep = g.fit_report
            rows[name] = {"square_queries": queries, "cw_steps": steps, "attack_size": size,
                          "auroc": {k: auroc(clean, s, bootstrap=0)[0] for k, s in scores.items()},
                          "tpr": {k: float((s > g.threshold).float().mean()) for k, s in scores.items()},
                          "fpr": float((clean > g.threshold).float().mean()),
                          "self_attacks": {"succeeded": rep["self_attacks"]["succeeded"], "attempted": rep["self_attacks"]["attempted"]},
                          "fit_seconds": rep["seconds"]}
            print(arch, name, {k: round(v, 3) for k, v in rows[name]["auroc"].items()}, f"fpr {rows[name]['fpr']:.3f}",
                  {k: round(v, 1) for k, v in rep["seconds"].items()}, flush=True)
        result["archs"][arch] = {"n_successful": {k: len(v) for k, v in adv.items()}, "variants": rows}
        attacks = list(adv)
        lines += [f"## {arch}", "", "| fit | " + " | ".join(f"{a} (n={len(adv[a])})" for a in attacks) + " | TPR PGD 0.1 | TPR CW | FPR | fit s |",
                  "|---" * (len(attacks) + 5) + "|"]
        for name, r in rows.items():
            s = r["fit_seconds"]
            lines.append(f"| {name} | " + " | ".join(f"{r['auroc'][a]:.3f}" for a in attacks)
                         + f" | {r['tpr']['PGD 0.1']:.3f} | {r['tpr']['CW']:.3f} | {r['fpr']:.3f} | {s.get('total', 0):.1f} ({s.get('self_attacks', 0):.1f}) |")
        lines += [""] + [f"Successful self-attacks, {name}: " + ", ".join(f"{f} {n}" for f, n in r["self_attacks"]["succeeded"].items()) for name, r in rows.items()] + [""]
    result["seconds"] = time.time() - t0
    out = Path(__file__).resolve().parent / "results"
    (out / f"self-attack-{study}.json").write_text(json.dumps(jsonable(result), indent=2))
    (out / f"self-attack-{study}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
