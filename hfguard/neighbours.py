"""Nearest-neighbour class distances: a fixed-size, class-stratified bank of clean training features.

The class Gaussians (:mod:`hfguard.stats`) summarise each class by a mean and one shared covariance. An attacked
input can land near a class's mean and still far from every clean image of that class; the distance to the nearest
clean images of each class sees that (Deep-kNN-like evidence; ``benchmarks/evidence_neighbours.py`` measured what it
adds on the Fashion-MNIST models). Per watched source the guard keeps ``per_class`` clean rows of every class:

* :class:`ClassSample` draws them during ``fit``'s one pass (a copy of rows going into the statistics, the
  ``per_class`` lowest content-hash priorities of each class: independent of the data's order, memory fixed);
* :class:`NeighbourBank` holds them as buffers, standardised per feature dimension, and gives (N, K) distances:
  the mean squared distance (per dimension) to the ``neighbours`` nearest bank rows of each class.

The cost per image and source is one product with the bank: ``K * per_class * D`` multiply-adds, with
``K * per_class`` about :data:`BANK_ROWS` up to 250 classes and ``2 * K`` beyond (two rows per class at least).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ClassSample", "NeighbourBank", "bank_size", "leaving_out", "BANK_ROWS", "MAX_PER_CLASS", "NEIGHBOURS"]

#: bank rows per source, over all classes (``per_class = BANK_ROWS // K``, at least 2 and at most MAX_PER_CLASS)
BANK_ROWS = 500
MAX_PER_CLASS = 50
#: nearest bank rows averaged per class
NEIGHBOURS = 3


def bank_size(num_classes: int, rows: int = BANK_ROWS) -> tuple[int, int]:
    """``(per_class, neighbours)`` of the bank for ``num_classes`` classes and about ``rows`` rows in all."""
    per = max(2, min(MAX_PER_CLASS, rows // num_classes))
    return per, min(NEIGHBOURS, per)


def _by_class(y: Tensor, priority: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(order, classes, rank)``: the rows sorted by class then priority, their classes, and each one's rank in its class."""
    order = torch.argsort(priority, stable=True)
    order = order[torch.argsort(y[order], stable=True)]
    ys = y[order]
    return order, ys, torch.arange(len(ys)) - torch.searchsorted(ys, ys)


