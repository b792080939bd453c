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
from torch import Tensor

from hfguard.errors import StateFileError

__all__ = ["save_guard", "read_guard_file", "FORMAT_VERSION", "FORMAT_WITHOUT_CHECKER", "READABLE_VERSIONS", "LOAD_OVERRIDES"]

FORMAT_VERSION = 8
#: what a guard without a checker network writes: its file is a format-7 file, which 0.7 still reads
FORMAT_WITHOUT_CHECKER = 7
#: older formats this version still reads (format 1: no combiner heads, i.e. the clean-only score;
#: formats 1-2 name the threshold tensor ``threshold_``; format 3 assumes one class token in every token layer;
#: formats 1-4 have no linear probes; format 6 has the same tensors as 5, but its header may name self-attack
#: families that 0.5 does not know, so 0.5 must refuse it by its version rather than fail on the settings;
#: formats 1-6 have no nearest-neighbour banks; formats 1-7 no checker network's units, and 0.7 must refuse a file
#: with them by its version)
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8)
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

    from hfguard.version import __version__

    guard._require_fitted()
    tensors = {k: v.detach().cpu().contiguous() for k, v in guard.guard_state().items()}
    header = {
        "format_version": FORMAT_VERSION if guard.layout.get("checker", False) else FORMAT_WITHOUT_CHECKER,
        "hfguard_version": __version__,
        "spec": guard.layout,
        "policy": guard.policy,
        "fpr": guard.fpr,
        "normalize": guard.normalize,
        "threshold": float(guard.calibrated_threshold),
        "filter_sigma": float(guard.sigma_),
        "max_features": guard.max_features,
        "input_range": guard.input_range,
        "strict": guard.strict,
        "nonfinite": guard.nonfinite,
        "calibration": guard.calibration,
        "attack_families": guard.attack_families,  # the list the heads were fitted on; a loaded guard refits it
        "neighbour_bank": guard.neighbour_bank,
        # what protect() was given ("auto", "all" or a list): a loaded guard fitted again chooses its features the same way
        "score_features_setting": guard.score_features_setting,
        # the other settings a fit reads (0.7.3; files before it lack them and a loaded guard took the defaults): a loaded
        # guard fitted again fits as the saved one did ("auto" filter sigma chosen again, same hold-out, seed and sizes)
        "fit_settings": {
            "layers": guard.layers_setting, "filter_sigma": guard.filter_sigma_setting, "max_filter_flip": guard.max_filter_flip,
            "calibration_size": guard.calibration_size, "attack_size": guard.attack_size, "seed": guard.seed,
        },
    }
    if guard._model_fingerprint is not None:  # the fitted model's logits on a fixed input (hfguard.fingerprint); load compares
        header["model_fingerprint"] = guard._model_fingerprint
    if getattr(guard, "_checker_fingerprint", None) is not None:  # the same for the checker network (its weights are not saved)
        header["checker_fingerprint"] = guard._checker_fingerprint
    meta = {_KEY: json.dumps(header, sort_keys=True), "digest": _digest(header, tensors)}
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(parent):
        raise StateFileError(f"cannot save the guard to {os.fspath(path)!r}: the directory {parent!r} does not exist")
    save_file(tensors, os.fspath(path), metadata=meta)


def read_guard_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(header, tensors)`` of a guard file, after checking format, header and digest (nothing is unpickled)."""
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
