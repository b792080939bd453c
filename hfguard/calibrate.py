"""Per-class standardisation of clean evidence, and the threshold.

Each evidence feature is standardised with its mean and standard deviation on
held-out clean data *of the predicted class* (what is normal depends on the
class); :mod:`hfguard.combiner` turns the standardised vector into one score.
The threshold is the ``1 - fpr`` quantile of the scores of clean images that
took no part in fitting the standardiser or the combiner.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fit_standardizer", "standardize", "threshold_at_fpr"]

#: a class's standard deviation is floored at this fraction of the feature's pooled one
RELATIVE_FLOOR = 0.05


def fit_standardizer(evidence: Tensor, pred: Tensor, num_classes: int, min_count: int = 100) -> tuple[Tensor, Tensor]:
    """Per predicted class, mean and standard deviation of clean evidence (N, F).

    What is normal depends on the class (a low margin is ordinary for a shirt,
    rare for trousers), so each predicted class gets its own statistics;
    classes with fewer than ``min_count`` held-out samples are shrunk towards
    the global statistics in proportion to their count.

    A class's standard deviation is floored at ``RELATIVE_FLOOR`` times the
    feature's pooled one: a feature that is constant within a class (the
    trajectory gap is exactly 0 when the nearest class is the predicted one)
    would otherwise turn any deviation into an enormous z-score.

    Returns:
        ``mean`` and ``std``, each (K, F).
    """
    g_mean, g_std = evidence.mean(0), evidence.std(0).clamp_min(1e-6)
    floor = RELATIVE_FLOOR * g_std
    mean = g_mean.repeat(num_classes, 1)
    std = g_std.repeat(num_classes, 1)
    for c in range(num_classes):
        rows = evidence[pred == c]
        if len(rows) < 2:
            continue
        w = min(1.0, len(rows) / min_count)
        mean[c] = w * rows.mean(0) + (1 - w) * g_mean
        std[c] = torch.maximum(w * rows.std(0) + (1 - w) * g_std, floor)
    return mean, std


def standardize(evidence: Tensor, pred: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(evidence - mean[pred]) / std[pred]``: evidence (N, F) in units of its predicted class's clean spread."""
    return (evidence - mean[pred]) / std[pred]


def threshold_at_fpr(clean_scores: Tensor, fpr: float) -> float:
    """The ``1 - fpr`` quantile of clean scores: flagging ``score > t`` flags about ``fpr`` of clean inputs."""
    return float(torch.quantile(clean_scores.double(), 1.0 - fpr))
