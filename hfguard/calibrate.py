"""Clean-only combination of the evidence into one score, and its threshold.

No adversarial example is seen here.  Each evidence feature is standardised
with its mean and standard deviation on held-out clean data, and the
standardised vector ``z`` is turned into one score by a smooth maximum,
``t * logsumexp(z / t)``: an input is suspicious when *any* piece of evidence is
far out on the clean distribution (a differentiable min-p-value rule), plus
the mean of the positive parts so that many moderate deviations add up.
The threshold is the ``1 - fpr`` quantile of the scores of a second,
disjoint held-out clean split.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fit_standardizer", "combine", "threshold_at_fpr"]


def fit_standardizer(evidence: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation (floored) per column of clean evidence (N, F)."""
    mean = evidence.mean(0)
    std = evidence.std(0).clamp_min(1e-6)
    return mean, std


def combine(evidence: Tensor, mean: Tensor, std: Tensor, temperature: float = 1.0) -> Tensor:
    """One score per row: smooth maximum plus mean positive part of the standardised evidence.

    Args:
        evidence: (N, F) evidence features.
        mean, std: (F,) clean statistics from :func:`fit_standardizer`.
        temperature: softness of the maximum (-> 0 gives the hard max).

    Returns:
        (N,) scores, higher = more suspicious; differentiable.
    """
    z = (evidence - mean) / std
    smooth_max = temperature * torch.logsumexp(z / temperature, dim=1)
    return smooth_max + z.clamp_min(0).mean(1)


def threshold_at_fpr(clean_scores: Tensor, fpr: float) -> float:
    """The ``1 - fpr`` quantile of clean scores: flagging ``score > t`` flags about ``fpr`` of clean inputs."""
    return float(torch.quantile(clean_scores.double(), 1.0 - fpr))
