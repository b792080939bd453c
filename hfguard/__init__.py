"""hfguard: protect a PyTorch image classifier against adversarial examples.

    >>> import hfguard
    >>> guard = hfguard.protect(model).fit(clean_loader)   # doctest: +SKIP
    >>> verdict = guard.check(images)                       # doctest: +SKIP
"""

from hfguard.errors import (
    DataError,
    DatasetNotAvailableError,
    HFGuardError,
    InputError,
    ModelError,
    ModelMismatchError,
    NotFittedError,
    SettingsError,
    ShapeError,
    StateFileError,
)
from hfguard.guard import Guard, protect
from hfguard.results import Inspection, Verdict
from hfguard.version import __version__


def __getattr__(name: str):
    if name == "OnnxGuard":  # lazy: importing onnxruntime costs time
        from hfguard.onnx import OnnxGuard

        return OnnxGuard
    raise AttributeError(f"module 'hfguard' has no attribute {name!r}")


def load(path, model, *, verify_model: bool = True, checker=None, **overrides) -> Guard:
    """Loads a guard saved with :meth:`Guard.save` around ``model`` (and ``checker``, if it was fitted with one; see
    :func:`hfguard.loading.load_guard`)."""
    from hfguard.loading import load_guard

    return load_guard(path, model, verify_model=verify_model, checker=checker, **overrides)


__all__ = [
    "protect",
    "load",
    "Guard",
    "Verdict",
    "Inspection",
    "OnnxGuard",
    "HFGuardError",
    "NotFittedError",
    "SettingsError",
    "InputError",
    "ShapeError",
    "DataError",
    "ModelError",
    "StateFileError",
    "ModelMismatchError",
    "DatasetNotAvailableError",
    "__version__",
]
