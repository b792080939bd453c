"""Would class-specific density evidence help the combiner? Measured on a VALIDATION split (never the bench's images).

The guard models each source (watched layer, logits) as class Gaussians with ONE shared covariance (a tied,
LDA-like model): cheap at ``check`` time (one D x D product per source) and well estimated from little data.
This script asks what two richer density models of the same pooled features would add, each as extra sources
whose three evidence columns (distance to the predicted class, trajectory gap, distance to the nearest class;
:func:`hfguard.evidence.source_evidence`) sit beside the guard's own:

* ``QDA``: one covariance per class (shrunk 10 % towards its mean variance), the squared Mahalanobis distance
  to each class under its own covariance (per image: K products of D x D, K times the guard's cost);
* ``kNN``: per class, the mean squared Euclidean distance (features standardised over all classes) to the
  5 nearest of 200 training images of that class (Deep-kNN-like; per image: 200 K distances of length D);
* ``bank kNN``: one bank of M training images whatever the class count (M = 2000 or 500), two columns per
  source instead of three: the log mean squared distance to the 10 nearest (how far from the training data)
  and the share of those 10 whose label is not the predicted class (piecewise constant: no gradient); and
  the distance column alone (differentiable everywhere, what an adaptive attack can follow).

Both are fitted on the pooled features of 20000 training images. The rest is the recipe of
``evidence_energy.py``: a guard fitted as the README shows (training split, ``calibration_data`` = the 5000
held-out training images); its evidence columns plus the extra ones standardised per predicted class on the
first half of the calibration split; one head per self-attack family (attacks of 2000 training images, the
guard's families), each head's clean tail aligned as ``fit`` does; the threshold at 5 % on the second half.
AUROC over the successful adversarials of test images 5000-5999 (the bench reports on 0-999). These are head
refits on the guard's features, not full fits: the comparison between rows is the point.

Run:  python benchmarks/evidence_density.py
Writes benchmarks/results/evidence-density.{json,md}.
"""

from __future__ import annotations

import torch
from combiner_validation import experiment_attacks, head_refit_row, validation_experiment, write_results  # benchmarks/

import hfguard
from hfguard.data import cached_model
from hfguard.evidence import source_evidence
from hfguard.fitting import _model_input

SHRINK, BANK, NEIGHBOURS, FIT_IMAGES, NEIGHBOURS_BANK = 0.1, 200, 5, 20000, 10


class QDA:
    """Class means and per-class whiteners (Cholesky factors of the shrunk precision) of features (N, D)."""

    def __init__(self, z: torch.Tensor, y: torch.Tensor, k: int) -> None:
        z = z.double()
        self.means, whiteners = [], []
        for c in range(k):
            zc = z[y == c]
            a = zc - zc.mean(0)
            s = a.T @ a / len(a)
            s = (1 - SHRINK) * s + SHRINK * s.diagonal().mean() * torch.eye(len(s), dtype=s.dtype)
            self.means.append(zc.mean(0))
            whiteners.append(torch.linalg.cholesky(torch.linalg.inv(s)))
        self.whiteners = whiteners

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        q = q.double()
        return torch.stack([((q - m) @ w).square().sum(1) / q.shape[1] for m, w in zip(self.means, self.whiteners)], 1)


class KNN:
    """Per class, the mean squared distance to the ``NEIGHBOURS`` nearest of ``BANK`` standardised training features."""

    def __init__(self, z: torch.Tensor, y: torch.Tensor, k: int) -> None:
        z = z.double()
        g = torch.Generator().manual_seed(0)
        self.mean, self.std = z.mean(0), z.std(0) + 1e-6
        self.banks = []
        for c in range(k):
            zc = z[y == c]
            self.banks.append((zc[torch.randperm(len(zc), generator=g)[:BANK]] - self.mean) / self.std)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        q = (q.double() - self.mean) / self.std
        return torch.stack([torch.cdist(q, b).topk(NEIGHBOURS, largest=False).values.square().mean(1) / q.shape[1] for b in self.banks], 1)