class ClassSample:
    """Per class, the rows with the ``per_class`` lowest priorities of a stream (a copy: nothing is handed back).

    Args:
        num_classes: K.
        per_class: rows kept per class.
        dims: the row keys kept (the others are ignored) and their widths, e.g. ``{"source0": 512, "source3": 10}``.
    """

    def __init__(self, num_classes: int, per_class: int, dims: dict[str, int]) -> None:
        self.num_classes, self.per_class, self.keys = int(num_classes), int(per_class), list(dims)
        self.items: dict[str, Tensor] = {k: torch.zeros(0, int(d)) for k, d in dims.items()}
        self.y = torch.zeros(0, dtype=torch.long)
        self.priority = torch.zeros(0, dtype=torch.float64)

    def _cutoff(self) -> Tensor:
        """(K,) the largest kept priority of each full class; ``inf`` for a class with room left."""
        k = self.num_classes
        count = torch.bincount(self.y, minlength=k)
        top = torch.full((k,), float("-inf"), dtype=torch.float64).scatter_reduce(0, self.y, self.priority, "amax")
        return torch.where(count >= self.per_class, top, torch.full_like(top, float("inf")))

    def offer(self, rows: dict[str, Tensor], priority: Tensor) -> None:
        """Offers rows (dict with ``"y"`` and :attr:`keys`) with their priorities (N,)."""
        y, priority = rows["y"].long(), priority.double()
        cand = priority < self._cutoff()[y] if len(self.y) else torch.ones(len(y), dtype=torch.bool)
        if not bool(cand.any()):
            return
        y_all = torch.cat([self.y, y[cand]])
        p_all = torch.cat([self.priority, priority[cand]])
        order, _, rank = _by_class(y_all, p_all)
        keep = order[rank < self.per_class]
        for k in self.keys:
            new = rows[k][cand].detach()
            self.items[k] = torch.cat([self.items[k], new.to(self.items[k].dtype)])[keep]
        self.y, self.priority = y_all[keep], p_all[keep]

    def merge_ranks(self) -> None:
        """Under ``torch.distributed``: every rank ends with the per-class sample of the union of the ranks' samples
        (the same rows a single process would have kept); each rank sends at most ``K * per_class`` rows."""
        from hfguard.distributed import gather_samples, is_distributed

        if not is_distributed():
            return
        union, priority = gather_samples({k: self.items[k] for k in self.keys} | {"y": self.y}, self.priority, self.num_classes * self.per_class)
        self.items = {k: v[:0] for k, v in self.items.items()}
        self.y, self.priority = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
        self.offer(union, priority)

    def rows(self, key: str, per_class: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(rows, valid, priority)``: (K, per_class, D) rows of ``key`` by class, in priority order, (K, per_class) bool
        marking the filled slots, and (K, per_class) their priorities (``inf`` where empty); ``per_class`` defaults to
        the sample's (a smaller one keeps each class's lowest priorities)."""
        k, per = self.num_classes, int(per_class or self.per_class)
        x = self.items[key]
        order, ys, slot = _by_class(self.y, self.priority)
        fits = slot < per
        order, ys, slot = order[fits], ys[fits], slot[fits]
        rows = x.new_zeros(k, per, x.shape[1])
        valid = torch.zeros(k, per, dtype=torch.bool)
        priority = torch.full((k, per), float("inf"), dtype=torch.float64)
        rows[ys, slot] = x[order]
        valid[ys, slot] = True
        priority[ys, slot] = self.priority[order]
        return rows, valid, priority


class NeighbourBank(nn.Module):
    """Buffers of one source's bank; ``forward(z)`` gives (N, K) nearest-neighbour class distances.

    Args:
        num_classes: K.
        per_class: bank rows per class.
        dim: the source's feature dimension D.
        neighbours: nearest rows averaged per class (at most ``per_class``).
    """

    def __init__(self, num_classes: int, per_class: int, dim: int, neighbours: int) -> None:
        super().__init__()
        self.num_classes, self.per_class, self.neighbours = int(num_classes), int(per_class), int(neighbours)
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("bank", torch.zeros(num_classes * per_class, dim))
        #: squared norms of the bank rows; ``inf`` for an empty slot (a class with fewer rows), which is never nearest
        self.register_buffer("bank_sq", torch.zeros(num_classes * per_class))
        self._left_out: Tensor | None = None  # see leaving_out

    @torch.no_grad()
    def set_rows(self, rows: Tensor, valid: Tensor) -> None:
        """Stores the (K, per_class, D) clean rows (``valid`` (K, per_class) marks the filled slots), standardised per
        dimension by their own mean and standard deviation (the variance floored at a hundredth of the mean variance: a
        dimension that is constant on clean data cannot make every other distance vanish)."""
        rows, valid = rows.to("cpu"), valid.to("cpu")  # float64 on the host: not every device has it (MPS)
        x = rows[valid].double()
        var = x.var(0, unbiased=False) if len(x) > 1 else torch.ones(x.shape[1], dtype=x.dtype)
        scale = 1.0 / torch.sqrt(var + 0.01 * var.mean() + 1e-12)
        center = x.mean(0)
        u = ((rows.double() - center) * scale).reshape(-1, rows.shape[-1])
        sq = u.square().sum(1)
        sq[~valid.flatten()] = float("inf")
        u[~valid.flatten()] = 0.0
        dtype = self.bank.dtype
        self.center.copy_(center.to(dtype))
        self.scale.copy_(scale.to(dtype))
        self.bank.copy_(u.to(dtype))
        self.bank_sq.copy_(sq.to(dtype))

    def forward(self, z: Tensor) -> Tensor:
        u = (z.to(self.bank.dtype) - self.center) * self.scale
        # ||u||^2 + ||b||^2 - 2 u.b as one fused product (an ONNX Gemm): fewer kernels than the three-term sum
        sq = torch.addmm(u.square().sum(1, keepdim=True) + self.bank_sq, u, self.bank.T, alpha=-2.0).clamp_min(0.0)
        left_out = getattr(self, "_left_out", None)
        if left_out is not None:  # fit only: each row's own clean image, if it is in the bank
            rows = (left_out >= 0).nonzero().flatten().to(sq.device)
            sq = sq.index_put((rows, left_out.to(sq.device)[rows]), torch.tensor(float("inf"), dtype=sq.dtype, device=sq.device))
        per_class = sq.reshape(-1, self.num_classes, self.per_class)
        if self.neighbours == 1:  # the same value as a TopK of one, and cheaper (1000-class guards: 2 rows per class, 1 neighbour)
            return per_class.min(2).values / u.shape[1]
        return per_class.topk(self.neighbours, dim=2, largest=False).values.mean(2) / u.shape[1]


@contextlib.contextmanager
def leaving_out(banks: Sequence[NeighbourBank], slots: Tensor | None) -> Iterator[None]:
    """Within the block, row ``i`` of a batch gets the banks' distances without the flat slot ``slots[i]`` (-1: none):
    ``fit`` scores an adversarial made from a bank image as one made from a new image, whose clean original is never
    among the nearest rows. ``None`` leaves every slot in."""
    for bank in banks:
        bank._left_out = slots
    try:
        yield
    finally:
        for bank in banks:
            bank._left_out = None
