"""An order-independent uniform hold-out sample that returns what it does not keep.

The guard holds out a uniform random sample of the clean stream for
calibration while every other sample goes into the statistics.  The sample is
a *bottom-k sketch*: each row gets a pseudo-random priority computed from its
content (:func:`content_priority`), and the ``capacity`` rows with the lowest
priorities are kept.  Rows that are rejected or evicted are handed back to the
caller, so after one pass the statistics hold exactly the rows that are not in
the sample, and the sample does not depend on the order of the data: the same
data shuffled gives the same statistics up to floating-point summation order.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Reservoir", "content_priority"]


def content_priority(x: Tensor, seed: int = 0) -> Tensor:
    """Pseudo-random priority in [0, 1) per row of ``x`` (N, ...), a function of the row's values only.

    Values are quantised to 1/64 first, so float round-off (e.g. from a
    normalise/denormalise round trip) does not change a row's priority.
    """
    flat = torch.round(x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64) * 64.0)
    r = torch.randn(flat.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v = (flat @ r) * 7919.0 + flat.sum(1) * 104729.0
    return torch.frac(torch.abs(v))


class Reservoir:
    """The ``capacity`` rows with the smallest priorities seen in a stream of dicts of tensors.

    Args:
        capacity: rows kept.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.seen = 0
        self.items: dict[str, Tensor] = {}
        self.priority = torch.zeros(0, dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.priority)

    def ensure_keys(self, template: dict[str, Tensor]) -> None:
        """Declares the row layout before any row arrives (a rank with an empty shard must still
        take part in :meth:`merged` with every key): missing keys get zero-row tensors like ``template``'s."""
        for k, v in template.items():
            if k not in self.items:
                self.items[k] = v[:0].detach().clone()

    def offer(self, batch: dict[str, Tensor], priority: Tensor) -> dict[str, Tensor]:
        """Offers a batch (rows along dim 0) with its priorities (N,); returns the rows that are
        *not* kept now (rejected newcomers and evicted older rows)."""
        n = len(priority)
        self.seen += n
        if n == 0:
            return batch
        batch = {k: v.detach() for k, v in batch.items()}
        room = self.capacity - len(self)
        if room > 0:  # filling up: keep the first `room` newcomers as they come
            take = min(room, n)
            for k, v in batch.items():
                self.items[k] = v[:take].clone() if k not in self.items else torch.cat([self.items[k], v[:take]])
            self.priority = torch.cat([self.priority, priority[:take].double()])
            batch = {k: v[take:] for k, v in batch.items()}
            priority = priority[take:]
            if len(priority) == 0:
                return batch
        cand = priority.double() < self.priority.max()
        if not bool(cand.any()):
            return batch
        c_idx = cand.nonzero().flatten()
        allp = torch.cat([self.priority, priority.double()[c_idx]])
        order = torch.argsort(allp, stable=True)
        keep, drop = order[: self.capacity], order[self.capacity :]
        freed = drop[drop < self.capacity].sort().values  # slots of evicted kept rows
        incoming = c_idx[keep[keep >= self.capacity] - self.capacity].sort().values  # newcomers that win
        rejected = torch.ones(len(priority), dtype=torch.bool)
        rejected[incoming] = False
        out = {}
        for k, v in batch.items():
            out[k] = torch.cat([v[rejected], self.items[k][freed]])
            self.items[k][freed] = v[incoming]
        self.priority[freed] = priority.double()[incoming]
        return out

    def merged(self) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
        """``(sample, lost, seen)``: under ``torch.distributed`` the global sample over all ranks,
        this rank's rows that fell out of it, and the total rows seen; otherwise ``(contents(), {}, seen)``."""
        from hfguard.distributed import all_reduce_sum, is_distributed, merge_samples

        if not is_distributed():
            return self.contents(), {}, self.seen
        order = torch.argsort(self.priority, stable=True)
        merged, lost = merge_samples({k: v[order] for k, v in self.items.items()}, self.priority[order], self.capacity)
        return merged, lost, all_reduce_sum(self.seen)

    def contents(self) -> dict[str, Tensor]:
        """The kept rows, in order of priority (so the result does not depend on the stream order)."""
        order = torch.argsort(self.priority, stable=True)
        return {k: v[order] for k, v in self.items.items()}
