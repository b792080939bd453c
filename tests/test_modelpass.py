"""The guard's model pass (hfguard.modelpass): one forward per call, only the sources the score uses, the model's
mode and hooks handed back."""

import pytest
import torch

from hfguard.errors import ModelError
from hfguard.modelpass import ModelPass


def _counting(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
    return calls, handle


def test_check_and_score_run_the_model_once(fitted, digits):
    x = digits.x_test[:32]
    calls, handle = _counting(fitted.model)
    try:
        fitted.check(x)
        fitted.score(x)
    finally:
        handle.remove()
    assert calls == [32, 32]


def test_evaluate_computes_only_the_sources_the_score_uses(fitted, digits):
    needed = fitted._features_needed()
    _, feats = fitted._features(digits.x_test[:8], needed)
    assert {i for i, f in enumerate(feats) if f is not None} == needed | {len(fitted.layers)}


def test_a_failing_model_leaves_its_mode_and_no_hook(fitted, digits):
    model = fitted.model
    original = [m.training for m in model.modules()]
    model.train()
    hooks_before = [len(m._forward_hooks) for m in model.modules()]

    def boom(module, args):
        raise RuntimeError("boom")

    handle = model.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"), pytest.warns(UserWarning, match="training mode"):
            fitted._warned_train = False
            with fitted._eval_model():
                fitted._features(digits.x_test[:4])
    finally:
        handle.remove()
        modes = [m.training for m in model.modules()]
        for m, mode in zip(model.modules(), original):
            m.training = mode
    assert all(modes) and [len(m._forward_hooks) for m in model.modules()] == hooks_before


class _TupleModel:
    """Stands in for a guard whose model returns a tuple instead of logits."""

    model = staticmethod(lambda x: (x, x))


def test_a_model_that_does_not_return_logits_is_a_model_error(digits):
    with pytest.raises(ModelError, match="logits"), torch.no_grad():
        ModelPass._forward_model(_TupleModel(), digits.x_test[:2])
