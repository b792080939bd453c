"""The attacks the benchmark runs on the bare model: the library's own, and torchattacks as a cross-check."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from hfguard.attacks import cw_l2, fgsm, pgd
from hfguard.bench.config import BenchConfig
from hfguard.bench.peers import require

__all__ = ["own_attacks", "torchattacks_attacks", "run_attacks", "successful", "success_rate"]

Run = Callable[[nn.Module, Tensor, Tensor], Tensor]


def own_attacks(cfg: BenchConfig) -> dict[str, Run]:
    """hfguard's FGSM, PGD L-inf at every ``cfg.eps`` (random start), PGD L2 and CW-L2."""
    steps = cfg.pgd_steps
    out: dict[str, Run] = {f"FGSM eps={cfg.eps_hi}": lambda m, x, y: fgsm(m, x, y, cfg.eps_hi)}
    for e in cfg.eps:
        out[f"PGD-Linf eps={e}"] = lambda m, x, y, e=e: pgd(m, x, y, e, steps=steps)
    out[f"PGD-L2 eps={cfg.l2_eps}"] = lambda m, x, y: pgd(m, x, y, cfg.l2_eps, steps=steps, norm="2")
    out[f"CW-L2 c=1 steps={cfg.cw_steps}"] = lambda m, x, y: cw_l2(m, x, y, c=1.0, steps=cfg.cw_steps)
    return out


def torchattacks_attacks(cfg: BenchConfig) -> dict[str, Run]:
    """The same budgets through torchattacks: PGD (same step size), APGD, CW and the gradient-free Square."""
    ta = require("torchattacks")
    steps = cfg.pgd_steps

    def wrap(make: Callable[[nn.Module], Any]) -> Run:
        def run(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
            # torchattacks' PGD draws its random start from torch's global generator: seed it per batch (and give
            # the caller's state back), so a row does not depend on what ran before it
            with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
                torch.manual_seed(0)
                return make(m)(x, y).detach()

        return run

    out: dict[str, Run] = {}
    for e in (cfg.eps_hi, cfg.eps_lo):
        out[f"torchattacks PGD eps={e}"] = wrap(lambda m, e=e: ta.PGD(m, eps=e, alpha=2.5 * e / steps, steps=steps, random_start=True))
    out[f"torchattacks APGD eps={cfg.eps_hi}"] = wrap(lambda m: ta.APGD(m, norm="Linf", eps=cfg.eps_hi, steps=steps, seed=0))
    out[f"torchattacks CW c=1 steps={cfg.cw_steps}"] = wrap(lambda m: ta.CW(m, c=1, kappa=0, steps=cfg.cw_steps, lr=0.01))
    out[f"torchattacks Square eps={cfg.eps_hi} queries={cfg.square_queries}"] = wrap(
        lambda m: ta.Square(m, norm="Linf", eps=cfg.eps_hi, n_queries=cfg.square_queries, seed=0)
    )
    return out


def run_attacks(model: nn.Module, x: Tensor, y: Tensor, attacks: dict[str, Run], *, batch_size: int = 500, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Runs each attack on ``(x, y)`` in batches: ``{name: {"x": adversarials, "seconds": s}}``."""
    from tqdm.auto import tqdm

    out = {}
    for name, run in tqdm(attacks.items(), desc="attacks", disable=not progress, leave=False):
        t = time.perf_counter()
        xa = torch.cat([run(model, x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)])
        out[name] = {"x": xa, "seconds": time.perf_counter() - t}
    return out


def successful(model: nn.Module, x_adv: Tensor, y: Tensor, correct: Tensor, batch_size: int = 512) -> Tensor:
    """Mask of successful adversarials: the clean image was ``correct`` and its adversarial is misclassified."""
    with torch.no_grad():
        pred = torch.cat([model(x_adv[i : i + batch_size]).argmax(1) for i in range(0, len(x_adv), batch_size)])
    return correct & (pred != y)


def success_rate(ok: Tensor, correct: Tensor) -> float:
    """Fraction of the correctly classified clean images whose adversarial succeeded."""
    return float(ok.sum() / correct.sum().clamp_min(1))
