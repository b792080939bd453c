import pytest

import hfguard
import hfguard.data
from hfguard import errors


@pytest.mark.parametrize(
    "cls, builtin",
    [
        (errors.NotFittedError, ValueError),
        (errors.NotFittedError, AttributeError),
        (errors.SettingsError, ValueError),
        (errors.InputError, ValueError),
        (errors.ShapeError, ValueError),
        (errors.DataError, ValueError),
        (errors.ModelError, TypeError),
        (errors.StateFileError, ValueError),
        (errors.ModelMismatchError, ValueError),
        (errors.DatasetNotAvailableError, FileNotFoundError),
    ],
)
def test_errors_subclass_project_base_and_builtin(cls, builtin):
    assert issubclass(cls, errors.HFGuardError)
    assert issubclass(cls, builtin)


def test_public_names_exported():
    for name in ["protect", "load", "Guard", "Verdict", "Inspection", "NotFittedError", "HFGuardError"]:
        assert hasattr(hfguard, name)


def test_settings_errors_are_typed():
    """Defect: protect(fpr=2) and load()'s override errors were bare ValueErrors, not HFGuardErrors."""
    model = hfguard.data.small_cnn(1, 10, 8)
    with pytest.raises(hfguard.SettingsError, match="fpr"):
        hfguard.protect(model, fpr=2)
    with pytest.raises(hfguard.SettingsError, match="normalize"):
        hfguard.protect(model, normalize=((0.5,), (0.0,)))
    with pytest.raises(hfguard.SettingsError, match="attack_families"):
        hfguard.protect(model, attack_families=["no-such-family"])
