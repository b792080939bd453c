"""The guard's maths after the model pass compiled with :func:`torch.compile` (:meth:`hfguard.Guard.compile_scoring`).

``check`` runs the wrapped model once and then the guard's own work: the HF spectrum, the class distances, the
evidence and the heads. On a GPU that work is hundreds of small kernels launched from the host; compiled (and, under
``mode="reduce-overhead"``, replayed as CUDA graphs) it costs a fraction of that (README, "Deployment"). This module
builds the compiled function for one guard; :mod:`hfguard.modelpass` decides per call whether to use it.
"""

from __future__ import annotations

import threading
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["CompiledScoring", "compile_scoring", "uses_cuda_graphs"]


def uses_cuda_graphs(options: dict[str, Any]) -> bool:
    """Whether ``torch.compile(**options)`` records CUDA graphs on a GPU: ``mode`` "reduce-overhead" or
    "max-autotune", ``backend="cudagraphs"``, or ``options={"triton.cudagraphs": True}``."""
    inductor = options.get("options") or {}
    return (options.get("mode") in ("reduce-overhead", "max-autotune") or options.get("backend") == "cudagraphs"
            or bool(inductor.get("triton.cudagraphs", False)))


@dataclass
class CompiledScoring:
    """One guard's compiled maths: ``fn(x, layer_feats, logits, spectral) -> (score, origin)``.

    Attributes:
        fn: the compiled function.
        options: what was given to :func:`torch.compile` (a refit compiles again with them).
        owner: under a CUDA-graph mode, the thread that compiled it: torch's CUDA graph trees live in that thread's
            state (another thread failed inside torch on an H200, ``benchmarks/results/gpu-compiled-paths-before-thread-fix.json``),
            so other threads take the eager maths; None: any thread.
        code: the code object compiled (one per compile, see :func:`compile_scoring`).
    """

    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    options: dict[str, Any]
    owner: threading.Thread | None
    code: types.CodeType
    warned_thread: bool = field(default=False, compare=False)

    def usable_here(self) -> bool:
        return self.owner is None or threading.current_thread() is self.owner


def compile_scoring(guard: Any, options: dict[str, Any]) -> CompiledScoring:
    """Compiles ``guard._scoring_from_pass`` and runs it once, on two rows of zeros of the fitted shape (the batch size
    marked dynamic), so that the compile happens now rather than in the first ``check``.

    torch keeps the compiled versions of a function per code object, at most ``recompile_limit`` (8) of them, and
    then runs it uncompiled with only a log message. Every guard of a process shares ``_scoring_from_pass``'s code, so
    each compile here gets a copy of its own: one guard's refits, batch shapes and autocast regions never use up
    another's versions.

    Raises:
        whatever :func:`torch.compile` raises (an unknown backend or mode, no C++ compiler or Triton).
    """
    method = type(guard)._scoring_from_pass
    code = method.__code__.replace()  # an equal but distinct code object
    fn = types.FunctionType(code, method.__globals__, method.__name__, method.__defaults__, method.__closure__)
    compiled = torch.compile(types.MethodType(fn, guard), **options)
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    shape = tuple(guard.layout["input_shape"])
    param = next((p for p in guard.model.parameters() if p.is_floating_point()), None)
    x = torch.zeros((2, *shape), device=guard.norm_mean.device)
    x = guard.from_pixels(x).to(param.dtype if param is not None else torch.float32)
    needed = guard._features_needed()
    with guard._eval_model(), torch.no_grad():
        logits, layer_feats = guard._layer_features(x, needed)
        for t in [x, logits, *(f for f in layer_feats if f is not None)]:
            torch._dynamo.mark_dynamic(t, 0)
        compiled(x, layer_feats, logits, len(guard.layers) + 1 in needed)
    if counters["stats"]["unique_graphs"] == graphs_before:
        warnings.warn("torch.compile produced no graph for the guard's maths (is torch._dynamo disabled?): check runs them eagerly", RuntimeWarning, stacklevel=3)
    return CompiledScoring(compiled, dict(options), threading.current_thread() if uses_cuda_graphs(options) else None, code)
