"""Which layers to watch, and capturing their activations during one forward pass.

Hooks are registered for the duration of one call and removed in ``finally``,
so the user's model never keeps a hook.  Each call's hooks only record
activations produced by the thread that made the call, so concurrent calls
from several threads cannot mix their activations (there is no shared dict).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hfguard.errors import ModelError

__all__ = ["LayerInfo", "watchable_units", "discover_layers", "choose_layers", "pooled_grid", "pool_activation", "capture"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_SKIP_AUTO = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.Flatten, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Unflatten,
)


@dataclass(frozen=True)
class LayerInfo:
    """A module whose output the guard can watch.

    Attributes:
        name: the module's qualified name in ``model.named_modules()``.
        shape: output shape without the batch dimension.
        calls: how many times the module ran in one forward pass.
        order: position of its (last) call in the forward pass.
    """

    name: str
    shape: tuple[int, ...]
    calls: int
    order: int


def watchable_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Candidate modules: descend through containers and the root, stop at leaves or custom blocks."""
    out: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, mod: nn.Module, is_root: bool) -> None:
        children = list(mod.named_children())
        if children and (is_root or isinstance(mod, _CONTAINERS)):
            for n, c in children:
                walk(f"{prefix}.{n}" if prefix else n, c, False)
        elif not is_root:
            out.append((prefix, mod))

    walk("", model, True)
    return out


def discover_layers(
    model: nn.Module, example: Tensor, units: Sequence[tuple[str, nn.Module]] | None = None
) -> tuple[list[LayerInfo], Tensor]:
    """Runs ``model(example)`` once and describes the output of every candidate module
    (``units``, by default :func:`watchable_units`).

    Returns:
        The candidate layers in call order, and the model's output on ``example``.
    """
    units = watchable_units(model) if units is None else units
    seen: dict[str, list] = {}
    counter = [0]
    handles = []

    def make(name: str):
        def hook(_m, _i, out):
            counter[0] += 1
            shape = tuple(out.shape[1:]) if isinstance(out, Tensor) else None
            rec = seen.setdefault(name, [0, shape, 0])
            rec[0] += 1
            rec[1] = shape
            rec[2] = counter[0]

        return hook

    try:
        for name, mod in units:
            handles.append(mod.register_forward_hook(make(name)))
        with torch.no_grad():
            out = model(example)
    finally:
        for h in handles:
            h.remove()
    infos = [LayerInfo(n, r[1], r[0], r[2]) for n, r in seen.items() if r[1] is not None]
    infos.sort(key=lambda i: i.order)
    return infos, out


def choose_layers(infos: Sequence[LayerInfo], units: dict[str, nn.Module], num_outputs: int, max_layers: int = 6) -> list[str]:
    """The automatic layer choice.

    Walks the candidate modules in call order, groups consecutive ones with the
    same output shape into a stage, and keeps the last module of each stage.
    Pooling, flatten, dropout and identity modules are skipped (they only
    rearrange their input), as are modules called more than once per forward
    and the module that produces the logits.  With more than ``max_layers``
    stages an evenly spaced subset is kept, always including the first and last.
    """
    stages: list[LayerInfo] = []
    prev_shape = None
    for info in infos:
        mod = units[info.name]
        usable = (
            info.calls == 1
            and not isinstance(mod, _SKIP_AUTO)
            and len(info.shape) in (1, 3)
            and not (len(info.shape) == 1 and info.shape[0] == num_outputs and info is infos[-1])
        )
        if info.shape == prev_shape and stages and stages[-1].shape == info.shape:
            if usable:
                stages[-1] = info
            continue
        prev_shape = info.shape
        if usable:
            stages.append(info)
    names = [s.name for s in stages]
    if len(names) > max_layers:
        idx = torch.linspace(0, len(names) - 1, max_layers).round().long().tolist()
        names = [names[i] for i in sorted(set(idx))]
    return names


def pooled_grid(shape: tuple[int, ...], max_dim: int) -> int:
    """Side of the spatial grid a (C, H, W) activation is average-pooled to: the largest
    ``s`` in (4, 2, 1) with ``C * s * s <= max_dim`` and ``s`` not larger than H or W."""
    if len(shape) != 3:
        return 0
    c, h, w = shape
    for s in (4, 2, 1):
        if c * s * s <= max_dim and s <= min(h, w):
            return s
    return 1


def pool_activation(a: Tensor, grid: int) -> Tensor:
    """Pools an activation to a flat feature vector (N, D).

    4-D activations are average-pooled to ``grid`` x ``grid`` (with a
    reshape-mean when the size divides and gradients are being recorded, whose
    backward does not keep the activation alive, so a later in-place op in the
    model cannot break it; without gradients the faster ``avg_pool2d``). When the
    size does not divide, the bins of ``adaptive_avg_pool2d`` are applied as two
    averaging matrices, which export to ONNX (``adaptive_avg_pool2d`` does not).
    """
    if a.dim() == 2:
        return a
    if a.dim() != 4:
        return a.flatten(1)
    n, c, h, w = a.shape
    if h % grid == 0 and w % grid == 0:
        if a.requires_grad and torch.is_grad_enabled():
            return a.reshape(n, c, grid, h // grid, grid, w // grid).mean((3, 5)).flatten(1)
        return F.avg_pool2d(a, (h // grid, w // grid)).flatten(1)
    from hfguard.spectrum import pool_matrix

    ph = pool_matrix(h, grid, dtype=a.dtype).to(a.device)
    pw = pool_matrix(w, grid, dtype=a.dtype).to(a.device)
    return (ph @ a @ pw.T).flatten(1)


@contextlib.contextmanager
def capture(modules: Sequence[tuple[str, nn.Module]], grids: dict[str, int]) -> Iterator[dict[str, Tensor]]:
    """Context manager: pooled activations of ``modules`` produced by this thread inside the block.

    Yields:
        A dict, private to this call, filled with ``name -> (N, D)`` pooled features.

    Raises:
        ModelError: a watched module returned something that is not a tensor.
    """
    store: dict[str, Tensor] = {}
    owner = threading.get_ident()
    handles = []

    def make(name: str):
        grid = grids[name]

        def hook(_m, _i, out):
            if threading.get_ident() != owner:
                return
            if not isinstance(out, Tensor):
                raise ModelError(f"layer {name!r} must return a tensor to be watched; got {type(out).__name__}")
            store[name] = pool_activation(out, grid)

        return hook

    try:
        for name, mod in modules:
            handles.append(mod.register_forward_hook(make(name)))
        yield store
    finally:
        for h in handles:
            h.remove()
