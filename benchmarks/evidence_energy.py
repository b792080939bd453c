"""Would directional "energy" evidence help the combiner? Measured on a VALIDATION split (never the bench's images).

The paper's claim 3 says the perturbation is mostly HF patterns: the spectrum source's class distances see
any deviation, in any direction, of the 54 HF block log-powers, mixed with their natural spread. This script
asks whether the heads gain from a few directional scalars added to the guard's own evidence columns:

* ``HF energy``: the mean HF block log-power of the input, and ``HF max``: the largest one;
* ``logit energy``: ``logsumexp`` of the logits;
* ``activation energy``: the sum over watched layers of the log mean square of the pooled features.

For each Fashion-MNIST model a guard is fitted as the README shows (training split, ``calibration_data`` = the
5000 held-out training images). Its own evidence columns (every source's three + the margin, probes included)
plus the extra columns are standardised per predicted class on the first half of the calibration split, one
head per self-attack family is fitted on attacks of 2000 training images (``hfguard.selfattack``, the
guard's families), each head's clean tail aligned as ``fit`` does, and the threshold set at 5 % on the second
half. The same recipe without extra columns is the baseline. AUROC over the successful adversarials of test
images 5000-5999 (the bench reports on 0-999). These are head refits on the guard's features, not full fits:
the comparison between rows is the point, not the absolute numbers.

Run:  python benchmarks/evidence_energy.py
Writes benchmarks/results/evidence-energy.{json,md}.
"""

from __future__ import annotations

import torch
from combiner_validation import experiment_attacks, head_refit_row, validation_experiment, write_results  # benchmarks/

import hfguard
from hfguard.data import cached_model
from hfguard.fitting import _model_input

EXTRAS = {
    "HF energy": lambda logits, feats: feats[-1].double().mean(1),
    "HF max": lambda logits, feats: feats[-1].double().max(1).values,
    "logit energy": lambda logits, feats: torch.logsumexp(logits.double(), 1),
    "activation energy": lambda logits, feats: torch.stack([torch.log(f.double().square().mean(1) + 1e-6) for f in feats[:-2]], 1).sum(1),
}
VARIANTS = {
    "guard's evidence (baseline)": [],
    "+ HF energy, HF max": ["HF energy", "HF max"],
    "+ logit energy": ["logit energy"],
    "+ activation energy": ["activation energy"],
    "+ all four": list(EXTRAS),
}


def columns(guard, pixels: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """The guard's evidence columns followed by every extra column (N, F + 4), and the predictions."""
    evs, preds = [], []
    with guard._eval_model(), torch.no_grad():
        for i in range(0, len(pixels), batch):
            logits, feats = guard._features(_model_input(guard, pixels[i : i + batch]))
            feats = [f.float() for f in feats]
            ev = guard._evidence(logits, guard._source_distances(feats)).double()
            extra = torch.stack([f(logits, feats) for f in EXTRAS.values()], 1)
            evs.append(torch.cat([ev, extra], 1))
            preds.append(logits.argmax(1))
    return torch.cat(evs), torch.cat(preds)


def main(attack_images: int = 2000) -> None:
    t0, train, validation, xv, yv, result = validation_experiment("python benchmarks/evidence_energy.py")
    md = ["# Directional energy evidence: head refits on a validation split", "",
          "Command: `python benchmarks/evidence_energy.py` (see its docstring). AUROC over successful adversarials of Fashion-MNIST "
          "test images 5000-5999; TPR on PGD 0.1 and the clean FPR at the 5 % threshold on the validation images.", ""]
    for arch in ("cnn", "resnet"):
        model = cached_model("fashion-mnist", arch)
        guard = hfguard.protect(model, progress=False).fit(train, calibration_data=validation)
        nf = len(guard.score_columns)
        sa, adv = experiment_attacks(model, guard.attack_families, train, xv, yv, attack_images)
        e_cal, p_cal = columns(guard, validation[0])
        e_sa, p_sa = columns(guard, sa.pixels)
        e_val, p_val = columns(guard, xv)
        e_adv = {k: columns(guard, v) for k, v in adv.items()}
        rows = {}
        for name, extra in VARIANTS.items():
            keep = list(range(nf)) + [nf + list(EXTRAS).index(e) for e in extra]

            def cols(e: tuple, keep=keep) -> tuple:
                return e[0][:, keep], e[1]

            row = head_refit_row(guard.attack_families, sa.family_mask, 10, cols((e_cal, p_cal)), cols((e_sa, p_sa)), cols((e_val, p_val)),
                                 {k: cols(v) for k, v in e_adv.items()})
            rows[name] = row
            print(arch, name, {k: round(v, 3) for k, v in row.items()}, flush=True)
        result["models"][arch] = {"layers": guard.layers, "families": guard.attack_families, "successful": {k: len(v) for k, v in adv.items()}, "rows": rows}
        keys = list(next(iter(rows.values())))
        md += [f"## {arch} (successful validation adversarials {({k: len(v) for k, v in adv.items()})})", "",
               "| evidence | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        md += [f"| {n} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |" for n, r in rows.items()] + [""]
    write_results("evidence-energy", result, md, t0)


if __name__ == "__main__":
    main()
