"""Serving conditions: inference_mode, .to(), torch.compile."""

import warnings

import torch

import hfguard
import hfguard.data


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


def test_compiled_model_gives_the_eager_scores(digits_model, digits):
    """Inductor's code for the model gives the eager guard's scores. Both fit with ``calibration="clean"``: a
    self-attack fit compiles a forward and a backward graph per batch shape (63 s here, beside another job) and runs past
    torch's limit of 8 versions, after which the model runs uncompiled anyway."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's notes on graph breaks at the hooks; the small clean split's note
        eager = hfguard.protect(digits_model, progress=False, calibration="clean").fit((digits.x_train, digits.y_train))
        g = hfguard.protect(torch.compile(digits_model), progress=False, calibration="clean").fit((digits.x_train, digits.y_train))
        x = digits.x_test[:20]
        assert g.layers == [f"_orig_mod.{n}" for n in eager.layers]
        assert torch.allclose(g.score(x), eager.score(x), atol=1e-4)


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


def _bn_dropout_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Dropout(0.5), torch.nn.Linear(8 * 64, 10),
    )


def test_protect_load_and_fit_under_inference_mode_give_a_guard_gradients_can_use(digits, digits_model, tmp_path):
    """Defect: a guard built or loaded under torch.inference_mode had inference-tensor buffers, so score().backward(),
    inspect(differentiable=True) and export_onnx failed for good; fit under it failed in the self-attacks."""
    x = digits.x_test[:4].clone().requires_grad_()
    with torch.inference_mode():
        g = hfguard.protect(digits_model, progress=False).fit((digits.x_train, digits.y_train))
    assert not any(b.is_inference() for b in g.buffers())
    (grad,) = torch.autograd.grad(g.score(x).sum(), x)  # not backward(): the shared model's parameters get no .grad
    assert torch.isfinite(grad).all()
    g.save(str(tmp_path / "g.safetensors"))
    with torch.inference_mode():
        loaded = hfguard.load(str(tmp_path / "g.safetensors"), digits_model)
    assert not any(b.is_inference() for b in loaded.buffers())
    loaded.inspect(digits.x_test[:2], differentiable=True)
    loaded.export_onnx(str(tmp_path / "g.onnx"), digits.x_test[:2])


def test_a_submodule_left_in_training_mode_is_evaluated_in_eval_mode(digits):
    """Defect: only model.training was looked at, so a model in eval mode holding a BatchNorm or a dropout in
    training mode ran them as such: running statistics moved and two identical checks differed."""
    net = _bn_dropout_net()
    hfguard.data.train_classifier(net, digits.x_train, digits.y_train, epochs=2, seed=0)
    net.eval()
    g = hfguard.protect(net, progress=False, calibration="clean").fit((digits.x_train, digits.y_train))
    net[1].train()
    net[4].train()
    modes = [m.training for m in net.modules()]
    stats = (net[1].running_mean.clone(), int(net[1].num_batches_tracked))
    x = digits.x_test[:32]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the training-mode note
        a, b = g.check(x), g.check(x)
    assert torch.equal(a.score, b.score)
    assert torch.equal(net[1].running_mean, stats[0]) and int(net[1].num_batches_tracked) == stats[1]
    assert [m.training for m in net.modules()] == modes


def test_to_under_inference_mode_keeps_normal_buffers(fitted, digits):
    """Review of 0.6.2: .to()/.double() under inference_mode made inference-tensor buffers (no gradient ever after)."""
    with torch.inference_mode():
        fitted.double()
    try:
        assert not any(b.is_inference() for b in fitted.buffers())
        x = digits.x_test[:2].double().requires_grad_()
        (grad,) = torch.autograd.grad(fitted.score(x).sum(), x)
        assert grad is not None
    finally:
        fitted.float()


def test_a_compiled_custom_module_is_watched_like_the_eager_one(digits):
    """Review: protect(torch.compile(model)) worked only for Sequential models: auto found no layer inside the
    compiled wrapper's _orig_mod (an opaque custom module), and hooks added after its first call never fired.
    Both are TorchDynamo's doing (graph capture and its guards), so dynamo's "eager" backend reproduces them without
    Inductor's code generation (about a minute on 2 cores with a cold cache); the test above runs the default backend."""
    torch.manual_seed(0)
    x = torch.nn.functional.interpolate(digits.x_train, size=16)
    model = hfguard.data.small_resnet(1, 10)
    hfguard.data.train_classifier(model, x, digits.y_train, epochs=1, seed=0)
    model.eval()
    eager = hfguard.protect(model, progress=False, calibration="clean").fit((x, digits.y_train))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = hfguard.protect(torch.compile(model, backend="eager"), progress=False, calibration="clean").fit((x, digits.y_train))
        xt = torch.nn.functional.interpolate(digits.x_test[:16], size=16)
        assert compiled.layers == [f"_orig_mod.{n}" for n in eager.layers]
        assert torch.allclose(compiled.score(xt), eager.score(xt), atol=1e-3)


def test_half_keeps_the_guards_statistics_in_float32(fitted, digits):
    """Review: guard.half() turned the threshold and whitenings to float16 (a large threshold became inf)."""
    fitted.half()
    try:
        assert next(fitted.model.parameters()).dtype == torch.float16
        own = {k: v for k, v in fitted.guard_state().items() if v.is_floating_point()}
        assert own and all(v.dtype == torch.float32 for v in own.values())
        assert torch.isfinite(fitted.score(digits.x_test[:8].half())).all()
    finally:
        fitted.float()


def test_half_moves_the_statistics_without_rounding_them(fitted, digits):
    """Review of the fix above: the buffers went through float16 and back (rounded; a 1e6 threshold became inf)."""
    before = {k: v.clone() for k, v in fitted.guard_state().items()}
    threshold = fitted.calibrated_threshold.clone()
    fitted.calibrated_threshold.fill_(1e6)
    fitted.half()
    try:
        assert float(fitted.calibrated_threshold) == 1e6
        after = fitted.guard_state()
        assert all(torch.equal(before[k], after[k]) for k in before if k != "calibrated_threshold")
    finally:
        fitted.float()
        fitted.calibrated_threshold.copy_(threshold)
