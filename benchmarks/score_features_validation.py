"""Which evidence should the score combine? Measured on a VALIDATION split, never on the bench's test images.

The bench tests on the first 1000 Fashion-MNIST test images; this script attacks test images 5000-5999
(disjoint), so choosing ``score_features`` from it does not tune on the reported numbers.

Run:  python benchmarks/score_features_validation.py
(Measured for the clean-only combiner, `calibration="clean"`, with the models of that time, trained on all 60000 images; the
default self-attack combiner weighs every feature itself, see the bench.)
Writes benchmarks/results/score-features-validation.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import hfguard
from hfguard import evidence
from hfguard.attacks import cw_l2, pgd
from hfguard.data import cached_model, load_fashion_mnist
from hfguard.evaluate import auroc, jsonable


def single_features(guard, x_clean, advs) -> dict[str, dict[str, float]]:
    """AUROC of every evidence feature on its own (the guard must be fitted with score_features='all')."""
    names = guard.fit_report["feature_names"]
    plan = [evidence.parse_feature(n, guard.evidence_sources) for n in names]
    if plan != guard.score_columns:
        raise ValueError("fit the guard with score_features='all'")

    def columns(x):
        with torch.no_grad():
            logits, feats = guard._features(x)
            return evidence.evidence_columns(plan, guard._source_distances(feats), logits)

    clean = columns(x_clean)
    cols = {k: columns(v) for k, v in advs.items()}
    return {n: {k: auroc(clean[:, j], cols[k][:, j], bootstrap=0)[0] for k in advs} for j, n in enumerate(names)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    split = load_fashion_mnist()
    x_fit, y_fit = split.x_train[:55000], split.y_train[:55000]
    xv, yv = split.x_test[5000 : 5000 + a.n], split.y_test[5000 : 5000 + a.n]
    result = {"command": "python " + " ".join(sys.argv), "validation_images": f"test[5000:{5000 + a.n}]", "fit_images": 55000, "archs": {}}
    md = ["# Which evidence goes into the score (validation split)", "", f"Command: `{result['command']}`. Validation: Fashion-MNIST test images "
          f"5000-{4999 + a.n} (the bench reports on 0-999). AUROC over successful adversarials only.", ""]
    for arch in ("cnn", "resnet"):
        model = cached_model("fashion-mnist", arch)
        with torch.no_grad():
            correct = model(xv).argmax(1) == yv
        raw = {"PGD-Linf 0.1": pgd(model, xv, yv, 0.1), "PGD-Linf 0.03": pgd(model, xv, yv, 0.03), "CW-L2": cw_l2(model, xv, yv, steps=100)}
        with torch.no_grad():
            advs = {k: v[correct & (model(v).argmax(1) != yv)] for k, v in raw.items()}
        allg = hfguard.protect(model, progress=False, score_features="all", calibration="clean").fit((x_fit, y_fit))
        layers = allg.layers
        first, last = layers[0], layers[-1]
        sets = {
            "auto (first layer + margin)": "auto",
            "first layer + last layer distance + margin": [f"{first}:distance", f"{first}:gap", f"{first}:nearest", f"{last}:distance", "margin"],
            "every layer's distance + first-layer gap/nearest + margin": [f"{s}:distance" for s in layers] + [f"{first}:gap", f"{first}:nearest", "margin"],
            "all": "all",
        }
        combos = {}
        for name, sf in sets.items():
            g = allg if sf == "all" else hfguard.protect(model, progress=False, score_features=sf, calibration="clean").fit((x_fit, y_fit))
            clean = g.check(xv).score
            combos[name] = {k: auroc(clean, g.check(v).score, bootstrap=0)[0] for k, v in advs.items()}
        singles = single_features(allg, xv, advs)
        result["archs"][arch] = {"layers": layers, "n_successful": {k: len(v) for k, v in advs.items()}, "combinations": combos, "single_features": singles}
        md += [f"## {arch} (watched layers {layers}; successful adversarials {result['archs'][arch]['n_successful']})", "",
               "| score combines | " + " | ".join(advs) + " |", "|---|" + "---|" * len(advs)]
        md += [f"| {n} | " + " | ".join(f"{v[k]:.3f}" for k in advs) + " |" for n, v in combos.items()]
        md += ["", "| single feature | " + " | ".join(advs) + " |", "|---|" + "---|" * len(advs)]
        md += [f"| {n} | " + " | ".join(f"{v[k]:.3f}" for k in advs) + " |" for n, v in singles.items()]
        md.append("")
    result["seconds"] = time.time() - t0
    out = Path(a.out)
    (out / "score-features-validation.json").write_text(json.dumps(jsonable(result), indent=2))
    (out / "score-features-validation.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
