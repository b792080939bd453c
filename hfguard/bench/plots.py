"""Benchmark figures: ROC curves per attack (every detector), and clean-vs-adversarial score histograms."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["roc_grid", "histograms"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_grid(run: dict[str, Any], path: str, title: str) -> None:
    """One panel per attack; one ROC curve per detector; a dot at each detector's calibrated operating point."""
    from sklearn.metrics import roc_curve

    plt = _plt()
    attacks = list(run["attacks"])
    dets = run["detectors"]
    cols = 4
    rows = math.ceil(len(attacks) / cols)
    # constrained layout places the figure-level title and axis labels clear of the panels (tight_layout let the
    # y label run over a panel's tick labels)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.9 * rows), squeeze=False, layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(dets) > len(colors):  # zip would silently drop the detectors past the colour cycle's length
        colors = [plt.get_cmap("tab20")(i % 20) for i in range(len(dets))]
    for ax, name in zip(axes.flat, attacks):
        for (dname, d), color in zip(dets.items(), colors):
            m = d["attacks"][name]
            pos = m["_scores"].double().cpu().numpy()
            if len(pos) == 0:
                continue
            neg = d["_clean_scores"].double().cpu().numpy()
            fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])
            lw = 2.2 if dname == "hfguard" else 1.1
            ax.plot(fpr, tpr, color=color, lw=lw, label=f"{dname} ({m['auroc']:.3f})")
            ax.plot([d["clean_fpr"]], [m["tpr"]], "o", color=color, ms=4)
        a = run["attacks"][name]
        ax.plot([0, 1], [0, 1], "--", color="lightgrey", lw=0.8)
        ax.set_title(f"{name}\nsuccess {a['success_rate']:.2f}, n={a['n_successful']}", fontsize=8.5)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.tick_params(labelsize=7)
        if a["n_successful"]:
            ax.legend(fontsize=5.6, loc="lower right")
        else:
            ax.text(0.5, 0.5, "no successful adversarials", ha="center", va="center", fontsize=8, color="grey")
    for ax in list(axes.flat)[len(attacks):]:
        ax.axis("off")
    fig.supxlabel("false-positive rate on clean test images (dot: calibrated threshold)", fontsize=9)
    fig.supylabel("true-positive rate on successful adversarials", fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def histograms(run: dict[str, Any], path: str, title: str, attacks: list[str] | None = None) -> None:
    """Rows: detectors; columns: attacks (default: strongest and weakest PGD, CW). Clean vs adversarial scores, threshold dashed."""
    plt = _plt()
    names = list(run["attacks"])
    if attacks is None:
        pgds = [a for a in names if a.startswith("PGD-Linf")]
        attacks = [pgds[0], pgds[-1]] + [a for a in names if a.startswith("CW-L2")]
    dets = run["detectors"]
    fig, axes = plt.subplots(len(dets), len(attacks), figsize=(3.6 * len(attacks), 1.75 * len(dets)), squeeze=False, layout="constrained")
    for r, (dname, d) in enumerate(dets.items()):
        neg = d["_clean_scores"].double().cpu().numpy()
        for c, name in enumerate(attacks):
            ax = axes[r, c]
            pos = d["attacks"][name]["_scores"].double().cpu().numpy()
            both = np.r_[neg, pos]
            lo, hi = np.quantile(both, [0.005, 0.995])
            # heavy right tails would squash the clean mass: show 2.5x the bulk of the clean range (its 95th percentile or the threshold), clip the rest into the last bin
            hi = min(hi, lo + 2.5 * (max(np.quantile(neg, 0.95), d["threshold"]) - lo))
            if hi <= lo:
                lo, hi = lo - 1, hi + 1
            bins = np.linspace(lo, hi, 40)
            ax.hist(np.clip(neg, lo, hi), bins=bins, density=True, alpha=0.55, label="clean", color="tab:blue")
            if len(pos):
                ax.hist(np.clip(pos, lo, hi), bins=bins, density=True, alpha=0.55, label="adversarial", color="tab:red")
            if lo <= d["threshold"] <= hi:
                ax.axvline(d["threshold"], color="k", ls="--", lw=0.8)
            ax.set_yticks([])
            ax.tick_params(labelsize=6)
            if r == 0:
                ax.set_title(name, fontsize=8.5)
            if c == 0:
                ax.set_ylabel(dname, fontsize=7, rotation=0, ha="right", va="center")
            a = d["attacks"][name]["auroc"]
            ax.text(0.98, 0.9, "AUROC n/a" if a is None or a != a else f"AUROC {a:.3f}", transform=ax.transAxes, ha="right", va="top", fontsize=6.5)
    axes[0, 0].legend(fontsize=6, loc="upper left")
    fig.suptitle(title + " (x range: 2.5x the clean bulk, larger scores piled in the last bin; dashed: threshold)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
