"""A seeded reservoir sample that returns what it does not keep.

The guard holds out a uniform random sample of the clean stream for
calibration while every other sample goes into the statistics: items the
reservoir rejects or evicts are handed back to the caller, so after one pass
the statistics hold exactly the samples that are not in the reservoir.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Reservoir"]


class Reservoir:
    """Uniform sample of at most ``capacity`` rows of a stream of dicts of tensors.

    Args:
        capacity: rows kept.
        seed: seed of the private generator (deterministic given the stream order).
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = int(capacity)
        self.seen = 0
        self.items: dict[str, Tensor] = {}
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def offer(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Offers a batch (rows along dim 0); returns the rows that are *not* kept now
        (rejected newcomers and evicted older rows)."""
        n = next(iter(batch.values())).shape[0]
        if n == 0:
            return batch
        batch = {k: v.detach() for k, v in batch.items()}
        t = torch.arange(self.seen, self.seen + n, dtype=torch.float64)
        slot = torch.floor(torch.rand(n, generator=self._gen, dtype=torch.float64) * (t + 1)).long()
        slot = torch.where(t < self.capacity, t.long(), slot)
        self.seen += n
        take = (slot < self.capacity).nonzero().flatten()
        # Of several newcomers aimed at one slot, the last wins (as in the sequential algorithm).
        last = torch.full((self.capacity,), -1, dtype=torch.long)
        last.scatter_reduce_(0, slot[take], take, reduce="amax")
        win_idx = last[last >= 0].sort().values
        win_slot = slot[win_idx]
        keep = torch.zeros(n, dtype=torch.bool)
        keep[win_idx] = True
        out = {k: v[~keep] for k, v in batch.items()}
        if not self.items:
            self.items = {k: v.new_empty((self.capacity, *v.shape[1:])) for k, v in batch.items()}
            self._filled = torch.zeros(self.capacity, dtype=torch.bool)
        occupied = win_slot[self._filled[win_slot]]
        if len(occupied):
            out = {k: torch.cat([out[k], self.items[k][occupied]]) for k in out}
        for k, v in batch.items():
            self.items[k][win_slot] = v[win_idx]
        self._filled[win_slot] = True
        return out

    def contents(self) -> dict[str, Tensor]:
        """The kept rows, in slot order."""
        if not self.items:
            return {}
        return {k: v[self._filled] for k, v in self.items.items()}
