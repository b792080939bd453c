"""``hfguard.load``: a guard file (:mod:`hfguard.io`) wrapped around the user's model, checked against it."""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from torch import Tensor, nn

from hfguard import evidence
from hfguard.errors import ModelMismatchError, SettingsError, StateFileError
from hfguard.fingerprint import TOLERANCE, fingerprint_distance, model_fingerprint
from hfguard.guard import Guard
from hfguard.io import LOAD_OVERRIDES, read_guard_file
from hfguard.modelmode import eval_mode
from hfguard.taps import discover_layers

__all__ = ["load_guard"]


def load_guard(path: str | os.PathLike, model: nn.Module, *, verify_model: bool = True, checker: nn.Module | None = None, **overrides: Any) -> Any:
    """Loads a guard saved by :meth:`Guard.save` around ``model``.

    Args:
        path: the file.
        model: the same classifier the guard was fitted on (same weights: its logits on a fixed probe input are
            compared with those recorded at fit time, :mod:`hfguard.fingerprint`; a float16/bfloat16 copy passes).
        verify_model: False skips that comparison (a model changed on purpose, e.g. quantised; the guard's
            statistics then describe the original), and the checker's.
        checker: the checker network the guard was fitted with (:mod:`hfguard.checker`), whose weights the file does
            not hold; required for such a file, refused for one fitted without it. Checked like ``model``.
        overrides: settings to change: any of ``LOAD_OVERRIDES`` (e.g. ``policy="filter"``,
            ``filter_sigma=0.8``). Settings that shaped the learned state (``fpr``, ``layers``,
            ``normalize``, ...) can only change by fitting again.

    Raises:
        SettingsError: an unknown override, or one that cannot be honoured without fitting again (a ``ValueError``).
        StateFileError: missing, truncated, tampered with or foreign file.
        ModelMismatchError: ``model`` does not have the saved layers with the saved shapes, or has other weights; the
            file needs a checker and none was given, or ``checker`` has other weights than the fitted one.
        SettingsError: a ``checker`` for a file fitted without one.
    """
    # outside any caller's inference_mode: the buffers must stay usable by gradients (score().backward(), export)
    with torch.inference_mode(False):
        return _load(path, model, overrides, verify_model, checker)


def _load(path: str | os.PathLike, model: nn.Module, overrides: dict[str, Any], verify_model: bool, checker: nn.Module | None) -> Any:
    header, tensors = read_guard_file(path)
    layout = header["spec"]  # the header key keeps its format-1 name
    known = set(inspect.signature(Guard.__init__).parameters) - {"self", "model", "checker"}
    if layout.get("checker", False) and checker is None:
        raise ModelMismatchError(f"{os.fspath(path)!r} was fitted with a checker network, whose weights a guard file does not hold: "
                                 "pass it as hfguard.load(path, model, checker=net)")
    if checker is not None and not layout.get("checker", False):
        raise SettingsError(f"{os.fspath(path)!r} was fitted without a checker network; fit again with protect(model, checker=net) to use one")
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SettingsError(f"load() got unknown setting(s) {unknown}; settings load() can change: {list(LOAD_OVERRIDES)}")
    fixed = sorted(set(overrides) - set(LOAD_OVERRIDES))
    if fixed:
        raise SettingsError(
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
        "neighbour_bank": header.get("neighbour_bank", 0),  # before format 7: no banks
        # before 0.7.3 not saved (a refit used the defaults and the fitted sigma); keys a later version may add are skipped
        **{k: v for k, v in header.get("fit_settings", {}).items() if k in known},
    }
    settings.update(overrides)
    guard = Guard(model, checker=checker, **settings)
    named = dict(model.named_modules())
    missing = [n for n in layout["layers"] if n not in named]
    if missing:
        raise ModelMismatchError(f"the model has no module(s) {missing}; this guard was saved for a model that has them")
    param = next(model.parameters(), None)
    example = torch.zeros(1, *layout["input_shape"], device=param.device if param is not None else "cpu", dtype=param.dtype if param is not None else torch.float32)
    with eval_mode(model):  # every submodule's own mode comes back (a BatchNorm the user froze stays frozen)
        infos, out = discover_layers(model, example, [(n, named[n]) for n in layout["layers"]])
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[1] != layout["num_classes"]:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelMismatchError(f"the guard was fitted on a model with {layout['num_classes']} outputs; this model returns {got}")
    saved = layout["layer_shapes"]
    for info in infos:
        if info.name in saved and list(info.shape) != saved[info.name]:
            raise ModelMismatchError(f"layer {info.name!r} outputs shape {list(info.shape)}; the guard was fitted on {saved[info.name]}")
    saved_print = header.get("model_fingerprint")  # files of 0.6.1 and before have none
    if saved_print is not None:
        now = model_fingerprint(model, guard, tuple(layout["input_shape"]), header["input_range"])  # the fit's range, not an override
        off = fingerprint_distance(saved_print, now)
        if verify_model and off > TOLERANCE:
            raise ModelMismatchError(
                f"this model's logits on a fixed probe input differ from those of the model the guard was fitted on by up to {off:.3g} "
                f"times their spread (a copy in another precision stays within {TOLERANCE}): it has other weights, and the guard's "
                "statistics do not describe it. Fit a guard on this model, or pass verify_model=False if you changed it on purpose "
                "(e.g. quantised it) and accept statistics of the original"
            )
        guard._model_fingerprint = saved_print
    saved_checker = header.get("checker_fingerprint")
    if checker is not None and saved_checker is not None:
        off = fingerprint_distance(saved_checker, model_fingerprint(checker, guard, tuple(layout["input_shape"]), header["input_range"]))
        if verify_model and off > TOLERANCE:
            raise ModelMismatchError(
                f"this checker's logits on a fixed probe input differ from those of the checker the guard was fitted with by up to {off:.3g} "
                f"times their spread (tolerance {TOLERANCE}): it has other weights, and the guard's checker units do not describe it. "
                "Pass the checker the guard was fitted with, or fit again"
            )
        guard._checker_fingerprint = saved_checker
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
    if "filter_sigma" in overrides and overrides["filter_sigma"] != "auto":  # "auto": the fitted sigma now, chosen again by a refit
        guard.sigma_.fill_(float(overrides["filter_sigma"]))
    # what the file can tell of the fit (the full report, with its timings and self-attack counts, is not saved)
    guard.fit_report = {
        "loaded_from": os.fspath(path),
        "hfguard_version_of_fit": header.get("hfguard_version"),
        "calibration": settings["calibration"],
        "feature_names": evidence.feature_names(guard.evidence_sources),
        "score_features": list(layout["score_features"]),
        "threshold": float(guard.calibrated_threshold),
        "filter_sigma": float(guard.sigma_),
    }
    if param is not None:
        guard.to(param.device)
    return guard
