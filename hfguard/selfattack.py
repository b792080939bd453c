"""Attacks the guard generates on its own clean data during ``fit`` (``calibration="self-attack"``).

The user gives clean data only.  To learn which evidence exposes attacks on *this* model, ``fit``
attacks a bounded sample of those clean images with the model's own gradients (and one gradient-free
family) and keeps the successful adversarials.  Each image gets one family (so the cost per image is one
to ``2 * steps + 5`` gradient steps for FGSM and PGD, ``CW_STEPS`` for CW, and up to ``SQUARE_QUERIES``
forward passes for the random search) with a budget drawn at random:

* ``strong``: FGSM and 8-step PGD under L-inf (budget uniform in ``[0.01, 0.15]`` of the pixel
  range) and 8-step PGD under L2 (radius uniform in ``[0.01, 0.15] * sqrt(C*H*W) / 2`` of the range);
* ``boundary``: minimal adversarials (:func:`hfguard.attacks.boundary_pgd`, frozen at the first
  misclassified iterate) under both norms, and ``cw-l2``: Carlini-Wagner L2 (:func:`hfguard.attacks.cw_l2`,
  ``c = 1`` for pixels in ``[0, 1]``, ``CW_STEPS`` Adam steps, the smallest successful iterate), which has no budget and lands just
  across the boundary, closer than frozen PGD does; by default it takes the place of minimal PGD L2
  (:data:`DEFAULT_FAMILIES`; measured in ``benchmarks/self_attack_families.py``);
* ``square-linf`` (in the ``strong`` regime): a gradient-free random search (:func:`hfguard.attacks.square_linf`,
  Square attack's proposals, ``SQUARE_QUERIES`` queries, stopping at the first misclassification; budget uniform in
  :data:`SQUARE_LINF_RANGE`, 0.06-0.15 of the pixel range). Its
  perturbations fill the L-inf ball with blocks and stripes, unlike any gradient attack's; without it, heads
  learnt from gradient attacks leaned on evidence that a query attack hardly moves (on the Fashion-MNIST
  ResNet, torchattacks' Square fell from 0.978 to 0.957 AUROC when the linear probes came in,
  ``benchmarks/square_diagnosis.py``).

Attacks run in pixel space (the guard's ``normalize`` is applied inside ``model``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hfguard.attacks import boundary_pgd, cw_l2, fgsm, pgd, square_linf
from hfguard.errors import SettingsError

__all__ = ["FAMILIES", "DEFAULT_FAMILIES", "REGIMES", "LINF_RANGE", "SQUARE_LINF_RANGE", "SQUARE_QUERIES", "CW_STEPS", "SelfAttacks", "self_attacks", "resolve_families"]

#: family -> regime. Each family gets one combiner head; a family with too few successes learns from its regime's.
FAMILIES = {
    "fgsm-linf": "strong",
    "pgd-linf": "strong",
    "pgd-l2": "strong",
    "boundary-linf": "boundary",
    "boundary-l2": "boundary",
    "cw-l2": "boundary",
    "square-linf": "strong",
}
REGIMES = ("strong", "boundary")
#: what ``attack_families="auto"`` generates: every family but ``boundary-l2``, whose place ``cw-l2`` took in 0.6 (on a
#: validation split all seven heads cost the strong rows more than six did: ``benchmarks/self_attack_families.py``)
DEFAULT_FAMILIES = ("fgsm-linf", "pgd-linf", "pgd-l2", "boundary-linf", "cw-l2", "square-linf")
LINF_RANGE = (0.01, 0.15)
#: L-inf budgets of the ``square-linf`` family (fraction of the pixel range). Its lower end is higher than the gradient
#: families': 200 queries rarely succeed below 0.06, so those images only cost queries. On a validation split
#: (``benchmarks/self_attack_strength.py --study square-budget``) 0.06-0.15 instead of 0.01-0.15 lifted the ResNet's
#: Square AUROC from 0.982 to 0.988 (successes 184 -> 249 of 300) and cut its self-attacks from 31 to 26 s; the CNN's rows moved by 0.001.
SQUARE_LINF_RANGE = (0.06, 0.15)
#: queries of the ``square-linf`` family per image (each one forward pass of the images not yet misclassified)
SQUARE_QUERIES = 200
#: Adam steps (learning rate 0.03 in tanh space) of the ``cw-l2`` family
CW_STEPS = 30


@dataclass
class SelfAttacks:
    """Successful self-generated adversarials.

    Attributes:
        pixels: (M, C, H, W) adversarial pixel images that the model misclassifies.
        family: (M,) index into ``list(FAMILIES)``.
        source: (M,) row of the clean image each adversarial came from.
        budget: (M,) the budget it was drawn (L-inf or L2, by family; for ``cw-l2``, which has none, the L2 size it reached).
        attempted: images attacked per family.
        succeeded: successful adversarials per family.
    """

    pixels: Tensor
    family: Tensor
    source: Tensor
    budget: Tensor
    attempted: dict[str, int]
    succeeded: dict[str, int]

    def family_mask(self, family: str) -> Tensor:
        """(M,) bool: rows of ``family``."""
        return self.family == list(FAMILIES).index(family)

    def regime_mask(self, regime: str) -> Tensor:
        """(M,) bool: rows whose family belongs to ``regime``."""
        ids = [i for i, r in enumerate(FAMILIES.values()) if r == regime]
        return torch.isin(self.family, torch.tensor(ids))


def resolve_families(setting: str | tuple[str, ...] | list[str]) -> list[str]:
    """``"auto"`` (:data:`DEFAULT_FAMILIES`), ``"all"`` or a list of names, as a list in :data:`FAMILIES` order (the heads' order)."""
    chosen = DEFAULT_FAMILIES if setting == "auto" else tuple(FAMILIES) if setting == "all" else setting
    if isinstance(chosen, str) or not isinstance(chosen, (tuple, list)) or not chosen or any(f not in FAMILIES for f in chosen):
        raise SettingsError(f"attack_families must be 'auto', 'all' or a non-empty list from {list(FAMILIES)}, got {setting!r}")
    return [f for f in FAMILIES if f in chosen]


def self_attacks(
    model: Callable[[Tensor], Tensor],
    pixels: Tensor,
    labels: Tensor,
    *,
    lo: float = 0.0,
    hi: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    steps: int = 8,
    families: tuple[str, ...] | list[str] | None = None,
    on_batch: Callable[[str, int], None] | None = None,
) -> SelfAttacks:
    """Attacks ``pixels`` (N, C, H, W) with true ``labels``; image ``i`` gets family ``families[i % len(families)]``.

    Args:
        model: pixels -> logits (differentiable).
        pixels: clean images in ``[lo, hi]``.
        labels: (N,) true classes.
        lo, hi: the pixel box.
        seed: seed of the budgets and random starts.
        batch_size: images per attack batch.
        steps: PGD steps (boundary attacks take up to ``2 * steps + 4``; the random search ``SQUARE_QUERIES`` forward passes).
        families: names from :data:`FAMILIES` to generate (default :data:`DEFAULT_FAMILIES`; e.g. leave one out
            to measure how the guard does on an attack family it never generated).
        on_batch: called as each batch starts, with its family and its number of images (``fit`` drives its
            progress bar with it, naming the family at work: the self-attacks can take far longer than the statistics pass).

    Returns:
        The successful adversarials and per-family counts.
    """
    names = list(DEFAULT_FAMILIES) if families is None else list(families)
    unknown = [f for f in names if f not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"families must be a non-empty list from {list(FAMILIES)}, got {families!r}")
    scale = hi - lo
    gen = torch.Generator().manual_seed(seed)
    n = pixels.shape[0]
    family = torch.arange(n) % len(names)
    u = torch.rand(n, generator=gen)
    linf = scale * (LINF_RANGE[0] + (LINF_RANGE[1] - LINF_RANGE[0]) * u)
    l2 = linf * (pixels[0].numel() ** 0.5) / 2
    sq_linf = scale * (SQUARE_LINF_RANGE[0] + (SQUARE_LINF_RANGE[1] - SQUARE_LINF_RANGE[0]) * u)
    out_x, out_f, out_i, out_b = [], [], [], []
    attempted, succeeded = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    for f, name in enumerate(names):
        idx = (family == f).nonzero().flatten()
        for start in range(0, len(idx), batch_size):
            j = idx[start : start + batch_size]
            if on_batch is not None:
                on_batch(name, len(j))
            x = pixels[j]
            y = labels[j].to(x.device)
            e_inf, e_2 = linf[j].to(x.device, x.dtype), l2[j].to(x.device, x.dtype)
            if name == "fgsm-linf":
                adv = fgsm(model, x, y, e_inf, lo=lo, hi=hi)
            elif name == "pgd-linf":
                adv = pgd(model, x, y, e_inf, steps=steps, seed=seed + start, lo=lo, hi=hi)
            elif name == "pgd-l2":
                adv = pgd(model, x, y, e_2, steps=steps, norm="2", seed=seed + start, lo=lo, hi=hi)
            elif name == "cw-l2":
                # c in units of the pixel range squared: CW's distance term is in pixels, its margin term is not
                adv = cw_l2(model, x, y, c=scale**2, steps=CW_STEPS, lr=0.03, lo=lo, hi=hi)
            elif name == "square-linf":
                e_inf = sq_linf[j].to(x.device, x.dtype)
                adv = square_linf(model, x, y, e_inf, queries=SQUARE_QUERIES, lo=lo, hi=hi, seed=seed + start)
            elif name == "boundary-linf":
                adv = boundary_pgd(model, x, y, e_inf, steps=2 * steps + 4, lo=lo, hi=hi)
            else:
                adv = boundary_pgd(model, x, y, e_2, steps=2 * steps + 4, norm="2", lo=lo, hi=hi)
            with torch.no_grad():
                ok = model(adv).argmax(1) != y
            attempted[name] += len(j)
            succeeded[name] += int(ok.sum())
            out_x.append(adv[ok].detach())
            out_f.append(torch.full((int(ok.sum()),), list(FAMILIES).index(name), dtype=torch.long))
            out_i.append(j[ok.cpu()])
            # cw-l2 has no budget: the L2 size it reached
            budget = (adv - x).flatten(1).norm(dim=1).cpu() if name == "cw-l2" else (l2 if name.endswith("l2") else sq_linf if name == "square-linf" else linf)[j]
            out_b.append(budget[ok.cpu()])
    if not out_x:  # no image to attack
        return SelfAttacks(pixels[:0], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0), attempted, succeeded)
    return SelfAttacks(torch.cat(out_x), torch.cat(out_f), torch.cat(out_i), torch.cat(out_b), attempted, succeeded)
