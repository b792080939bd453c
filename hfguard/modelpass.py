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

from hfguard.compiled import CompiledScoring, compile_scoring
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
    #: :meth:`compile_scoring`'s compiled maths, or None (a class default: guards pickled before 0.7.2 have none)
    _compiled: CompiledScoring | None = None

    @contextlib.contextmanager
    def _eval_model(self) -> Iterator[None]:
        """Runs the model in eval mode and restores its mode afterwards, even on error or under threads (:mod:`hfguard.modelmode`)."""
        net = self._checker()
        with eval_mode(self.model) as flipped, eval_mode(net) if net is not None else contextlib.nullcontext() as flipped_checker:
            if (flipped or flipped_checker) and not self._warned_train:
                self._warned_train = True
                what = "the wrapped model (or one of its submodules)" if flipped else "the checker network (or one of its submodules)"
                warnings.warn(f"{what} is in training mode; hfguard evaluates it in eval mode and restores every mode afterwards", stacklevel=4)
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
        wanted = set(range(len(self.layers) + 2)) if needed is None else needed
        logits, layer_feats = self._layer_features(x, wanted)
        return logits, self._source_features(x, layer_feats, logits, len(self.layers) + 1 in wanted)

    def _layer_features(self, x: Tensor, wanted: set[int]) -> tuple[Tensor, list[Tensor | None]]:
        """ONE model pass: logits and the pooled features of the watched layers in ``wanted`` (None for the others)."""
        modules = [m for i, m in enumerate(self._watched_modules()) if i in wanted]
        with capture(modules, self.poolings) as store:
            logits = self._forward_model(x)
        missing = [n for n, _ in modules if n not in store]
        if missing:
            raise ModelError(f"layers {missing} did not run during the forward pass" + compiled_hint(self.model))
        return logits, [store.get(n) for n in self.layers]

    def _evaluate(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One pass: logits, score and origin, computing only the sources the score uses."""
        needed = self._features_needed()
        logits, layer_feats = self._layer_features(x, needed)
        spectral = len(self.layers) + 1 in needed
        compiled = self._compiled_here()
        if compiled is None or torch.is_grad_enabled() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            score, origin = self._scoring_from_pass(x, layer_feats, logits, spectral)
        else:
            score, origin = compiled.fn(x, layer_feats, logits, spectral)
            score, origin = score.clone(), origin.clone()  # under CUDA graphs ("reduce-overhead") the next call reuses their memory
        if self.layout.get("checker", False):
            score = self._with_checker(score, self._forward_checker(x), logits.argmax(1))
        return logits, score, origin

    def _checker(self) -> nn.Module | None:
        """The checker network (:mod:`hfguard.checker`), or None (also for guards pickled before 0.8, which have no slot)."""
        return self._modules.get("checker")

    def _forward_checker(self, x: Tensor) -> Tensor:
        """The checker's logits (N, K) on the model's inputs (:mod:`hfguard.checker`)."""
        net = self._checker()
        if net is None:
            raise ModelError("this guard was fitted with a checker network and has none now; pass checker= to hfguard.load (or fit again without one)")
        dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), x.dtype)
        out = net(x.to(dtype))  # a float32 checker beside a float16 model (or the other way) gets its own dtype
        k = self.layout["num_classes"]
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape != (x.shape[0], k):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ModelError(f"the checker must return logits of shape (N, K) = ({x.shape[0]}, {k}) like the model; got {got}")
        return out

    def _compiled_here(self) -> CompiledScoring | None:
        """The compiled maths if this thread may run them (see :class:`hfguard.compiled.CompiledScoring`), else None."""
        compiled = self._compiled  # read once: another thread may compile or turn it off meanwhile
        if compiled is None or compiled.usable_here():
            return compiled
        if not compiled.warned_thread:
            compiled.warned_thread = True
            warnings.warn(
                f"compile_scoring({compiled.options}) records CUDA graphs, which torch runs only in the thread that compiled them "
                f"({compiled.owner.name}); calls from other threads take the eager maths (same scores). Compile in the thread that checks",
                stacklevel=4,
            )
        return None

    def _source_features(self, x: Tensor, layer_feats: list[Tensor | None], logits: Tensor, spectral: bool) -> list[Tensor | None]:
        """Every source's features (None where not needed): the watched layers', the logits, the spectrum's."""
        with no_autocast(x.device):
            return [*layer_feats, logits, self._spectral(x) if spectral else None]

    def _scoring_from_pass(self, x: Tensor, layer_feats: list[Tensor | None], logits: Tensor, spectral: bool) -> tuple[Tensor, Tensor]:
        """Score and origin from what the model pass captured: everything ``check`` does after it (the spectrum, the
        distances, the evidence, the heads), and what :meth:`compile_scoring` compiles."""
        feats = self._source_features(x, layer_feats, logits, spectral)
        with no_autocast(x.device):  # the statistics' maths runs in the buffers' dtype even under a caller's autocast
            dists = self._source_distances(feats)
            return self._score_evidence(self._evidence(logits, dists), logits.argmax(1)), dists[0].argmin(1)

    def compile_scoring(self, enabled: bool = True, **options: Any) -> "ModelPass":
        """Compiles the guard's own work after the model pass (the HF spectrum, the class distances, the evidence
        and the heads) with :func:`torch.compile`, for ``check`` and ``detect``; returns ``self``.

        The wrapped model is not compiled (``torch.compile`` it yourself if you like: the guard works on compiled
        models). Compilation happens now, on two rows with a dynamic batch size, and takes seconds to tens of
        seconds. Calls that need a gradient (``score`` under autograd, the attacks) and the ONNX export keep the
        eager maths, which give the same scores up to rounding. ``options`` go to :func:`torch.compile` (e.g.
        ``mode="reduce-overhead"`` for CUDA graphs on a GPU; torch runs CUDA graph trees only in the thread that
        recorded them, so under such a mode calls from other threads take the eager maths, with a warning). A batch
        of one, an autocast region or another dtype or device compiles once more. It is a setting of this Python
        object, not learned state: ``save`` does not store it and copies (pickle, ``deepcopy``) leave it behind; a
        ``fit`` keeps it, compiling again for the new state (a fit whose compile fails fails as a whole and leaves
        the guard as it was); ``compile_scoring(False)`` turns it off.

        Raises:
            NotFittedError: before ``fit``.
            Whatever :func:`torch.compile` raises (an unknown backend or mode, no C++ compiler or Triton); the
            guard is then left as it was.
        """
        if not enabled:
            self._compiled = None
            return self
        self._require_fitted()
        self._compiled = compile_scoring(self, dict(options))
        return self

    def _recompile_scoring(self) -> None:
        """After a fit: compiles again, with the same options, if :meth:`compile_scoring` was on."""
        if self._compiled is not None:
            self._compiled = compile_scoring(self, self._compiled.options)

    def __getstate__(self) -> dict[str, Any]:
        """A copy (pickle, ``copy.deepcopy``) leaves the compiled scoring behind: call :meth:`compile_scoring` on it again."""
        return {**self.__dict__, "_compiled": None}

    def _filtered_logits(self, x: Tensor) -> Tensor:
        return self._forward_model(self.from_pixels(lowpass(self.to_pixels(x), float(self.sigma_))).to(x.dtype))

    def _empty_verdict(self, x: Tensor) -> Verdict:
        k = self.layout["num_classes"]
        z = torch.zeros(0, dtype=torch.long, device=x.device)
        b = torch.zeros(0, dtype=torch.bool, device=x.device)
        return Verdict(x.new_zeros(0, k), x.new_zeros(0), b, b.clone(), z, z.clone())
