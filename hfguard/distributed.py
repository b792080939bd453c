"""Merging a fit across ``torch.distributed`` ranks (each rank reads only its shard).

* The statistics are sums: one ``all_reduce`` each.
* The calibration hold-out is a bottom-k sample by content hash, so the global
  sample is the k lowest priorities of the union of the ranks' samples: the
  ranks exchange their samples (``all_gather``), keep the global bottom k, and
  hand the rows that lost back to their own statistics *before* the sums are
  reduced.  Every rank ends with the same guard as a single process fitted on
  all the data (up to float summation order).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["is_distributed", "merge_samples", "all_reduce_sum"]


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(value: int) -> int:
    """Sum of an integer over all ranks."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return int(t.item())


def _gather_padded(t: Tensor, capacity: int) -> Tensor:
    """all_gather of a (n <= capacity, ...) tensor: (world * capacity, ...) with zero padding."""
    import torch.distributed as dist

    pad = t.new_zeros((capacity, *t.shape[1:]))
    pad[: len(t)] = t
    out = [torch.empty_like(pad) for _ in range(dist.get_world_size())]
    dist.all_gather(out, pad.contiguous())
    return torch.cat(out)


def merge_samples(items: dict[str, Tensor], priority: Tensor, capacity: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Global bottom-``capacity`` sample from every rank's local one.

    Args:
        items: this rank's sampled rows (n <= capacity each).
        priority: (n,) their priorities.
        capacity: sample size.

    Returns:
        ``(merged, lost)``: the global sample (identical on every rank, in
        priority order) and this rank's rows that are not in it.
    """
    import torch.distributed as dist

    n = len(priority)
    p_pad = torch.full((capacity,), float("inf"), dtype=torch.float64)
    p_pad[:n] = priority
    all_p = _gather_padded(p_pad[:, None], capacity)[:, 0]
    all_p[torch.isnan(all_p)] = float("inf")
    order = torch.argsort(all_p, stable=True)
    winners = order[: capacity][torch.isfinite(all_p[order[:capacity]])]
    rank = dist.get_rank()
    mine = winners[(winners >= rank * capacity) & (winners < (rank + 1) * capacity)] - rank * capacity
    lost_mask = torch.ones(n, dtype=torch.bool)
    lost_mask[mine] = False
    merged = {k: _gather_padded(v, capacity)[winners] for k, v in items.items()}
    lost = {k: v[lost_mask] for k, v in items.items()}
    return merged, lost
