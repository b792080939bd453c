"""The sums ``fit`` streams: one class-Gaussian accumulator per feature source, one cross moment per probe.

Rows are dicts ``{"source0": (N, D0), ..., "y": (N,), "priority": (N,)}`` (the layout of the held-out reservoir);
every sum is exact and mergeable, so a distributed fit adds them across ranks (:meth:`SourceSums.all_reduce`).
The rows of the sources with a nearest-neighbour bank also feed a class-stratified sample of them
(:class:`hfguard.neighbours.ClassSample`, by the rows' content-hash priority), merged across ranks the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from hfguard.neighbours import ClassSample
from hfguard.probe import CrossMoments, ProbeModel, fit_probe, logit_directions
from hfguard.stats import ClassGaussianAccumulator, GaussianModel

__all__ = ["SourceSums"]


class SourceSums:
    """Streamed statistics of every source and of the probes from the ``probed`` layers to the logits.

    Args:
        num_classes: K.
        dims: feature dimension of each source (layers, logits, spectrum).
        logits: index of the logits among the sources.
        probed: indices of the layers whose probes to the logits are fitted.
        neighboured: indices of the sources whose rows the bank sample keeps.
        per_class: rows per class of that sample.
    """

    def __init__(self, num_classes: int, dims: Sequence[int], logits: int, probed: Sequence[int] = (), neighboured: Sequence[int] = (),
                 per_class: int = 0) -> None:
        self.gaussians = [ClassGaussianAccumulator(num_classes, d) for d in dims]
        self.logits = logits
        self.probed = [int(i) for i in probed]
        self.crosses = [CrossMoments(int(dims[i]), num_classes) for i in self.probed]
        self.neighboured = [int(i) for i in neighboured]
        self.sample = ClassSample(num_classes, per_class, {f"source{i}": int(dims[i]) for i in self.neighboured}) if self.neighboured else None

    @property
    def count(self) -> Tensor:
        """(K,) samples per class in the statistics."""
        return self.gaussians[0].count

    def add(self, rows: dict[str, Tensor]) -> None:
        """Adds stored rows (features of every source and the class) to every sum."""
        for i, acc in enumerate(self.gaussians):
            acc.update(rows[f"source{i}"], rows["y"])
        for i, cross in zip(self.probed, self.crosses):
            cross.update(rows[f"source{i}"], rows[f"source{self.logits}"])
        if self.sample is not None:
            self.sample.offer(rows, rows["priority"])

    def all_reduce(self) -> None:
        """Sums every statistic over the ranks of a distributed fit (no-op otherwise)."""
        for acc in self.gaussians:
            acc.all_reduce()
        for cross in self.crosses:
            cross.all_reduce()
        if self.sample is not None:
            self.sample.merge_ranks()

    def gaussian_models(self) -> list[GaussianModel]:
        """Each source's fitted class Gaussians."""
        return [acc.finalize() for acc in self.gaussians]

    def probe_models(self, dim: int) -> list[ProbeModel]:
        """Each probed layer's fitted probe (at most ``dim`` logit directions)."""
        if not self.probed:
            return []
        proj = logit_directions(self.gaussians[self.logits], dim)  # one eigendecomposition for every layer
        return [fit_probe(self.gaussians[i], self.gaussians[self.logits], c, dim=dim, proj=proj) for i, c in zip(self.probed, self.crosses)]
