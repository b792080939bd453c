"""Validation of image batches given to the guard: typed errors for broken contracts, warnings for odd but legal input."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from hfguard.errors import InputError, ShapeError

__all__ = ["check_images"]


def check_images(
    x: Any,
    *,
    expected_shape: tuple[int, ...] | None,
    model_dtype: torch.dtype | None,
    nonfinite: str,
    input_range: tuple[float, float] | None,
    strict: bool,
    norm_mean: Tensor,
    norm_std: Tensor,
    normalized: bool,
) -> tuple[Tensor, Tensor | None]:
    """Validates a batch of images (N, C, H, W).

    Args:
        x: the batch.
        expected_shape: the fitted (C, H, W), or None before ``fit``.
        model_dtype: the model's floating dtype; other float inputs are cast to it (with a warning).
        nonfinite: ``"raise"`` or ``"flag"`` (NaN/Inf rows are zeroed and reported in the mask).
        input_range: declared pixel range (after undoing ``normalize``), or None for no check.
        strict: out-of-range pixels raise instead of warning.
        norm_mean, norm_std: the guard's normalisation buffers (C, 1, 1) or (1, 1, 1).
        normalized: whether ``normalize`` was given (changes the hint in the message).

    Returns:
        The batch (cast to ``model_dtype``) and, under ``nonfinite="flag"``, the (N,) mask of rows that held NaN/Inf, else None.

    Raises:
        InputError: not a float tensor; NaN/Inf under ``nonfinite="raise"``; out-of-range pixels under ``strict``.
        ShapeError: not 4-d, or not the fitted (C, H, W).
    """
    if not isinstance(x, Tensor):
        raise InputError(f"expected a torch.Tensor of images (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ShapeError(f"expected a 4-d batch of images (N, C, H, W), got a {x.dim()}-d tensor of shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise InputError(f"expected floating-point images (e.g. float32 in [0, 1]), got dtype {x.dtype}")
    if expected_shape is not None and tuple(x.shape[1:]) != tuple(expected_shape):
        raise ShapeError(f"this guard was fitted on images of shape (C, H, W) = {tuple(expected_shape)}, got {tuple(x.shape[1:])}")
    if model_dtype is not None and x.dtype != model_dtype:
        warnings.warn(f"input dtype {x.dtype} differs from the model's {model_dtype}; hfguard casts it to {model_dtype}", stacklevel=4)
        x = x.to(model_dtype)
    bad = None
    if x.numel() == 0:
        return x, bad
    # one read-back (one host synchronisation on a GPU) answers both questions: NaN/Inf propagate into the extremes
    plo, phi = _pixel_extremes(x.detach(), norm_mean, norm_std)
    if not (math.isfinite(plo) and math.isfinite(phi)):
        finite = torch.isfinite(x)
        if nonfinite == "raise":
            raise InputError(
                f"input contains NaN or Inf values ({int((~finite).sum())} of {x.numel()} entries); "
                "pass nonfinite='flag' to protect() to flag such rows instead"
            )
        bad = ~finite.flatten(1).all(1)
        x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
        if input_range is not None:
            plo, phi = _pixel_extremes(x.detach(), norm_mean, norm_std)
    if input_range is not None:
        lo, hi = input_range
        tol = 1e-3 * (hi - lo)
        if plo < lo - tol or phi > hi + tol:
            msg = f"pixel values should lie in [{lo}, {hi}] (after undoing `normalize`), got values from {plo:.4g} to {phi:.4g}" + (
                "" if normalized else "; if the model takes normalised images pass normalize=(mean, std)"
            )
            if strict:
                raise InputError(msg)
            warnings.warn(msg, stacklevel=4)
    return x, bad


def _pixel_extremes(x: Tensor, norm_mean: Tensor, norm_std: Tensor) -> tuple[float, float]:
    """Smallest and largest pixel value of a batch after undoing the normalisation, read back to the host in
    one transfer; NaN or infinite exactly when an entry is (NaN and +-inf propagate through the extremes;
    float64 keeps a finite float32/float16 input from overflowing)."""
    wide = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
    lo_c, hi_c = x.amin(dim=(0, 2, 3)).to(wide), x.amax(dim=(0, 2, 3)).to(wide)
    std, mean = norm_std.flatten().to(x.device, wide), norm_mean.flatten().to(x.device, wide)
    lo, hi = torch.stack([(lo_c * std + mean).min(), (hi_c * std + mean).max()]).tolist()  # std > 0 keeps the order
    return lo, hi
