"""Validation of the guard's settings (``protect(...)`` keyword arguments): one :class:`~hfguard.errors.SettingsError` (a ``ValueError``) per broken contract."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from hfguard.errors import SettingsError
from hfguard.fitting import CALIBRATIONS
from hfguard.selfattack import resolve_families

__all__ = ["POLICIES", "validate_settings"]

POLICIES = ("flag", "filter")


def validate_settings(
    *,
    policy: str,
    fpr: float,
    layers: Any,
    filter_sigma: Any,
    calibration_size: int,
    score_features: Any,
    calibration: str,
    attack_size: int,
    attack_families: str | Sequence[str],
    nonfinite: str,
    input_range: Any,
    max_features: int,
    neighbour_bank: int,
    max_filter_flip: float = 0.02,
    batch_size: int = 256,
    seed: int = 0,
) -> None:
    """Raises :class:`~hfguard.errors.SettingsError` naming the setting, what it accepts and what it got."""
    if policy not in POLICIES:
        raise SettingsError(f"policy must be one of {POLICIES}, got {policy!r}")
    if not (_is_number(fpr) and 0.0 < float(fpr) < 1.0):
        raise SettingsError(f"fpr must be in (0, 1), got {fpr!r}")
    if not (_is_number(max_filter_flip) and 0.0 <= float(max_filter_flip) < 1.0):
        raise SettingsError(f"max_filter_flip must be a fraction in [0, 1) of clean predictions the filter may change, got {max_filter_flip!r}")
    _integer("batch_size", batch_size, 1)
    _integer("seed", seed, 0)
    _integer("max_features", max_features, 2, "(a transformer layer keeps two token summaries)")
    _integer("calibration_size", calibration_size, 40)
    _integer("attack_size", attack_size, 50)
    if not (layers == "auto" or (isinstance(layers, (list, tuple)) and layers and all(isinstance(n, str) for n in layers))):
        raise SettingsError(f"layers must be 'auto' or a non-empty list of module names, got {layers!r}")
    if layers != "auto" and len(set(layers)) != len(layers):
        raise SettingsError(f"layers names a module more than once: {sorted(n for n in set(layers) if list(layers).count(n) > 1)}")
    if not (filter_sigma == "auto" or (isinstance(filter_sigma, (int, float)) and filter_sigma >= 0)):
        raise SettingsError(f"filter_sigma must be 'auto' or a non-negative number, got {filter_sigma!r}")
    if not (score_features in ("auto", "all") or (isinstance(score_features, (list, tuple)) and score_features)):
        raise SettingsError(f"score_features must be 'auto', 'all' or a non-empty list of feature names, got {score_features!r}")
    if calibration not in CALIBRATIONS:
        raise SettingsError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    if isinstance(neighbour_bank, bool) or not isinstance(neighbour_bank, numbers.Integral) or neighbour_bank < 0:
        raise SettingsError(f"neighbour_bank must be a non-negative integer (bank rows per source; 0: no nearest-neighbour evidence), got {neighbour_bank!r}")
    resolve_families(attack_families)  # raises ValueError on anything but "auto", "all" or a non-empty list of known families
    if nonfinite not in ("raise", "flag"):
        raise SettingsError(f"nonfinite must be 'raise' or 'flag', got {nonfinite!r}")
    if input_range is not None and not (len(input_range) == 2 and float(input_range[0]) < float(input_range[1])):
        raise SettingsError(f"input_range must be (low, high) with low < high, got {input_range!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integer(name: str, value: Any, minimum: int, why: str = "") -> None:
    """An integer setting (a bool, a float or a string is refused, not truncated) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise SettingsError(f"{name} must be an integer of at least {minimum}{' ' + why if why else ''}, got {value!r}")
