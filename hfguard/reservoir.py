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

import functools
import math

import torch
from torch import Tensor

__all__ = ["Reservoir", "content_priority"]


#: float64 entries of ``x`` converted at a time by :func:`content_priority` off a CPU (1 GB; batches below it in one product)
_CHUNK = 1 << 27


@functools.lru_cache(maxsize=8)
def _hash_vector(n: int, seed: int, device: torch.device) -> Tensor:
    """The seeded random projection of :func:`content_priority`, drawn on the CPU (the same numbers on every
    device) and kept on ``device``. Never written to."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)


def content_priority(x: Tensor, seed: int = 0) -> Tensor:
    """Pseudo-random priority in [0, 1) per row of ``x`` (N, ...), a function of the row's values only.

    Values are quantised to 1/64 first, so float round-off (e.g. from a
    normalise/denormalise round trip) does not change a row's priority.
    Computed in float64 on ``x``'s device (the CPU for MPS, which has no float64) and returned on the CPU: on
    a GPU the batch never crosses to the host (on an H200 the host's way cost 0.2 s per batch of 250 images
    at 224x224). Off a CPU a batch whose float64 copy would pass 1 GB goes ``2**27 / D`` rows at a time (on a
    CPU, as before 0.6.1, always whole: its product's last digits depend on how many rows share it). A
    priority has about 5 significant digits for 224x224 RGB images (the integer term is large), so in a large
    dataset some share a value and their stream order breaks the tie; and as the summation order differs
    between devices, a GPU's sample may keep a different one of two rows whose priorities agree that far.
    Either sample is uniform.
    """
    dev = torch.device("cpu") if x.device.type == "mps" else x.device
    flat = x.detach().reshape(x.shape[0], math.prod(x.shape[1:]))  # also for no rows
    r = _hash_vector(int(flat.shape[1]), int(seed), dev)
    step = len(flat) if dev.type == "cpu" else max(1, _CHUNK // max(1, int(flat.shape[1])))
    out = []
    for i in range(0, flat.shape[0], max(1, step)):
        q = flat[i : i + step].to(dev, torch.float64, copy=True).mul_(64.0).round_()  # one float64 copy, never the caller's
        out.append(((q @ r) * 7919.0 + q.sum(1) * 104729.0).cpu())
    return torch.frac(torch.abs(torch.cat(out))) if out else torch.zeros(0, dtype=torch.float64)


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

    def cannot_keep(self, priority: Tensor) -> Tensor:
        """(N,) bool: the rows :meth:`offer` would reject whatever else the batch holds (the reservoir is full and
        their priority is not below the largest kept one); a caller may leave them out and :meth:`skip` them."""
        if self.capacity <= 0:
            return torch.ones(len(priority), dtype=torch.bool)
        if len(self) < self.capacity:
            return torch.zeros(len(priority), dtype=torch.bool)
        return priority.double() >= self.priority.max()

    def skip(self, n: int) -> None:
        """Counts ``n`` rows as seen without offering them (rows :meth:`cannot_keep` would have rejected)."""
        self.seen += int(n)

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
