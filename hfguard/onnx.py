"""ONNX export of a fitted guard and an onnxruntime runner with the ``check`` interface.

The exported graph is the guard's one-pass ``check``: the hooks that capture
activations fire while the TorchScript exporter traces the forward, so the
watched layers, the class-distance evidence, the calibrated score, the flag
and (under ``policy="filter"``) the Gaussian low-pass branch are all plain
ONNX ops (Conv, MatMul, TopK, Gather, ReduceLogSumExp, Where).  Under
``policy="filter"`` the filtered branch is computed for every row and
selected with ``Where`` (a graph has no data-dependent batch split).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from hfguard.errors import StateFileError
from hfguard.inputs import check_images
from hfguard.modelmode import kept_modes
from hfguard.results import Verdict

__all__ = ["export_onnx", "OnnxGuard", "OUTPUTS"]

OUTPUTS = ("logits", "score", "flagged", "origin")


class _CheckGraph(nn.Module):
    def __init__(self, guard: Any) -> None:
        super().__init__()
        self.guard = guard

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        g = self.guard
        logits, score, origin = g._evaluate(x)
        flagged = score > g.calibrated_threshold
        if g.policy == "filter":
            logits = torch.where(flagged[:, None], g._filtered_logits(x).to(logits.dtype), logits)
        return logits, score, flagged, origin


def export_onnx(guard: Any, path: str | os.PathLike, example_input: Tensor, *, opset: int = 17) -> None:
    """Writes ``guard``'s ``check`` as ONE ``.onnx`` file with a dynamic batch dimension.

    Outputs: ``logits`` (N, K; filtered logits for flagged rows under ``policy="filter"``),
    ``score`` (N,), ``flagged`` (N,) bool, ``origin`` (N,) int64.
    """
    guard._require_fitted()
    x, _ = guard._check_input(example_input)
    graph = _CheckGraph(guard)
    # torch.onnx.export puts the exported module back in the mode it found it in, recursively: a new wrapper is in
    # training mode, which would switch the user's model (and every submodule) to training; kept_modes sets every
    # module's own flag back instead, whatever happens. Traced with autograd on: the pooling then takes its
    # reshape-mean form, whose sizes export as constants.
    with kept_modes(graph), guard._eval_model(), warnings.catch_warnings():
        graph.training = False
        warnings.simplefilter("ignore")  # the tracer's notes on constant folding and Python values
        torch.onnx.export(
            graph,
            (x,),
            os.fspath(path),
            input_names=["input"],
            output_names=list(OUTPUTS),
            dynamic_axes={"input": {0: "batch"}, **{o: {0: "batch"} for o in OUTPUTS}},
            opset_version=opset,
            dynamo=False,
        )
    import onnx

    model = onnx.load(os.fspath(path))
    # what the guard's input check needs (0.7.3; files before it checked shape, dtype and NaN/Inf only)
    checks = {"input_range": guard.input_range, "strict": guard.strict, "norm_mean": guard.norm_mean.flatten().tolist(),
              "norm_std": guard.norm_std.flatten().tolist(), "normalized": guard.normalize is not None}
    for key, value in (("hfguard_policy", guard.policy), ("hfguard_nonfinite", guard.nonfinite), ("hfguard_input_check", json.dumps(checks))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, os.fspath(path))


class OnnxGuard:
    """Runs an exported guard under onnxruntime; :meth:`check` returns a :class:`hfguard.Verdict`.

    Args:
        path: the ``.onnx`` file written by :meth:`Guard.export_onnx`.
        threads: intra-op threads for onnxruntime (None: its default).
        providers: onnxruntime execution providers (default CPU).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        if not isinstance(path, bytes) and not os.path.isfile(os.fspath(path)):  # bytes: a serialised model, as onnxruntime takes
            raise StateFileError(f"no ONNX file at {os.fspath(path)!r}")
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(path if isinstance(path, bytes) else os.fspath(path), opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own types (InvalidProtobuf, Fail, ...): not an ONNX graph it can run
            name = "the given bytes" if isinstance(path, bytes) else repr(os.fspath(path))
            raise StateFileError(f"{name} is not an ONNX graph onnxruntime can load ({type(exc).__name__}: {exc}); export it with guard.export_onnx") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = tuple(inp.shape[1:])
        # the graph's input dtype (a guard exported with a float16 model takes float16)
        self.input_dtype = {"tensor(float16)": torch.float16, "tensor(double)": torch.float64}.get(inp.type, torch.float32)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.policy = meta.get("hfguard_policy", "flag")
        self.nonfinite = meta.get("hfguard_nonfinite", "raise")
        checks = json.loads(meta.get("hfguard_input_check", "{}"))  # graphs exported before 0.7.3: no range check
        self.input_range = tuple(checks["input_range"]) if checks.get("input_range") is not None else None
        self.strict = bool(checks.get("strict", False))
        self._norm = tuple(torch.tensor(checks.get(k, [v]), dtype=torch.float64).view(-1, 1, 1) for k, v in (("norm_mean", 0.0), ("norm_std", 1.0)))
        self._normalized = bool(checks.get("normalized", False))

    def check(self, x: Tensor) -> Any:
        """As :meth:`Guard.check`, input checks included (shape, dtype, NaN/Inf, the pixel range under ``strict``)."""
        # the guard's own check: a float (N, C, H, W) tensor, cast to the graph's dtype with a warning; NaN/Inf raise or
        # are zeroed (flag); pixels outside input_range warn, or raise under strict
        x, bad = check_images(
            x, expected_shape=self.input_shape, model_dtype=self.input_dtype, nonfinite=self.nonfinite, input_range=self.input_range,
            strict=self.strict, norm_mean=self._norm[0], norm_std=self._norm[1], normalized=self._normalized,
        )
        x = x.detach().cpu()
        out = self.session.run(None, {self.input_name: x.contiguous().numpy()})
        logits, score, flagged, origin = (torch.from_numpy(o) for o in out)
        # the graph filtered what it flagged; rows with NaN/Inf are flagged on top (their logits are the zeroed image's)
        filtered = flagged.clone() if self.policy == "filter" else torch.zeros_like(flagged)
        if bad is not None:
            score = score.masked_fill(bad, float("inf"))
            flagged = flagged | bad
        return Verdict(logits, score, flagged, filtered, logits.argmax(1), origin)
