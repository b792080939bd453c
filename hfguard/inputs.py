"""Validation of image batches given to the guard: typed errors for broken contracts, warnings for odd but legal input."""

from __future__ import annotations

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
    xd = x.detach()
    lo_c, hi_c = xd.amin(dim=(0, 2, 3)), xd.amax(dim=(0, 2, 3))  # NaN propagates: one pass checks both
    if not bool(torch.isfinite(lo_c).all() and torch.isfinite(hi_c).all()):
        finite = torch.isfinite(x)
        if nonfinite == "raise":
            raise InputError(
                f"input contains NaN or Inf values ({int((~finite).sum())} of {x.numel()} entries); "
                "pass nonfinite='flag' to protect() to flag such rows instead"
            )
        bad = ~finite.flatten(1).all(1)
        x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
        lo_c, hi_c = x.detach().amin(dim=(0, 2, 3)), x.detach().amax(dim=(0, 2, 3))
    if input_range is not None:
        plo = (lo_c.view(-1, 1, 1) * norm_std + norm_mean).min()
        phi = (hi_c.view(-1, 1, 1) * norm_std + norm_mean).max()
        lo, hi = input_range
        tol = 1e-3 * (hi - lo)
        if float(plo) < lo - tol or float(phi) > hi + tol:
            msg = f"pixel values should lie in [{lo}, {hi}] (after undoing `normalize`), got values from {float(plo):.4g} to {float(phi):.4g}" + (
                "" if normalized else "; if the model takes normalised images pass normalize=(mean, std)"
            )
            if strict:
                raise InputError(msg)
            warnings.warn(msg, stacklevel=4)
    return x, bad
