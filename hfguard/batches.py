"""Turning whatever the user passes to ``fit`` into ``(x, y or None)`` batches."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from hfguard.errors import DataError

__all__ = ["iter_batches", "batch_count_hint"]

_X_KEYS = ("image", "images", "x", "input", "inputs", "pixel_values")
_Y_KEYS = ("label", "labels", "y", "target", "targets")


def _as_tensor(v: Any) -> Any:
    """A NumPy array of numbers as a tensor sharing its memory (also a read-only memory map or a transposed view; a
    reversed view or another byte order is copied); anything else, and arrays of strings or objects, unchanged (the
    caller's checks name them)."""
    if type(v).__module__ != "numpy" or not hasattr(v, "dtype") or not hasattr(v, "__array__"):
        return v
    import numpy as np

    if v.dtype.kind not in "biufc":
        return v
    a = np.asarray(v)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if any(st < 0 for st in a.strides):  # torch takes any positive strides (a transposed view), not reversed ones
        a = a.copy()
    with warnings.catch_warnings():  # a read-only array (a memory map) is shared, never written: no copy of the dataset
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _is_pair(data: Any) -> bool:
    """``(x, y)`` of a whole dataset: an image tensor and its labels; two image batches (a list of two) are not a pair."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return False
    x, y = (_as_tensor(v) for v in data)
    return isinstance(x, Tensor) and x.dim() >= 3 and not (isinstance(y, Tensor) and y.dim() >= 3)


def _is_dataset_dict(data: Any) -> bool:
    """The whole dataset as one dict of arrays (an image key and an optional label key, as a batch dict)."""
    return isinstance(data, Mapping) and any(k in data for k in _X_KEYS)


def _split(item: Any, index: int) -> tuple[Tensor, Tensor | None]:
    item = _as_tensor(item)
    if isinstance(item, Tensor):
        return item, None
    if isinstance(item, Mapping):
        xk = next((k for k in _X_KEYS if k in item), None)
        if xk is None:
            raise DataError(f"batch {index} is a dict without an image key; expected one of {_X_KEYS}, got keys {sorted(map(str, item))}")
        yk = next((k for k in _Y_KEYS if k in item), None)
        return item[xk], (item[yk] if yk is not None else None)
    if isinstance(item, (tuple, list)):
        if len(item) == 1:
            return item[0], None
        if len(item) == 2:
            return item[0], item[1]
        raise DataError(f"batch {index} is a {type(item).__name__} of {len(item)} items; expected (x,) or (x, y)")
    raise DataError(f"batch {index} has type {type(item).__name__}; expected a tensor, an (x, y) pair or a dict")


def _check(x: Any, y: Any, index: int) -> tuple[Tensor, Tensor | None]:
    x, y = _as_tensor(x), _as_tensor(y)
    if not isinstance(x, Tensor):
        raise DataError(f"batch {index}: images must be a torch.Tensor, got {type(x).__name__}")
    if y is not None:
        if not isinstance(y, Tensor):
            try:
                y = torch.as_tensor(y)
            except (TypeError, ValueError, RuntimeError):
                raise DataError(f"batch {index}: labels must be integer class indices, got {type(y).__name__} of {type(next(iter(y), None)).__name__}") from None
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"batch {index}: labels should be a 1-d tensor of {x.shape[0]} entries, got shape {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise DataError(f"batch {index}: labels must be integer class indices, got dtype {y.dtype}")
    return x, y


def iter_batches(data: Any, batch_size: int = 256) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yields ``(x, y)`` batches (``y`` may be None) from a DataLoader, an iterable of
    batches, an ``(x, y)`` pair of tensors, a dict of the whole dataset (an image key and an optional label key, as
    a batch dict), or a single tensor of images (NumPy arrays are taken as tensors).

    Raises:
        DataError: an item cannot be read as images (and labels).
    """
    data = _as_tensor(data)
    if isinstance(data, Tensor):
        for i in range(0, data.shape[0], batch_size):
            yield _check(data[i : i + batch_size], None, i // batch_size)
        return
    if _is_dataset_dict(data):
        x, y = _split(data, 0)
        if y is None:
            yield from iter_batches(x, batch_size)
            return
        data = (x, y)
    if _is_pair(data):
        x, y = (_as_tensor(v) for v in data)
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError):
            raise DataError(f"labels must be integer class indices, got {type(y).__name__} of {type(next(iter(y), None)).__name__}") from None
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"labels should be a 1-d tensor with one entry per image ({x.shape[0]}), got shape {tuple(y.shape)}")
        for i in range(0, x.shape[0], batch_size):
            yield _check(x[i : i + batch_size], y[i : i + batch_size], i // batch_size)
        return
    if not isinstance(data, Iterable):
        raise DataError(f"fit expects a DataLoader, an iterable of batches or an (x, y) tensor pair; got {type(data).__name__}")
    for index, item in enumerate(data):
        x, y = (_as_tensor(v) for v in _split(item, index))
        if isinstance(x, Tensor) and x.dim() == 3 and (y is None or not isinstance(y, Tensor) or y.dim() == 0):
            raise DataError(
                f"batch {index} is one image of shape {tuple(x.shape)}" + ("" if y is None else " and its label") + ": fit expects batches "
                "(N, C, H, W) of images (with N labels); pass a DataLoader(dataset, batch_size=...) rather than the dataset's samples "
                "(or, for grayscale batches without a channel axis, x.unsqueeze(1))"
            )
        yield _check(x, y, index)


def batch_count_hint(data: Any, batch_size: int = 256) -> int | None:
    """Number of batches ``iter_batches`` will yield, when it can be known without iterating (for progress bars)."""
    data = _as_tensor(data)
    if _is_dataset_dict(data):
        data = _as_tensor(_split(data, 0)[0])
    if isinstance(data, Tensor) or _is_pair(data):
        n = data.shape[0] if isinstance(data, Tensor) else _as_tensor(data[0]).shape[0]
        return -(-n // batch_size)
    try:
        return len(data)  # a DataLoader has __len__ even over an IterableDataset, where it raises TypeError
    except TypeError:  # no length: a generator, a streaming loader
        return None
