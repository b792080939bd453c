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

from hfguard.errors import SettingsError

__all__ = ["source_evidence", "margin_evidence", "feature_names", "parse_feature", "evidence_columns", "column_index", "probe_name",
           "neighbour_name"]

#: names of the two sources that are not layers
LOGITS, SPECTRUM = "logits", "spectrum"
_EPS = 1e-4
_KINDS = ("distance", "gap", "nearest")


def probe_name(layer: str) -> str:
    """Name of the evidence source of ``layer``'s linear probe to the logits."""
    return f"{layer}->{LOGITS}"


def neighbour_name(source: str) -> str:
    """Name of the evidence source of ``source``'s nearest-neighbour bank (:mod:`hfguard.neighbours`)."""
    return f"{source}~knn"


def source_evidence(dist: Tensor, pred: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Distance-to-prediction, trajectory gap and distance-to-nearest-class of one source, or of several at once.

    Args:
        dist: (N, K) distances, or (N, S, K) for S sources.
        pred: (N,) predicted classes.

    Returns:
        ``log(d[pred])``, ``log1p(d[pred] - min d)`` and ``log(min d)``, each (N,) or (N, S). A source whose
        distances are all infinite gets an infinite gap (not ``inf - inf``: no NaN, in the values or in the
        gradient of the other features).
    """
    index = pred.reshape(-1, *([1] * (dist.dim() - 1))).expand(*dist.shape[:-1], 1)
    d_pred = dist.gather(-1, index).squeeze(-1)
    d_min = dist.min(-1).values
    gap = torch.where(torch.isinf(d_pred), d_pred, d_pred - d_min)
    return torch.log(d_pred + _EPS), torch.log1p(gap), torch.log(d_min + _EPS)


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
        raise SettingsError(f"unknown evidence feature {name!r} in score_features; expected one of {feature_names(sources)}")
    return kind, list(sources).index(src)


def _column_sources(columns: Sequence[tuple[str, int]]) -> list[int]:
    """The sources the planned columns read, in order (the rows of :func:`evidence_columns`'s stacked distances)."""
    return sorted({src for kind, src in columns if kind != "margin"})


def column_index(columns: Sequence[tuple[str, int]]) -> Tensor:
    """(F,) positions of the planned ``columns`` in the table :func:`evidence_columns` builds: three columns per
    source (distance, gap, nearest) in source order, then the margin."""
    srcs = _column_sources(columns)
    return torch.tensor([3 * len(srcs) if kind == "margin" else 3 * srcs.index(src) + _KINDS.index(kind) for kind, src in columns], dtype=torch.long)


def evidence_columns(columns: Sequence[tuple[str, int]], dists: dict[int, Tensor], logits: Tensor, *, index: Tensor | None = None) -> Tensor:
    """The evidence features named by ``columns`` (see :func:`parse_feature`) as (N, len(columns)).

    Every source's three features are computed at once on the stacked (N, S, K) distances (a fixed number of
    kernels whatever the number of sources, :func:`source_evidence`), then the columns are picked by ``index``
    (:func:`column_index` of ``columns``, built here when not given: pass it to keep a GPU call free of
    host-to-device copies).
    """
    srcs = _column_sources(columns)
    parts = []
    if srcs:
        parts.append(torch.stack(source_evidence(torch.stack([dists[s] for s in srcs], 1), logits.argmax(1)), 2).flatten(1))
    if any(kind == "margin" for kind, _ in columns):
        parts.append(margin_evidence(logits)[:, None])
    table = torch.cat(parts, 1)
    if index is None:
        index = column_index(columns)
    return table.index_select(1, index.to(table.device))
