"""Saving and loading a guard: safetensors tensors plus a small JSON header.

Nothing is ever unpickled.  The header records the format version, the
hfguard version, the watched layers and their shapes, the class count, the
input shape, threshold and policy, and a SHA-256 digest of the header and of
every tensor, so a truncated, edited or foreign file is refused with a
:class:`~hfguard.errors.StateFileError` before anything is used.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from torch import Tensor, nn

from hfguard.errors import ModelMismatchError, StateFileError

__all__ = ["save_guard", "load_guard", "FORMAT_VERSION"]

FORMAT_VERSION = 2
#: older formats this version still reads (format 1: no combiner heads, i.e. the clean-only score)
READABLE_VERSIONS = (1, 2)
#: settings a loaded guard may change; the others are baked into the learned state
LOAD_OVERRIDES = ("policy", "filter_sigma", "input_range", "strict", "nonfinite", "progress", "batch_size")
_KEY = "hfguard"


def _digest(header: dict[str, Any], tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous().reshape(-1)
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(tensors[k].shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_guard(guard: Any, path: str | os.PathLike) -> None:
    """Writes ``guard``'s learned state to ``path``."""
    from safetensors.torch import save_file

    from hfguard import __version__

    guard._require_fitted()
    tensors = {k: v.detach().cpu().contiguous() for k, v in guard.guard_state().items()}
    header = {
        "format_version": FORMAT_VERSION,
        "hfguard_version": __version__,
        "spec": guard.spec,
        "policy": guard.policy,
        "fpr": guard.fpr,
        "normalize": guard.normalize,
        "threshold": float(guard.threshold_),
        "filter_sigma": float(guard.sigma_),
        "max_features": guard.max_features,
        "input_range": guard.input_range,
        "strict": guard.strict,
        "nonfinite": guard.nonfinite,
        "calibration": guard.calibration,
        "attack_families": guard.attack_families,
    }
    meta = {_KEY: json.dumps(header, sort_keys=True), "digest": _digest(header, tensors)}
    save_file(tensors, os.fspath(path), metadata=meta)


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors import safe_open

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise StateFileError(f"no guard file at {p!r}")
    try:
        with safe_open(p, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise StateFileError(f"{p!r} is not a readable safetensors file ({type(exc).__name__}: {exc}); it may be truncated or not an hfguard file") from None
    if _KEY not in meta or "digest" not in meta:
        raise StateFileError(f"{p!r} is a safetensors file but not an hfguard guard (no hfguard header)")
    try:
        header = json.loads(meta[_KEY])
    except json.JSONDecodeError as exc:
        raise StateFileError(f"{p!r} has a corrupt hfguard header: {exc}") from None
    if not isinstance(header, dict) or header.get("format_version") not in READABLE_VERSIONS:
        got = header.get("format_version") if isinstance(header, dict) else header
        raise StateFileError(f"{p!r}: expected hfguard format version {' or '.join(map(str, READABLE_VERSIONS))}, got {got!r}; re-fit and save the guard with this hfguard version")
    if _digest(header, tensors) != meta["digest"]:
        raise StateFileError(f"{p!r} has been modified since it was saved (checksum mismatch)")
    return header, tensors


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
    from hfguard.guard import Guard
    from hfguard.taps import discover_layers

    header, tensors = _read(path)
    spec = header["spec"]
    fixed = sorted(set(overrides) - set(LOAD_OVERRIDES))
    if fixed:
        raise ValueError(
            f"load() cannot change {fixed}: they shaped the learned state (threshold, statistics); fit the guard again with them. "
            f"Settings load() can change: {list(LOAD_OVERRIDES)}"
        )
    settings = {
        "layers": spec["layers"],
        "policy": header["policy"],
        "fpr": header["fpr"],
        "normalize": header["normalize"],
        "max_features": header["max_features"],
        "filter_sigma": header["filter_sigma"],
        "input_range": header["input_range"],
        "strict": header["strict"],
        "nonfinite": header["nonfinite"],
        "score_features": spec["score_features"],
        "calibration": header.get("calibration", "clean"),
        "attack_families": header.get("attack_families", "all"),
    }
    settings.update(overrides)
    guard = Guard(model, **settings)
    named = dict(model.named_modules())
    missing = [n for n in spec["layers"] if n not in named]
    if missing:
        raise ModelMismatchError(f"the model has no module(s) {missing}; this guard was saved for a model that has them")
    param = next(model.parameters(), None)
    example = torch.zeros(1, *spec["input_shape"], device=param.device if param is not None else "cpu", dtype=param.dtype if param is not None else torch.float32)
    was_training = model.training
    try:
        model.eval()
        infos, out = discover_layers(model, example, [(n, named[n]) for n in spec["layers"]])
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[1] != spec["num_classes"]:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelMismatchError(f"the guard was fitted on a model with {spec['num_classes']} outputs; this model returns {got}")
    saved = spec["layer_shapes"]
    for info in infos:
        if info.name in saved and list(info.shape) != saved[info.name]:
            raise ModelMismatchError(f"layer {info.name!r} outputs shape {list(info.shape)}; the guard was fitted on {saved[info.name]}")
    guard._allocate(spec)
    own = guard.guard_state()
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
