"""One model pass of a guard: the wrapped model run (in eval mode, restored afterwards) with the guard's hooks, and
the scoring of what it captured.

:class:`ModelPass` sits between :class:`hfguard.state.FittedState` (the learned buffers and the maths on features,
which knows nothing of the model) and :class:`hfguard.Guard` (settings and the public API): it owns how a batch
is checked, passed through the model once, pooled at the watched layers and turned into logits, score and origin.
A subclass sets ``model``, ``nonfinite``, ``input_range``, ``strict``, ``normalize`` and ``_warned_train``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from hfguard.errors import ModelError
from hfguard.filters import lowpass
from hfguard.inputs import check_images
from hfguard.modelmode import eval_mode
from hfguard.results import Verdict
from hfguard.state import FittedState
from hfguard.taps import capture, compiled_hint, no_autocast

__all__ = ["ModelPass"]


class ModelPass(FittedState):
    """The wrapped model's pass with the guard's hooks, and the score of what it captured (see the module docstring)."""

    model: nn.Module

    @contextlib.contextmanager
    def _eval_model(self) -> Iterator[None]:
        """Runs the model in eval mode and restores its mode afterwards, even on error or under threads (:mod:`hfguard.modelmode`)."""
        with eval_mode(self.model) as flipped:
            if flipped and not self._warned_train:
                self._warned_train = True
                warnings.warn("the wrapped model (or one of its submodules) is in training mode; hfguard evaluates it in eval mode and restores every mode afterwards", stacklevel=4)
            yield

    def _watched_modules(self) -> list[tuple[str, nn.Module]]:
        out, missing = [], []
        for n in self.layers:
            try:
                out.append((n, self.model.get_submodule(n)))  # a path walk, not a walk over every module
            except AttributeError:
                missing.append(n)
        if missing:
            raise ModelError(f"layers {missing} are not modules of the model; available: {[n for n, _ in self.model.named_modules()][1:20]}...")
        return out

    def _check_input(self, x: Any, *, fitted: bool = True, nonfinite: str | None = None) -> tuple[Tensor, Tensor | None]:
        """Validates a batch (see :func:`hfguard.inputs.check_images`); ``nonfinite`` overrides the guard's setting."""
        expected = tuple(self.layout["input_shape"]) if fitted and self.layout is not None else None
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        return check_images(
            x, expected_shape=expected, model_dtype=dtype, nonfinite=nonfinite or self.nonfinite, input_range=self.input_range, strict=self.strict,
            norm_mean=self.norm_mean, norm_std=self.norm_std, normalized=self.normalize is not None,
        )

    def _forward_model(self, x: Tensor) -> Tensor:
        out = self.model(x)
        if not isinstance(out, Tensor):
            raise ModelError(f"the model must return a logits tensor (N, K); got {type(out).__name__}")
        if out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise ModelError(f"the model must return logits of shape (N, K) = ({x.shape[0]}, K); got {tuple(out.shape)}")
        return out

    def _features(self, x: Tensor, needed: set[int] | None = None) -> tuple[Tensor, list[Tensor | None]]:
        """ONE model pass: logits and the pooled features of the sources in ``needed`` (default: all)."""
        n_layers = len(self.layers)
        wanted = set(range(n_layers + 2)) if needed is None else needed
        modules = [m for i, m in enumerate(self._watched_modules()) if i in wanted]
        with capture(modules, self.poolings) as store:
            logits = self._forward_model(x)
        missing = [n for n, _ in modules if n not in store]
        if missing:
            raise ModelError(f"layers {missing} did not run during the forward pass" + compiled_hint(self.model))
        with no_autocast(x.device):
            feats = [store.get(n) for n in self.layers] + [logits, self._spectral(x) if n_layers + 1 in wanted else None]
        return logits, feats

    def _evaluate(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One pass: logits, score and origin, computing only the sources the score uses."""
        logits, feats = self._features(x, self._features_needed())
        with no_autocast(x.device):  # the statistics' maths runs in the buffers' dtype even under a caller's autocast
            dists = self._source_distances(feats)
            return logits, self._score_evidence(self._evidence(logits, dists), logits.argmax(1)), dists[0].argmin(1)

    def _filtered_logits(self, x: Tensor) -> Tensor:
        return self._forward_model(self.from_pixels(lowpass(self.to_pixels(x), float(self.sigma_))).to(x.dtype))

    def _empty_verdict(self, x: Tensor) -> Verdict:
        k = self.layout["num_classes"]
        z = torch.zeros(0, dtype=torch.long, device=x.device)
        b = torch.zeros(0, dtype=torch.bool, device=x.device)
        return Verdict(x.new_zeros(0, k), x.new_zeros(0), b, b.clone(), z, z.clone())
