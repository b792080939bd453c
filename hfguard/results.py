"""What the guard returns: :class:`Verdict` (from ``check``) and :class:`Inspection` (from ``inspect``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from hfguard.evidence import SPECTRUM

__all__ = ["Verdict", "Inspection"]


@dataclass
class Verdict:
    """Result of :meth:`Guard.check` (all tensors have N rows).

    Attributes:
        logits: (N, K) logits; under ``policy="filter"`` the filtered input's logits for the rows in ``filtered``.
        score: (N,) combined score, higher = more adversarial.
        flagged: (N,) bool, ``score > threshold``.
        filtered: (N,) bool, rows that were low-pass filtered and classified again: under ``policy="filter"``
            every flagged row except those flagged only for holding NaN/Inf (``nonfinite="flag"``) whose zeroed
            image is not flagged itself.
        predicted: (N,) class from ``logits``.
        origin: (N,) nearest class expectation at the first watched layer: where the input came from.
    """

    logits: Tensor
    score: Tensor
    flagged: Tensor
    filtered: Tensor
    predicted: Tensor
    origin: Tensor


@dataclass
class Inspection:
    """Result of :meth:`Guard.inspect`: where each source puts the input, layer by layer.

    Attributes:
        sources: names of the sources, in forward order: the watched layers, ``"logits"``, then ``"spectrum"``.
        distances: (N, S, K) normalised squared Mahalanobis distance to each class expectation.
        affinity: (N, S, K) class posterior under each source's Gaussian model (rows sum to 1).
        nearest: (N, S) nearest class per source.
        predicted: (N,) the model's predicted class.
        origin: (N,) nearest class at the first watched layer.
    """

    sources: list[str]
    distances: Tensor
    affinity: Tensor
    nearest: Tensor
    predicted: Tensor
    origin: Tensor

    def trajectory(self, i: int) -> list[tuple[str, int]]:
        """``[(source, nearest class), ...]`` for row ``i``: the path from the origin (first watched layer) through
        the watched layers to the logits, in forward order. The HF spectrum is not a step of the forward pass: its
        nearest class (the input's closest HF signature) is ``nearest[i, sources.index("spectrum")]``."""
        return [(s, int(c)) for s, c in zip(self.sources, self.nearest[i]) if s != SPECTRUM]
