"""Honest evaluation of a fitted guard: shared by ``hfguard demo`` and the benchmarks.

Rules it follows:

* only *successful* adversarial examples count (the clean image was classified
  correctly, the adversarial one is not);
* AUROC is computed against every clean test image (misclassified ones too),
  with a bootstrap 95 % interval;
* TPR is read at the guard's own threshold, and the clean FPR measured on the
  test images is reported beside it.

Attacks that know the defence (adaptive attacks) live in :mod:`hfguard.bench.adaptive`.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hfguard.attacks import cw_l2, fgsm, pgd

__all__ = ["Attack", "standard_attacks", "generate", "evaluate_guard", "with_policy", "relative_latency", "auroc", "roc_plot", "format_table", "jsonable"]


@dataclass
class Attack:
    """A named attack: ``run(model, x, y) -> x_adv``."""

    name: str
    run: Callable[[Callable[[Tensor], Tensor], Tensor, Tensor], Tensor]


def standard_attacks(dataset: str, *, cw_steps: int = 100, pgd_steps: int = 40) -> list[Attack]:
    """The attack suite for a dataset (pixel range [0, 1])."""
    if dataset == "digits":
        eps_lo, eps_hi, l2 = 0.05, 0.15, 1.0
    else:
        eps_lo, eps_hi, l2 = 0.03, 0.1, 1.0
    return [
        Attack(f"FGSM eps={eps_hi}", lambda m, x, y: fgsm(m, x, y, eps_hi)),
        Attack(f"PGD-Linf eps={eps_hi}", lambda m, x, y: pgd(m, x, y, eps_hi, steps=pgd_steps)),
        Attack(f"PGD-Linf eps={eps_lo}", lambda m, x, y: pgd(m, x, y, eps_lo, steps=pgd_steps)),
        Attack(f"PGD-L2 eps={l2}", lambda m, x, y: pgd(m, x, y, l2, steps=pgd_steps, norm="2")),
        Attack(f"CW-L2 c=1 steps={cw_steps}", lambda m, x, y: cw_l2(m, x, y, c=1.0, steps=cw_steps)),
    ]


def _finite_order(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scores as their ranks when any is ``+inf`` / ``-inf`` (a guard scores NaN/Inf images ``inf`` under
    ``nonfinite="flag"``): the same order, so the same AUROC. NaN is an error."""
    both = np.r_[neg, pos]
    if np.isnan(both).any():
        raise ValueError(f"scores must not be NaN; got {int(np.isnan(neg).sum())} clean and {int(np.isnan(pos).sum())} attacked NaN scores")
    if np.isfinite(both).all():
        return neg, pos
    from scipy.stats import rankdata

    ranks = rankdata(both)  # ties share a rank; +-inf rank above / below every finite score, whatever its size
    return ranks[: len(neg)], ranks[len(neg) :]


def auroc(neg: Tensor, pos: Tensor, *, bootstrap: int = 200, seed: int = 0) -> tuple[float, float, float]:
    """AUROC of ``pos`` (adversarial) against ``neg`` (clean) scores with a bootstrap 95 % interval (rank-based:
    infinite scores count as above or below every finite one)."""
    from sklearn.metrics import roc_auc_score

    neg_np, pos_np = neg.detach().double().cpu().numpy(), pos.detach().double().cpu().numpy()
    if len(pos_np) == 0 or len(neg_np) == 0:
        return float("nan"), float("nan"), float("nan")
    neg_np, pos_np = _finite_order(neg_np, pos_np)
    labels = np.r_[np.zeros(len(neg_np)), np.ones(len(pos_np))]
    value = float(roc_auc_score(labels, np.r_[neg_np, pos_np]))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(bootstrap):
        n = neg_np[rng.integers(0, len(neg_np), len(neg_np))]
        p = pos_np[rng.integers(0, len(pos_np), len(pos_np))]
        boots.append(roc_auc_score(labels, np.r_[n, p]))
    lo, hi = np.quantile(boots, [0.025, 0.975]) if boots else (value, value)
    return value, float(lo), float(hi)


def with_policy(guard: Any, policy: str) -> Any:
    """A shallow copy of ``guard`` sharing its state, with another policy."""
    other = copy.copy(guard)
    other.policy = policy
    return other


def generate(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, attacks: list[Attack], *, progress: bool = True) -> dict[str, tuple[Tensor, float]]:
    """Runs every attack once on the bare model: ``{name: (x_adv, seconds)}``."""
    from tqdm.auto import tqdm

    out = {}
    for att in tqdm(attacks, desc="attacks", disable=not progress, leave=False):
        t0 = time.perf_counter()
        xa = att.run(model, x, y)
        out[att.name] = (xa, time.perf_counter() - t0)
    return out


