"""Low-pass filters and the choice of their cutoff from clean data.

The filter is a separable Gaussian blur (kornia), which exports to ONNX as two
convolutions.  Its strength is chosen on clean images only: the strongest
sigma whose filtered images keep the model's prediction on at least
``1 - max_flip`` of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from kornia.filters import gaussian_blur2d
from torch import Tensor, nn

__all__ = ["lowpass", "LowPass", "choose_sigma", "DEFAULT_SIGMAS"]

DEFAULT_SIGMAS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0)


def _kernel_size(sigma: float, h: int, w: int) -> tuple[int, int]:
    k = 2 * max(1, math.ceil(2.0 * sigma)) + 1
    return min(k, h - (1 - h % 2)), min(k, w - (1 - w % 2))


def lowpass(pixels: Tensor, sigma: float) -> Tensor:
    """Gaussian low-pass of (N, C, H, W) pixel images (reflect border); ``sigma`` in pixels."""
    if sigma <= 0:
        return pixels
    h, w = pixels.shape[-2:]
    return gaussian_blur2d(pixels, _kernel_size(sigma, h, w), (sigma, sigma), border_type="reflect")


class LowPass(nn.Module):
    """Module form of :func:`lowpass`.

    Args:
        sigma: Gaussian standard deviation in pixels.
    """

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = float(sigma)

    def forward(self, pixels: Tensor) -> Tensor:
        return lowpass(pixels, self.sigma)


@torch.no_grad()
def choose_sigma(
    predict: Callable[[Tensor], Tensor],
    images: Tensor,
    candidates: Sequence[float] = DEFAULT_SIGMAS,
    max_flip: float = 0.02,
    batch_size: int = 256,
) -> tuple[float, dict[float, float]]:
    """Strongest sigma whose filtering changes at most ``max_flip`` of the clean predictions.

    Args:
        predict: maps pixel images to predicted classes (N,).
        images: (N, C, H, W) clean pixel images.
        candidates: sigmas to try.
        max_flip: largest tolerated fraction of changed predictions.
        batch_size: images per model call.

    Returns:
        The chosen sigma (the weakest candidate if none qualifies) and the
        measured flip rate of every candidate.
    """
    base = torch.cat([predict(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    rates: dict[float, float] = {}
    for s in sorted(candidates):
        pred = torch.cat([predict(lowpass(images[i : i + batch_size], s)) for i in range(0, len(images), batch_size)])
        rates[s] = float((pred != base).float().mean())
    ok = [s for s, r in rates.items() if r <= max_flip]
    return (max(ok) if ok else min(rates)), rates
