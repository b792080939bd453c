"""Per-class standardisation of clean evidence, and the threshold.

Each evidence feature is standardised with its mean and standard deviation on
held-out clean data *of the predicted class* (what is normal depends on the
class); :mod:`hfguard.combiner` turns the standardised vector into one score.
The threshold is the ``1 - fpr`` quantile of the scores of clean images that
took no part in fitting the combiner: with ``calibration_data`` the images
that also set the standardiser (a few numbers per class and feature; fitting
them on the same rows raised the false-alarm rate on unseen images by about
0.004 over a split, at half the threshold's noise, in
``benchmarks/standardiser_source.py``), else a half of the fit hold-out that
set neither.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fit_standardizer", "standardize", "threshold_at_fpr"]

#: a class's standard deviation is floored at this fraction of the feature's pooled one
RELATIVE_FLOOR = 0.05


def fit_standardizer(evidence: Tensor, pred: Tensor, num_classes: int, min_count: int = 100, *,
                     prior: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Per predicted class, mean and standard deviation of clean evidence (N, F).

    What is normal depends on the class (a low margin is ordinary for a shirt,
    rare for trousers), so each predicted class gets its own statistics;
    classes with fewer than ``min_count`` samples are shrunk, in proportion to
    their count, towards the statistics pooled over every class or, when given,
    towards the class's own ``prior`` statistics.

    A class's standard deviation is floored at ``RELATIVE_FLOOR`` times the
    feature's pooled one: a feature that is constant within a class (the
    trajectory gap is exactly 0 when the nearest class is the predicted one)
    would otherwise turn any deviation into an enormous z-score.

    Args:
        evidence: (N, F) clean evidence.
        pred: (N,) predicted classes.
        num_classes: K.
        min_count: samples a class needs for statistics of its own alone.
        prior: ``(mean, std)``, each (K, F), to shrink towards instead of the pooled statistics (``fit`` passes the
            fit hold-out's when it standardises on ``calibration_data``, so a class with few calibration images keeps
            mostly its fit statistics); with a prior, fewer than two rows in all is allowed (the prior is returned).

    Returns:
        ``mean`` and ``std``, each (K, F).
    """
    if prior is not None and len(evidence) < 2:
        return prior[0].clone(), prior[1].clone()
    g_mean, g_std = evidence.mean(0), evidence.std(0).clamp_min(1e-6)
    floor = RELATIVE_FLOOR * g_std
    if prior is None:
        mean, std = g_mean.repeat(num_classes, 1), g_std.repeat(num_classes, 1)
    else:
        mean, std = prior[0].to(evidence.dtype).clone(), torch.maximum(prior[1].to(evidence.dtype), floor)
    for c in range(num_classes):  # each class reads and rewrites only its own row
        rows = evidence[pred == c]
        if len(rows) < 2:
            continue
        w = min(1.0, len(rows) / min_count)
        mean[c] = w * rows.mean(0) + (1 - w) * mean[c]
        std[c] = torch.maximum(w * rows.std(0) + (1 - w) * std[c], floor)
    return mean, std


def standardize(evidence: Tensor, pred: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(evidence - mean[pred]) / std[pred]``: evidence (N, F) in units of its predicted class's clean spread."""
    return (evidence - mean[pred]) / std[pred]


def threshold_at_fpr(clean_scores: Tensor, fpr: float) -> float:
    """The ``1 - fpr`` quantile of clean scores: flagging ``score > t`` flags about ``fpr`` of clean inputs."""
    return float(torch.quantile(clean_scores.double(), 1.0 - fpr))
