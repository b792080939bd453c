"""Serving conditions: inference_mode, .to(), torch.compile."""

import warnings

import torch

import hfguard


def test_check_under_inference_mode(fitted, digits):
    x = digits.x_test[:10]
    ref = fitted.check(x)
    with torch.inference_mode():
        v = fitted.check(x)
        s = fitted.score(x)
    assert torch.allclose(v.score, ref.score) and torch.allclose(s, ref.score)


def test_guard_moves_with_to(digits_model, digits):
    g = hfguard.protect(digits_model, progress=False).fit((digits.x_train, digits.y_train))
    x = digits.x_test[:10]
    ref = g.score(x)
    g.to(torch.float64)
    assert g.gaussians[0].whitener.dtype == torch.float64 and next(g.model.parameters()).dtype == torch.float64
    assert torch.allclose(g.score(x.double()), ref.double(), atol=1e-4)
    g.to(torch.float32)


def test_compiled_model_gives_the_eager_scores(digits_model, digits, fitted):
    compiled = torch.compile(digits_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's notes on graph breaks at the hooks
        g = hfguard.protect(compiled, progress=False).fit((digits.x_train, digits.y_train))
        x = digits.x_test[:20]
        assert g.layers == [f"_orig_mod.{n}" for n in fitted.layers]
        assert torch.allclose(g.score(x), fitted.score(x), atol=1e-4)