def evaluate_guard(
    guard: Any, x: Tensor, y: Tensor, attacks: list[Attack] | dict[str, tuple[Tensor, float]], *, progress: bool = True
) -> dict[str, Any]:
    """Clean and per-attack metrics of a fitted guard on test images ``x`` (pixels in [0, 1]) and labels ``y``.

    ``attacks`` is a list of :class:`Attack` (run here on the bare model) or
    the output of :func:`generate` (to score several guards on the same images).
    """
    model = guard.model
    adversarials = attacks if isinstance(attacks, dict) else generate(model, x, y, attacks, progress=progress)
    flag, filt = with_policy(guard, "flag"), with_policy(guard, "filter")
    clean = flag.check(x)
    clean_f = filt.check(x)
    correct = clean.predicted == y
    out: dict[str, Any] = {
        "n_test": len(x),
        "threshold": guard.threshold,
        "target_fpr": guard.fpr,
        "clean_accuracy": float(correct.float().mean()),
        "clean_accuracy_filter_policy": float((clean_f.predicted == y).float().mean()),
        "clean_fpr": float(clean.flagged.float().mean()),
        "filter_sigma": float(guard.sigma_),
        "attacks": {},
    }
    out["clean_accuracy_cost_filter_policy"] = out["clean_accuracy"] - out["clean_accuracy_filter_policy"]
    for name, (xa, seconds) in adversarials.items():
        va, fa = flag.check(xa), filt.check(xa)
        ok = correct & (va.predicted != y)
        a, lo, hi = auroc(clean.score, va.score[ok])
        n_ok = int(ok.sum())
        rate = (lambda t: float(t[ok].float().mean()) if n_ok else float("nan"))
        out["attacks"][name] = {
            "success_rate": float(ok.sum() / correct.sum().clamp_min(1)),
            "n_successful": n_ok,
            "auroc": a,
            "auroc_ci95": [lo, hi],
            "tpr_at_threshold": rate(va.flagged),
            "accuracy_model": float((va.predicted == y).float().mean()),
            "accuracy_filter_policy": float((fa.predicted == y).float().mean()),
            "restored_by_filter": rate(fa.predicted == y),
            "caught_or_correct": rate(va.flagged | (fa.predicted == y)),
            "origin_is_true_class": rate(va.origin == y),
            "attack_seconds": seconds,
            "_scores": va.score[ok].detach(),
        }
    out["_clean_scores"] = clean.score.detach()
    return out


def relative_latency(base: Callable[[], Any], other: Callable[[], Any], *, repeats: int = 30, warmup: int = 3) -> dict[str, float]:
    """Seconds of ``base()`` and ``other()``, timed as interleaved pairs (alternating order) in the same run.

    ``ratio`` is the median of per-pair ratios, robust to load changes during the run.
    """
    with torch.no_grad():
        for _ in range(warmup):
            base()
            other()
        tb, to = [], []
        for i in range(repeats):
            for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                t = time.perf_counter()
                base() if which == 0 else other()
                (tb if which == 0 else to).append(time.perf_counter() - t)
    return {
        "base_s": statistics.median(tb),
        "other_s": statistics.median(to),
        "ratio": statistics.median(o / b for o, b in zip(to, tb)),
        "ratio_of_minimums": min(to) / min(tb),
        "repeats": repeats,
    }


def roc_plot(result: dict[str, Any], path: str, title: str) -> None:
    """ROC curves (one per attack) with the calibrated operating point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    neg = result["_clean_scores"].double().cpu().numpy()
    fig, ax = plt.subplots(figsize=(6, 5.2))
    for name, r in result["attacks"].items():
        pos = r["_scores"].double().cpu().numpy()
        if len(pos) == 0:
            continue
        fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])
        line = ax.plot(fpr, tpr, label=f"{name} (AUROC {r['auroc']:.3f}, n={len(pos)})")[0]
        ax.plot([result["clean_fpr"]], [r["tpr_at_threshold"]], "o", color=line.get_color())
    ax.axvline(result["target_fpr"], ls=":", color="grey", label=f"target clean FPR {result['target_fpr']:.0%}")
    ax.plot([0, 1], [0, 1], "--", color="lightgrey")
    ax.set_xlabel("false-positive rate on clean test images")
    ax.set_ylabel("true-positive rate on successful adversarials")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7.5)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of :func:`evaluate_guard`'s result."""
    lines = [
        f"clean accuracy {result['clean_accuracy']:.3f} (filter policy {result['clean_accuracy_filter_policy']:.3f}); "
        f"measured clean FPR {result['clean_fpr']:.3f} at target {result['target_fpr']:.2f}; filter sigma {result['filter_sigma']:.2f}",
        "",
        "| attack | success | adv. accuracy | AUROC [95% CI] | TPR @ threshold | filter-policy accuracy | restored by filter | caught or correct |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["attacks"].items():
        lo, hi = r["auroc_ci95"]
        lines.append(
            f"| {name} | {r['success_rate']:.3f} (n={r['n_successful']}) | {r['accuracy_model']:.3f} | {r['auroc']:.3f} [{lo:.3f}, {hi:.3f}] | "
            f"{r['tpr_at_threshold']:.3f} | {r['accuracy_filter_policy']:.3f} | {r['restored_by_filter']:.3f} | {r['caught_or_correct']:.3f} |"
        )
    return "\n".join(lines)


def jsonable(obj: Any) -> Any:
    """``obj`` with private keys (leading ``_``, e.g. raw score tensors) dropped and NaN as ``None``, ready for ``json.dumps``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj
