"""A model's fingerprint: its logits on a fixed probe input, so that ``load`` can tell a model with other weights.

Layer names, shapes and the class count say nothing of the weights: a guard loaded around a model of the same
architecture with other weights (another seed, a later fine-tune) would compare its activations with
statistics of a different model, and flag nearly everything or nothing. The fingerprint is the logits of two
fixed images (seeded uniform noise in the pixel range the guard was fitted with), recorded when the guard is
fitted and compared when it is loaded, relative to their spread. A float16 or bfloat16 copy of a trained model
stays well within :data:`TOLERANCE`, other weights do not (``benchmarks/fingerprint_precision.py``:
float16 0.001-0.003, bfloat16 0.007-0.042 on the digits and Fashion-MNIST models and a random resnet50; other weights
(or, for the Fashion-MNIST pair, the other architecture) 1.07-6.0; the random-weight resnet50s made usable for the speed benchmarks move 0.3-2.9 in half precision, a real
change of their logits, and are refused). A model that is
random in eval mode (two runs differ by more than :data:`RANDOM_MODEL`) gets no fingerprint, and is loaded
unchecked as before.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hfguard.modelmode import eval_mode

__all__ = ["model_fingerprint", "fitted_fingerprint", "fingerprint_distance", "TOLERANCE", "RANDOM_MODEL"]

#: largest logit difference, in units of the fingerprint's own logit spread, still taken as the same model
TOLERANCE = 0.2
#: two runs of the fingerprint differing by more than this (same units) mark a model that is random in eval mode
#: (input noise, randomised smoothing, test-time augmentation): it gets no fingerprint and is not checked at load
RANDOM_MODEL = 0.01
_SEED = 20261126


def model_fingerprint(model: nn.Module, guard: Any, input_shape: tuple[int, ...], pixel_range: Any = None) -> list[float]:
    """Logits (flattened, float) of ``model`` on two fixed images of ``input_shape`` whose pixels are uniform in
    ``pixel_range`` (the ``input_range`` the guard was fitted with: ``load`` may change the guard's own; None: [0, 1])."""
    lo, hi = (float(pixel_range[0]), float(pixel_range[1])) if pixel_range is not None else (0.0, 1.0)
    pixels = lo + (hi - lo) * torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(_SEED))
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    x = guard.from_pixels(pixels.to(device, guard.norm_mean.dtype).to(guard.norm_mean.device)).to(device, dtype)
    with eval_mode(model), torch.no_grad():
        out = model(x)
    return out.detach().double().flatten().cpu().tolist()


def fitted_fingerprint(model: nn.Module, guard: Any, input_shape: tuple[int, ...]) -> list[float] | None:
    """The fingerprint ``fit`` records: None for a model that gives other logits on a second run (random in eval mode)."""
    first = model_fingerprint(model, guard, input_shape, guard.input_range)
    second = model_fingerprint(model, guard, input_shape, guard.input_range)
    return first if fingerprint_distance(first, second) <= RANDOM_MODEL else None


def fingerprint_distance(saved: list[float], now: list[float]) -> float:
    """Largest absolute difference of two fingerprints over the saved one's standard deviation (inf if shapes differ)."""
    a, b = torch.tensor(saved, dtype=torch.float64), torch.tensor(now, dtype=torch.float64)
    if a.shape != b.shape or not bool(torch.isfinite(b).all()):
        return float("inf")
    spread = float(a.std()) if a.numel() > 1 else 0.0
    return float((a - b).abs().max()) / max(spread, 1e-8)