class Bank:
    """One bank of ``m`` standardised training features, whatever the class count: per query, the log mean squared
    distance to the ``NEIGHBOURS_BANK`` nearest and the share of them labelled other than the predicted class."""

    def __init__(self, z: torch.Tensor, y: torch.Tensor, m: int) -> None:
        z = z.double()
        idx = torch.randperm(len(z), generator=torch.Generator().manual_seed(1))[:m]
        self.mean, self.std = z.mean(0), z.std(0) + 1e-6
        self.bank, self.labels = (z[idx] - self.mean) / self.std, y[idx]

    def __call__(self, q: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        q = (q.double() - self.mean) / self.std
        d, nearest = torch.cdist(q, self.bank).topk(NEIGHBOURS_BANK, largest=False)
        far = torch.log(d.square().mean(1) / q.shape[1] + 1e-6)
        return torch.stack([far, (self.labels[nearest] != pred[:, None]).double().mean(1)], 1)


def pooled(guard, pixels: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The guard's evidence columns (N, F) and the pooled features of every source."""
    evs, feats_all = [], []
    with guard._eval_model(), torch.no_grad():
        for i in range(0, len(pixels), batch):
            logits, feats = guard._features(_model_input(guard, pixels[i : i + batch]))
            feats = [f.float() for f in feats]
            evs.append(guard._evidence(logits, guard._source_distances(feats)).double())
            feats_all.append(feats)
    return torch.cat(evs), [torch.cat(f) for f in zip(*feats_all)]


def main(attack_images: int = 2000) -> None:
    t0, train, validation, xv, yv, result = validation_experiment("python benchmarks/evidence_density.py")
    md = ["# Class-specific density evidence (QDA, kNN): head refits on a validation split", "",
          "Command: `python benchmarks/evidence_density.py` (see its docstring). AUROC over successful adversarials of Fashion-MNIST "
          "test images 5000-5999; TPR on PGD 0.1 and the clean FPR at the 5 % threshold on the validation images. "
          f"QDA: per-class covariance shrunk {SHRINK:.0%}; kNN: {NEIGHBOURS} nearest of {BANK} training images per class; both on the "
          f"pooled features of {FIT_IMAGES} training images, for every watched layer and the logits; bank kNN: the {NEIGHBOURS_BANK} "
          "nearest of one bank of training images (2000 or 500, any class).", ""]
    for arch in ("cnn", "resnet"):
        model = cached_model("fashion-mnist", arch)
        guard = hfguard.protect(model, progress=False).fit(train, calibration_data=validation)
        k = guard.layout["num_classes"]
        _, f_tr = pooled(guard, train[0][:FIT_IMAGES])
        sources = range(len(guard.layers) + 1)  # watched layers and the logits
        models = {"QDA": [QDA(f_tr[s], train[1][:FIT_IMAGES], k) for s in sources], "kNN": [KNN(f_tr[s], train[1][:FIT_IMAGES], k) for s in sources]}
        banks = {f"bank {m}": [Bank(f_tr[s], train[1][:FIT_IMAGES], m) for s in sources] for m in (2000, 500)}
        sa, adv = experiment_attacks(model, guard.attack_families, train, xv, yv, attack_images)

        def columns(pixels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            ev, feats = pooled(guard, pixels)
            pred = feats[len(guard.layers)].argmax(1)
            out = {"guard": ev}
            for name, per_source in models.items():
                out[name] = torch.cat([torch.stack(source_evidence(m(feats[s]), pred), 1) for s, m in zip(sources, per_source)], 1)
            for name, per_source in banks.items():
                out[name] = torch.cat([b(feats[s], pred) for s, b in zip(sources, per_source)], 1)
            out["bank 2000 distance"] = out["bank 2000"][:, 0::2]
            return out, pred

        e_cal, p_cal = columns(validation[0])
        e_sa, p_sa = columns(sa.pixels)
        e_val, p_val = columns(xv)
        e_adv = {name: columns(v) for name, v in adv.items()}
        rows = {}
        variants = {"guard's evidence (baseline)": [], "+ QDA": ["QDA"], "+ kNN": ["kNN"], "+ QDA and kNN": ["QDA", "kNN"],
                    "+ bank kNN (2000 images, distance and disagreement)": ["bank 2000"],
                    "+ bank kNN (2000 images, distance only)": ["bank 2000 distance"],
                    "+ bank kNN (500 images, distance and disagreement)": ["bank 500"]}
        for variant, extra in variants.items():
            def cols(e: tuple, extra=extra) -> tuple:
                return torch.cat([e[0]["guard"], *(e[0][x] for x in extra)], 1), e[1]

            row = head_refit_row(guard.attack_families, sa.family_mask, k, cols((e_cal, p_cal)), cols((e_sa, p_sa)), cols((e_val, p_val)),
                                 {name: cols(v) for name, v in e_adv.items()})
            rows[variant] = row
            print(arch, variant, {n: round(v, 3) for n, v in row.items()}, flush=True)
        dims = [int(f.shape[1]) for f in f_tr[: len(guard.layers) + 1]]
        result["models"][arch] = {"layers": guard.layers, "feature_dims": dims, "families": guard.attack_families,
                                  "successful": {n: len(v) for n, v in adv.items()}, "rows": rows}
        keys = list(next(iter(rows.values())))
        md += [f"## {arch} (watched {guard.layers}, feature dims {dims} + logits; successful validation adversarials "
               f"{({n: len(v) for n, v in adv.items()})})", "",
               "| evidence | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        md += [f"| {n} | " + " | ".join(f"{r[c]:.3f}" for c in keys) + " |" for n, r in rows.items()] + [""]
    write_results("evidence-density", result, md, t0)


if __name__ == "__main__":
    main()
