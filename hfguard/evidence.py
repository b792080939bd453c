"""From class distances to evidence features.

Every watched source (each chosen layer, the logits, the input's HF
spectrum, and each layer's linear-probe residual ``"<layer>->logits"``, see
:mod:`hfguard.probe`) gives an (N, K) matrix of normalised squared Mahalanobis distances
to the K class expectations.  For a clean input the predicted class is, at
every source, one of the nearest; an adversarial input keeps pointing to its
origin class in early layers and in its HF spectrum while its late layers
and logits have moved to the target (the paper's trajectory).  Per source
the evidence is

* ``log d[pred]``: how far the input is from the predicted class's expectation;
* ``log(1 + d[pred] - min_c d[c])``: how much closer another class is (the
  trajectory gap, 0 when the source agrees with the prediction);
* ``log min_c d[c]``: how far the input is from *every* class expectation;

plus the decision margin ``-log(logit_1 - logit_2 + 0.01)`` so that minimal
perturbations parked on the decision boundary are caught too.
All functions are differentiable almost everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["source_evidence", "margin_evidence", "feature_names", "parse_feature", "evidence_columns", "probe_name"]

#: names of the two sources that are not layers
LOGITS, SPECTRUM = "logits", "spectrum"
_EPS = 1e-4
_KINDS = ("distance", "gap", "nearest")


def probe_name(layer: str) -> str:
    """Name of the evidence source of ``layer``'s linear probe to the logits."""
    return f"{layer}->{LOGITS}"


def source_evidence(dist: Tensor, pred: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Distance-to-prediction, trajectory gap and distance-to-nearest-class for one source.

    Args:
        dist: (N, K) distances.
        pred: (N,) predicted classes.

    Returns:
        ``log(d[pred])``, ``log1p(d[pred] - min d)`` and ``log(min d)``, each (N,).
    """
    d_pred = dist.gather(1, pred[:, None]).squeeze(1)
    d_min = dist.min(1).values
    return torch.log(d_pred + _EPS), torch.log1p(d_pred - d_min), torch.log(d_min + _EPS)


def margin_evidence(logits: Tensor) -> Tensor:
    """``-log(top1 - top2 + 0.01)`` of the logits: large on the decision boundary."""
    top2 = logits.topk(2, dim=1).values
    return -torch.log(top2[:, 0] - top2[:, 1] + 0.01)


def feature_names(sources: Sequence[str]) -> list[str]:
    """Every evidence feature of the given sources, in order (three per source, then the margin)."""
    names = []
    for s in sources:
        names += [f"{s}:distance", f"{s}:gap", f"{s}:nearest"]
    return names + ["margin"]


def parse_feature(name: str, sources: Sequence[str]) -> tuple[str, int]:
    """``"layer:distance"`` -> ``("distance", source index)``; ``"margin"`` -> ``("margin", -1)``."""
    if name == "margin":
        return "margin", -1
    src, _, kind = name.rpartition(":")
    if kind not in _KINDS or src not in sources:
        raise ValueError(f"unknown evidence feature {name!r}; expected one of {feature_names(sources)}")
    return kind, list(sources).index(src)


def evidence_columns(columns: Sequence[tuple[str, int]], dists: dict[int, Tensor], logits: Tensor) -> Tensor:
    """The evidence features named by ``columns`` (see :func:`parse_feature`) as (N, len(columns))."""
    pred = logits.argmax(1)
    cache: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    cols = []
    for kind, src in columns:
        if kind == "margin":
            cols.append(margin_evidence(logits))
            continue
        if src not in cache:
            cache[src] = source_evidence(dists[src], pred)
        cols.append(cache[src][_KINDS.index(kind)])
    return torch.stack(cols, 1)
