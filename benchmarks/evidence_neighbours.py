"""Which per-class nearest-neighbour evidence pays for its cost? Head refits on a VALIDATION split (never the bench's images).

``evidence_density.py`` measured that a per-class kNN source (5 nearest of 200 training images per class, on every
watched layer and the logits) lifts the hard rows (PGD 0.03, L2) by 0.01 AUROC on both Fashion-MNIST models. Its cost
at ``check`` time is one product with the whole bank per source: K x (images per class) x D multiply-adds per image
and source. This script measures the smaller variants a default could afford, with the recipe of ``evidence_density.py``
(the guard fitted as the README shows; its evidence plus the variant's three columns per source -- distance to the
predicted class, trajectory gap, distance to the nearest class, :func:`hfguard.evidence.source_evidence` --
standardised per predicted class; one head per self-attack family; the threshold at 5 % on a second calibration half):

* the bank size per class (200, 50, 20) and the neighbours averaged (5, 3, 1);
* the space: features standardised per dimension (``std``), or whitened by the guard's own shared class covariance
  (``white``: the vector the guard's class distances already compute);
* which sources get a bank: every watched layer and the logits, the first layer and the logits, one of them.

Run:  python benchmarks/evidence_neighbours.py
Writes benchmarks/results/evidence-neighbours.{json,md}.
"""

from __future__ import annotations

import torch
from combiner_validation import experiment_attacks, head_refit_row, validation_experiment, write_results  # benchmarks/
from evidence_density import pooled

import hfguard
from hfguard.data import cached_model
from hfguard.evidence import source_evidence

FIT_IMAGES = 20000


class ClassBank:
    """Per class, the mean squared distance (over the dimension) to the ``kk`` nearest of ``per`` training features."""

    def __init__(self, z: torch.Tensor, y: torch.Tensor, k: int, per: int, kk: int, space: str, gaussian=None) -> None:
        self.kk, self.space, self.g = kk, space, gaussian
        z = self._embed(z.float(), fit=True)
        g = torch.Generator().manual_seed(0)
        rows = [z[y == c][torch.randperm(int((y == c).sum()), generator=g)[:per]] for c in range(k)]
        self.bank = torch.stack(rows)  # (K, per, D)
        self.sq = self.bank.square().sum(-1)  # (K, per)

    def _embed(self, z: torch.Tensor, fit: bool = False) -> torch.Tensor:
        if self.space == "white":
            return (z - self.g.center) @ self.g.whitener
        if fit:
            self.mean, self.std = z.mean(0), z.std(0) + 1e-6
        return (z - self.mean) / self.std

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        q = self._embed(q.float())
        k, per, d = self.bank.shape
        sq = (q.square().sum(1, keepdim=True) - 2 * q @ self.bank.reshape(-1, d).T + self.sq.reshape(1, -1)).clamp_min(0)
        return sq.reshape(-1, k, per).topk(self.kk, dim=2, largest=False).values.mean(2).double() / d


def main(attack_images: int = 2000) -> None:
    t0, train, validation, xv, yv, result = validation_experiment("python benchmarks/evidence_neighbours.py")
    md = ["# Per-class nearest-neighbour evidence: which variant pays for its cost (head refits on a validation split)", "",
          "Command: `python benchmarks/evidence_neighbours.py` (see its docstring). AUROC over successful adversarials of "
          "Fashion-MNIST test images 5000-5999; TPR on PGD 0.1 and the clean FPR at the 5 % threshold on the validation images. "
          f"Banks drawn from the pooled features of the first {FIT_IMAGES} training images. `per/kk`: training images per class "
          "in the bank / neighbours averaged; MACs: multiply-adds per image of the banks' products.", ""]
    for arch in ("cnn", "resnet"):
        model = cached_model("fashion-mnist", arch)
        guard = hfguard.protect(model, progress=False).fit(train, calibration_data=validation)
        k, L = guard.layout["num_classes"], len(guard.layers)
        _, f_tr = pooled(guard, train[0][:FIT_IMAGES])
        y_tr = train[1][:FIT_IMAGES]
        every = list(range(L + 1))
        variants = {
            "std 200/5, layers + logits": ("std", 200, 5, every),
            "std 50/3, layers + logits": ("std", 50, 3, every),
            "white 50/3, layers + logits": ("white", 50, 3, every),
            "std 20/3, layers + logits": ("std", 20, 3, every),
            "std 50/1, layers + logits": ("std", 50, 1, every),
            "std 50/3, first layer + logits": ("std", 50, 3, [0, L]),
            "std 50/3, first layer": ("std", 50, 3, [0]),
            "std 50/3, last layer": ("std", 50, 3, [L - 1]),
            "std 50/3, logits": ("std", 50, 3, [L]),
        }
        banks = {name: [(s, ClassBank(f_tr[s], y_tr, k, per, kk, space, guard.gaussians[s])) for s in srcs]
                 for name, (space, per, kk, srcs) in variants.items()}
        dims = [int(f.shape[1]) for f in f_tr[: L + 1]]
        macs = {name: sum(k * per * dims[s] for s in srcs) for name, (_, per, _, srcs) in variants.items()}
        sa, adv = experiment_attacks(model, guard.attack_families, train, xv, yv, attack_images)

        def columns(pixels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            ev, feats = pooled(guard, pixels)
            pred = feats[L].argmax(1)
            out = {"guard": ev}
            with torch.no_grad():
                for name, per_source in banks.items():
                    out[name] = torch.cat([torch.stack(source_evidence(b(feats[s]), pred), 1) for s, b in per_source], 1)
            return out, pred

        e_cal, e_sa, e_val = columns(validation[0]), columns(sa.pixels), columns(xv)
        e_adv = {name: columns(v) for name, v in adv.items()}
        rows = {}
        for variant in ["baseline", *variants]:
            def cols(e: tuple, extra=variant) -> tuple:
                return torch.cat([e[0]["guard"], *([] if extra == "baseline" else [e[0][extra]])], 1), e[1]

            row = head_refit_row(guard.attack_families, sa.family_mask, k, cols(e_cal), cols(e_sa), cols(e_val),
                                 {name: cols(v) for name, v in e_adv.items()})
            row["MACs"] = macs.get(variant, 0)
            rows[variant] = row
            print(arch, variant, {n: round(v, 3) for n, v in row.items()}, flush=True)
        result["models"][arch] = {"layers": guard.layers, "feature_dims": dims, "families": guard.attack_families,
                                  "successful": {n: len(v) for n, v in adv.items()}, "rows": rows}
        keys = [c for c in next(iter(rows.values())) if c != "MACs"]
        md += [f"## {arch} (watched {guard.layers}, feature dims {dims} (layers, logits); successful validation adversarials "
               f"{({n: len(v) for n, v in adv.items()})})", "",
               "| evidence | " + " | ".join(keys) + " | MACs per image |", "|---|" + "---|" * (len(keys) + 1)]
        md += [f"| {n} | " + " | ".join(f"{r[c]:.3f}" for c in keys) + f" | {r['MACs'] / 1e6:.2f}M |" for n, r in rows.items()] + [""]
    write_results("evidence-neighbours", result, md, t0)


if __name__ == "__main__":
    main()
