"""Clean-only combination of the evidence into one score, and its threshold.

No adversarial example is seen here.  Each evidence feature is standardised
with its mean and standard deviation on held-out clean data *of the predicted
class*, and the standardised vector ``z`` is turned into one score by a smooth
maximum, ``t * logsumexp(z / t)``: an input is suspicious when *any* piece of
evidence is far out on the clean distribution of its predicted class (a
differentiable min-p-value rule).
The threshold is the ``1 - fpr`` quantile of the scores of a second,
disjoint held-out clean split.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fit_standardizer", "combine", "threshold_at_fpr"]


def fit_standardizer(evidence: Tensor, pred: Tensor, num_classes: int, min_count: int = 100) -> tuple[Tensor, Tensor]:
    """Per predicted class, mean and standard deviation of clean evidence (N, F).

    What is normal depends on the class (a low margin is ordinary for a shirt,
    rare for trousers), so each predicted class gets its own statistics;
    classes with fewer than ``min_count`` held-out samples are shrunk towards
    the global statistics in proportion to their count.

    Returns:
        ``mean`` and ``std``, each (K, F).
    """
    g_mean, g_std = evidence.mean(0), evidence.std(0).clamp_min(1e-6)
    mean = g_mean.repeat(num_classes, 1)
    std = g_std.repeat(num_classes, 1)
    for c in range(num_classes):
        rows = evidence[pred == c]
        if len(rows) < 2:
            continue
        w = min(1.0, len(rows) / min_count)
        mean[c] = w * rows.mean(0) + (1 - w) * g_mean
        std[c] = (w * rows.std(0) + (1 - w) * g_std).clamp_min(1e-6)
    return mean, std


def combine(evidence: Tensor, pred: Tensor, mean: Tensor, std: Tensor, temperature: float = 1.0) -> Tensor:
    """One score per row: smooth maximum of the class-standardised evidence.

    Args:
        evidence: (N, F) evidence features.
        pred: (N,) predicted classes (select the row of ``mean``/``std``).
        mean, std: (K, F) clean statistics from :func:`fit_standardizer`.
        temperature: softness of the maximum (-> 0 gives the hard max).

    Returns:
        (N,) scores, higher = more suspicious; differentiable w.r.t. ``evidence``.
    """
    z = (evidence - mean[pred]) / std[pred]
    return temperature * torch.logsumexp(z / temperature, dim=1)


def threshold_at_fpr(clean_scores: Tensor, fpr: float) -> float:
    """The ``1 - fpr`` quantile of clean scores: flagging ``score > t`` flags about ``fpr`` of clean inputs."""
    return float(torch.quantile(clean_scores.double(), 1.0 - fpr))
