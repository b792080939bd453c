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


def test_threads_with_a_model_in_training_mode_never_run_it_in_training_mode(digits):
    """Defect: one thread's restore of model.train() let another thread's forward run in training mode,
    so BatchNorm's running statistics changed (the user's model was modified)."""
    import threading

    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = hfguard.protect(model, progress=False, calibration="clean").fit((digits.x_train, digits.y_train))
    model.train()
    bn = model[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    x = digits.x_test[:32]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = g.check(x).score
    errors, results = [], []

    def work():
        try:
            for _ in range(25):
                results.append(g.check(x).score)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        threads = [threading.Thread(target=work) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert model.training  # handed back as it came
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1]) and int(bn.num_batches_tracked) == stats[2]
    assert len(results) == 150 and all(torch.allclose(r, ref) for r in results)


def test_data_parallel_is_refused_clearly(digits_model):
    import pytest
    from torch import nn

    with pytest.raises(hfguard.ModelError, match=r"protect\(model.module\)"):
        hfguard.protect(nn.DataParallel(digits_model))
