import pytest

import hfguard
from hfguard import errors


@pytest.mark.parametrize(
    "cls, builtin",
    [
        (errors.NotFittedError, ValueError),
        (errors.NotFittedError, AttributeError),
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
