"""``hfguard.load``: a guard file (:mod:`hfguard.io`) wrapped around the user's model, checked against it."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from hfguard.errors import ModelMismatchError, StateFileError
from hfguard.guard import Guard
from hfguard.io import LOAD_OVERRIDES, read_guard_file
from hfguard.taps import discover_layers

__all__ = ["load_guard"]


def load_guard(path: str | os.PathLike, model: nn.Module, **overrides: Any) -> Any:
    """Loads a guard saved by :meth:`Guard.save` around ``model``.

    Args:
        path: the file.
        model: the same classifier the guard was fitted on.
        overrides: settings to change: any of ``LOAD_OVERRIDES`` (e.g. ``policy="filter"``,
            ``filter_sigma=0.8``). Settings that shaped the learned state (``fpr``, ``layers``,
            ``normalize``, ...) can only change by fitting again.

    Raises:
        ValueError: an override that cannot be honoured without fitting again.
        StateFileError: missing, truncated, tampered with or foreign file.
        ModelMismatchError: ``model`` does not have the saved layers with the saved shapes.
    """
    header, tensors = read_guard_file(path)
    layout = header["spec"]  # the header key keeps its format-1 name
    fixed = sorted(set(overrides) - set(LOAD_OVERRIDES))
    if fixed:
        raise ValueError(
            f"load() cannot change {fixed}: they shaped the learned state (threshold, statistics); fit the guard again with them. "
            f"Settings load() can change: {list(LOAD_OVERRIDES)}"
        )
    settings = {
        "layers": layout["layers"],
        "policy": header["policy"],
        "fpr": header["fpr"],
        "normalize": header["normalize"],
        "max_features": header["max_features"],
        "filter_sigma": header["filter_sigma"],
        "input_range": header["input_range"],
        "strict": header["strict"],
        "nonfinite": header["nonfinite"],
        "score_features": header.get("score_features_setting", layout["score_features"]),  # before format 5: the list
        "calibration": header.get("calibration", "clean"),
        "attack_families": header.get("attack_families", "auto"),
    }
    settings.update(overrides)
    guard = Guard(model, **settings)
    named = dict(model.named_modules())
    missing = [n for n in layout["layers"] if n not in named]
    if missing:
        raise ModelMismatchError(f"the model has no module(s) {missing}; this guard was saved for a model that has them")
    param = next(model.parameters(), None)
    example = torch.zeros(1, *layout["input_shape"], device=param.device if param is not None else "cpu", dtype=param.dtype if param is not None else torch.float32)
    was_training = model.training
    try:
        model.eval()
        infos, out = discover_layers(model, example, [(n, named[n]) for n in layout["layers"]])
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[1] != layout["num_classes"]:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelMismatchError(f"the guard was fitted on a model with {layout['num_classes']} outputs; this model returns {got}")
    saved = layout["layer_shapes"]
    for info in infos:
        if info.name in saved and list(info.shape) != saved[info.name]:
            raise ModelMismatchError(f"layer {info.name!r} outputs shape {list(info.shape)}; the guard was fitted on {saved[info.name]}")
    guard._allocate(layout)
    own = guard.guard_state()
    if header["format_version"] < 3 and "threshold_" in tensors:  # renamed in format 3
        tensors = {("calibrated_threshold" if k == "threshold_" else k): v for k, v in tensors.items()}
    if header["format_version"] == 1:  # no heads saved: the clean-only combiner, as the file was fitted
        tensors = {**tensors, "head_weight": own["head_weight"], "head_bias": own["head_bias"]}
    if set(own) != set(tensors):
        raise StateFileError(f"the file's tensors {sorted(set(tensors) ^ set(own))} do not match this hfguard version's state")
    for k, v in tensors.items():
        if own[k].shape != v.shape:
            raise StateFileError(f"tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    guard.load_state_dict(tensors, strict=False)
    if "filter_sigma" in overrides:
        guard.sigma_.fill_(float(overrides["filter_sigma"]))
    if param is not None:
        guard.to(param.device)
    return guard
