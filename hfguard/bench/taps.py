"""Feature taps for the peer detectors: spatially averaged layer outputs and the penultimate features, in one pass.

The peers of Lee et al. (2018) average each feature map over its spatial
positions; this module gives them exactly that, computed from a single
forward pass with hooks that are removed when the call ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from hfguard.errors import ModelError
from hfguard.taps import capture

__all__ = ["spatial_mean", "last_linear", "tapped_forward", "tapped_features"]


def spatial_mean(t: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C) mean over positions; (N, D) unchanged; other ranks flattened."""
    return t.flatten(2).mean(2) if t.dim() > 2 else t.flatten(1)


def last_linear(model: nn.Module) -> str:
    """Name of the model's last ``nn.Linear`` (its input is the penultimate feature of Lee et al.)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ModelError("the Mahalanobis peer needs a final nn.Linear layer to find the penultimate features; the model has none")
    return names[-1]


@contextlib.contextmanager
def _hooks(model: nn.Module, outputs: Sequence[str], inputs: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Module outputs through the guard's own :func:`hfguard.taps.capture`, pooled by :func:`spatial_mean`;
    module inputs through pre-hooks, stored under ``"input:" + name``."""
    handles = []
    with capture([(n, model.get_submodule(n)) for n in outputs], dict.fromkeys(outputs, spatial_mean)) as store:
        try:
            for name in inputs:
                handles.append(model.get_submodule(name).register_forward_pre_hook(lambda _m, i, name=name: store.__setitem__("input:" + name, spatial_mean(i[0]))))
            yield store
        finally:
            for h in handles:
                h.remove()


def tapped_forward(model: nn.Module, x: Tensor, outputs: Sequence[str] = (), inputs: Sequence[str] = ()) -> tuple[Tensor, list[Tensor]]:
    """One forward pass: logits and the spatial means of ``outputs`` (module outputs) then ``inputs`` (module inputs).

    Differentiable when gradients are enabled.
    """
    with _hooks(model, outputs, inputs) as store:
        logits = model(x)
    return logits, [store[n] for n in outputs] + [store["input:" + n] for n in inputs]


def tapped_features(model: nn.Module, x: Tensor, outputs: Sequence[str] = (), inputs: Sequence[str] = (), batch_size: int = 512) -> tuple[Tensor, list[Tensor]]:
    """:func:`tapped_forward` over ``x`` in batches, without gradients; features concatenated."""
    logits, feats = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            lo, fs = tapped_forward(model, x[i : i + batch_size], outputs, inputs)
            logits.append(lo)
            feats.append(fs)
    return torch.cat(logits), [torch.cat([f[j] for f in feats]) for j in range(len(outputs) + len(inputs))]
