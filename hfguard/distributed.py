"""Merging a fit across ``torch.distributed`` ranks (each rank reads only its shard).

* The statistics are sums: one ``all_reduce`` each.
* Collectives run on :func:`comm_device` (CUDA under NCCL, CPU otherwise).
* A rank whose shard is empty still takes part: the ranks agree on the layer spec
  (:func:`agree_on`) and the empty rank contributes zero sums and no samples.
* The calibration hold-out is a bottom-k sample by content hash, so the global
  sample is the k lowest priorities of the union of the ranks' samples: the
  ranks exchange their samples (``all_gather``), keep the global bottom k, and
  hand the rows that lost back to their own statistics *before* the sums are
  reduced.  Every rank ends with the same guard as a single process fitted on
  all the data (up to float summation order).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["is_distributed", "merge_samples", "gather_samples", "all_reduce_sum", "all_reduce_", "agree_on", "comm_device"]


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def comm_device() -> torch.device:
    """Where collectives run: the current CUDA device under NCCL (which rejects CPU tensors), else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(t: Tensor) -> Tensor:
    """In-place sum of ``t`` over all ranks, through :func:`comm_device` (``t`` stays where it is)."""
    import torch.distributed as dist

    dev = comm_device()
    if t.device == dev:
        dist.all_reduce(t)
        return t
    moved = t.to(dev)
    dist.all_reduce(moved)
    t.copy_(moved.to(t.device))
    return t


def all_reduce_sum(value: int) -> int:
    """Sum of an integer over all ranks."""
    return int(all_reduce_(torch.tensor([value], dtype=torch.float64)).item())


def agree_on(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable, small), in rank order; ``[value]`` when not distributed."""
    import torch.distributed as dist

    if not is_distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _gather_padded(t: Tensor, capacity: int) -> Tensor:
    """all_gather of a (n <= capacity, ...) tensor: (world * capacity, ...) with zero padding."""
    import torch.distributed as dist

    dev = comm_device()
    pad = t.new_zeros((capacity, *t.shape[1:]), device=dev)
    pad[: len(t)] = t.to(dev)
    out = [torch.empty_like(pad) for _ in range(dist.get_world_size())]
    dist.all_gather(out, pad.contiguous())
    return torch.cat(out).to(t.device)


def _gather_priorities(priority: Tensor, capacity: int) -> Tensor:
    """Every rank's ``n <= capacity`` priorities, each rank's padded with ``inf`` to ``capacity``: (world * capacity,)."""
    p_pad = torch.full((capacity,), float("inf"), dtype=torch.float64)
    p_pad[: len(priority)] = priority
    all_p = _gather_padded(p_pad[:, None], capacity)[:, 0]
    all_p[torch.isnan(all_p)] = float("inf")
    return all_p


def gather_samples(items: dict[str, Tensor], priority: Tensor, capacity: int) -> tuple[dict[str, Tensor], Tensor]:
    """Every rank's sampled rows and priorities, concatenated in rank order (identical on every rank): each rank sends
    its ``n <= capacity`` rows padded to ``capacity``, so the traffic is ``world * capacity`` rows per key."""
    all_p = _gather_priorities(priority, capacity)
    real = torch.isfinite(all_p)
    return {k: _gather_padded(v, capacity)[real] for k, v in items.items()}, all_p[real]


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
    all_p = _gather_priorities(priority, capacity)
    order = torch.argsort(all_p, stable=True)
    winners = order[: capacity][torch.isfinite(all_p[order[:capacity]])]
    rank = dist.get_rank()
    mine = winners[(winners >= rank * capacity) & (winners < (rank + 1) * capacity)] - rank * capacity
    lost_mask = torch.ones(n, dtype=torch.bool)
    lost_mask[mine] = False
    merged = {k: _gather_padded(v, capacity)[winners] for k, v in items.items()}
    lost = {k: v[lost_mask] for k, v in items.items()}
    return merged, lost
