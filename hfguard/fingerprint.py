"""A model's fingerprint: its logits on a fixed probe input, so that ``load`` can tell a model with other weights.

Layer names, shapes and the class count say nothing of the weights: a guard loaded around a model of the same
architecture with other weights (another seed, a later fine-tune) would compare its activations with
statistics of a different model, and flag nearly everything or nothing. The fingerprint is the logits of two
fixed images (seeded uniform noise in the pixel range), recorded when the guard is fitted and compared when it
is loaded, relative to their spread: a float16 or bfloat16 copy of the same model stays well within (measured: float16 0.002-0.004, bfloat16 0.014-0.023 on a digits CNN and a resnet50)
:data:`TOLERANCE`, another set of weights does not.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hfguard.modelmode import eval_mode

__all__ = ["model_fingerprint", "fingerprint_distance", "TOLERANCE"]

#: largest logit difference, in units of the fingerprint's own logit spread, still taken as the same model
TOLERANCE = 0.2
_SEED = 20261126


def model_fingerprint(model: nn.Module, guard: Any, input_shape: tuple[int, ...]) -> list[float]:
    """Logits (flattened, float) of ``model`` on two fixed images of ``input_shape`` in the guard's pixel range."""
    lo, hi = guard.input_range if guard.input_range is not None else (0.0, 1.0)
    pixels = lo + (hi - lo) * torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(_SEED))
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    x = guard.from_pixels(pixels.to(device, guard.norm_mean.dtype).to(guard.norm_mean.device)).to(device, dtype)
    with eval_mode(model), torch.no_grad():
        out = model(x)
    return out.detach().double().flatten().cpu().tolist()


def fingerprint_distance(saved: list[float], now: list[float]) -> float:
    """Largest absolute difference of two fingerprints over the saved one's standard deviation (inf if shapes differ)."""
    a, b = torch.tensor(saved, dtype=torch.float64), torch.tensor(now, dtype=torch.float64)
    if a.shape != b.shape or not bool(torch.isfinite(b).all()):
        return float("inf")
    spread = float(a.std()) if a.numel() > 1 else 0.0
    return float((a - b).abs().max()) / max(spread, 1e-8)
