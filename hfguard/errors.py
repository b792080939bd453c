"""The hfguard error hierarchy.

Every error subclasses :class:`HFGuardError` *and* the matching built-in, so
``except ValueError`` keeps working for users who do not know about hfguard.
"""

from __future__ import annotations

__all__ = [
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
    "MissingDependencyError",
]


class HFGuardError(Exception):
    """Base class of every error raised by hfguard."""


class NotFittedError(HFGuardError, ValueError, AttributeError):
    """A guard was used before :meth:`Guard.fit` was called."""


class SettingsError(HFGuardError, ValueError):
    """A setting given to ``protect`` or ``load`` is invalid, unknown, or cannot change without fitting again."""


class InputError(HFGuardError, ValueError):
    """An input tensor has the wrong dtype or holds non-finite values."""


class ShapeError(InputError):
    """An input tensor has the wrong rank or size."""


class DataError(HFGuardError, ValueError):
    """The data given to ``fit`` cannot be used (empty, bad labels, too few samples)."""


class ModelError(HFGuardError, TypeError):
    """The wrapped model does not behave like a classifier returning logits."""


class StateFileError(HFGuardError, ValueError):
    """A saved guard file is missing, truncated, tampered with or not an hfguard file."""


class ModelMismatchError(StateFileError):
    """A saved guard was fitted on a different model than the one given to ``load``."""


class DatasetNotAvailableError(HFGuardError, FileNotFoundError):
    """A dataset is not installed on this machine."""


class MissingDependencyError(HFGuardError, ImportError):
    """An optional dependency (an extra such as ``hfguard[bench]``) is not installed."""
