"""The optional checker network (hfguard.checker): its maths, its place in fit/score/check, save/load and ONNX."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import hfguard
from hfguard.checker import adversarial_training, checker_term, class_tail_units, combined_score, tail_units
from hfguard.data import small_cnn
from hfguard.errors import ModelError, ModelMismatchError, SettingsError
from tests.conftest import assert_same_state, model_state


@pytest.fixture(scope="module")
def checker(digits):
    torch.manual_seed(1)
    return adversarial_training(small_cnn(1, 10, 8), digits.x_train, digits.y_train, eps=0.1, epochs=4, steps=2, seed=1)


@pytest.fixture(scope="module")
def checked(digits_model, digits, checker):
    return hfguard.protect(digits_model, progress=False, checker=checker).fit((digits.x_train, digits.y_train))


def test_tail_units_are_the_median_and_the_distance_to_the_quantile():
    v = torch.arange(101, dtype=torch.float64)
    med, unit = tail_units(v, 0.9)
    assert med == 50 and unit == pytest.approx(40)
    assert tail_units(torch.zeros(10), 0.99) == (0.0, 1e-6)  # a tail tied to its median: the floor, not a division by zero


def test_a_class_with_few_rows_takes_the_pooled_tail():
    torch.manual_seed(0)
    values = torch.cat([torch.randn(200), 10 + torch.randn(200), torch.randn(5)])
    pred = torch.cat([torch.zeros(200), torch.ones(200), torch.full((5,), 2)]).long()
    med, unit, pooled = class_tail_units(values, pred, 4, quantile=0.99, min_rows=50)
    assert pooled == 2  # class 2 (5 rows) and class 3 (none)
    assert med[0] == pytest.approx(float(values[:200].median()), abs=0.05) and med[1] == pytest.approx(float(values[200:400].quantile(0.5)), abs=1e-9)
    pooled_med, pooled_unit = tail_units(values, 0.99)
    assert med[2] == med[3] == pytest.approx(pooled_med) and unit[2] == pytest.approx(pooled_unit)


def test_the_combined_score_is_the_larger_term_in_tail_units():
    g = torch.tensor([1.0, 5.0])
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0]])
    pred = torch.tensor([1, 1])
    term = checker_term(logits, pred)  # the checker disputes row 0, backs row 1
    out = combined_score(g, term, pred, torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64),
                         torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    assert out[0] == pytest.approx(float(term[0])) and out[1] == pytest.approx(2.0)


def test_fit_calibrates_the_combined_score_and_reports_the_checker(checked, digits):
    rep = checked.fit_report["checker"]
    assert 0.5 < rep["agreement_with_model"] <= 1 and rep["classes_on_pooled_tail"] == 10  # digits: under 50 threshold rows per class
    assert float(checked.guard_unit) > 0 and bool((checked.checker_unit > 0).all())
    fpr = float(checked.check(digits.x_test).flagged.float().mean())
    assert 0.0 < fpr < 0.15  # about 5 % (185 threshold rows on digits)


def test_the_score_sees_the_checker_and_is_differentiable_through_it(checked, fitted, digits, digits_model, checker):
    x = digits.x_test[:64]
    with torch.no_grad():
        pred = digits_model(x).argmax(1)
        term = checker_term(checker(x), pred)
        g = fitted.score(x)  # same model and data: the same guard term as the checked guard's own
    expected = torch.maximum((g.double() - checked.guard_median) / checked.guard_unit,
                             (term.double() - checked.checker_median[pred]) / checked.checker_unit[pred])
    assert torch.allclose(checked.score(x).double(), expected, atol=1e-4)
    xr = x.clone().requires_grad_(True)
    checked.score(xr).sum().backward()
    assert xr.grad is not None and bool(torch.isfinite(xr.grad).all()) and float(xr.grad.abs().sum()) > 0
    assert all(p.grad is None for p in checker.parameters())


def test_check_runs_the_checker_in_eval_mode_and_leaves_it_as_it_was(digits_model, digits, checker):
    dropped = nn.Sequential(checker, nn.Dropout(0.5)).eval()  # random in training mode: eval mode is visible in the scores
    guard = hfguard.protect(digits_model, progress=False, checker=dropped, calibration="clean").fit((digits.x_train, digits.y_train))
    x = digits.x_test[:32]
    reference = guard.check(x).score
    dropped.train()
    before = model_state(dropped)
    with pytest.warns(UserWarning, match="checker network .* is in training mode"):
        scores = guard.check(x).score
    assert torch.equal(scores, reference)
    assert_same_state(before, model_state(dropped))
    assert dropped.training


def test_save_and_load_need_the_same_checker(checked, digits, digits_model, checker, tmp_path):
    path = tmp_path / "g.safetensors"
    checked.save(path)
    assert not any(k.startswith("checker.") for k in checked.guard_state())
    loaded = hfguard.load(path, digits_model, checker=checker)
    assert torch.equal(loaded.score(digits.x_test), checked.score(digits.x_test))
    with pytest.raises(ModelMismatchError, match="checker=net"):
        hfguard.load(path, digits_model)
    torch.manual_seed(5)
    other = small_cnn(1, 10, 8).eval()
    with pytest.raises(ModelMismatchError, match="checker's logits"):
        hfguard.load(path, digits_model, checker=other)
    hfguard.load(path, digits_model, checker=other, verify_model=False)  # changed on purpose: accepted
    from hfguard.io import FORMAT_VERSION, read_guard_file

    assert read_guard_file(path)[0]["format_version"] == FORMAT_VERSION == 8  # 0.7 refuses it by its version


def test_a_half_precision_model_beside_a_float32_checker(checked, digits, digits_model, checker, tmp_path):
    import copy

    path = tmp_path / "g.safetensors"
    checked.save(path)
    half = hfguard.load(path, copy.deepcopy(digits_model).half(), checker=checker)
    v, ref = half.check(digits.x_test.half()), checked.check(digits.x_test)
    assert v.score.dtype == ref.score.dtype == torch.float32  # the score keeps the guard's dtype
    assert float((v.flagged == ref.flagged).float().mean()) > 0.97


def test_a_file_without_a_checker_refuses_one(saved_plain, digits_model, checker):
    with pytest.raises(SettingsError, match="without a checker"):
        hfguard.load(saved_plain, digits_model, checker=checker)


@pytest.fixture()
def saved_plain(fitted, tmp_path):
    path = tmp_path / "plain.safetensors"
    fitted.save(path)
    return path


def test_onnx_export_includes_the_checker(checked, digits, tmp_path):
    path = tmp_path / "g.onnx"
    checked.export_onnx(path, digits.x_test[:4])
    og = hfguard.OnnxGuard(path)
    x = digits.x_test[:100]
    v, o = checked.check(x), og.check(x)
    assert np.allclose(np.asarray(o.score, dtype=np.float64), v.score.double().numpy(), atol=1e-4)
    assert bool((torch.as_tensor(np.asarray(o.flagged)) == v.flagged).float().mean() > 0.98)


def test_bad_checkers_get_typed_errors(digits_model, digits):
    with pytest.raises(ModelError, match="checker= expects a torch.nn.Module"):
        hfguard.protect(digits_model, checker=lambda x: x)
    with pytest.raises(ModelError, match="the wrapped model itself"):
        hfguard.protect(digits_model, checker=digits_model)
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    guard = hfguard.protect(digits_model, progress=False, checker=wrong, calibration="clean")
    with pytest.raises(ModelError, match=r"checker must return logits of shape \(N, K\)"):
        guard.fit((digits.x_train, digits.y_train))
    assert not guard.fitted  # a failed fit leaves the guard as it was


def test_adversarial_training_checks_its_arguments_and_freezes_the_net(digits):
    with pytest.raises(ValueError, match="steps >= 1"):
        adversarial_training(small_cnn(1, 10, 8), digits.x_train, digits.y_train, eps=0.1, steps=0)
    with pytest.raises(ValueError, match="expected images"):
        adversarial_training(small_cnn(1, 10, 8), digits.x_train[:, 0], digits.y_train, eps=0.1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        adversarial_training(small_cnn(1, 10, 8).requires_grad_(False), digits.x_train, digits.y_train, eps=0.1)
    net = adversarial_training(small_cnn(1, 10, 8), digits.x_train[:256], digits.y_train[:256], eps=0.1, epochs=1, steps=1,
                               normalize=([0.5], [0.25]))
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_adversarial_training_cosine_schedule_decays_the_learning_rate(digits, monkeypatch):
    with pytest.raises(ValueError, match="schedule must be"):
        adversarial_training(small_cnn(1, 10, 8), digits.x_train, digits.y_train, eps=0.1, schedule="step")
    seen = []
    step = torch.optim.Adam.step

    def recording(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", recording)
    adversarial_training(small_cnn(1, 10, 8), digits.x_train[:300], digits.y_train[:300], eps=0.1, epochs=2, steps=1, lr=0.01, schedule="cosine")
    assert seen == pytest.approx([0.01 * 0.5 * (1 + math.cos(math.pi * i / 6)) for i in range(6)])  # 3 batches an epoch, the last partial
    seen.clear()
    adversarial_training(small_cnn(1, 10, 8), digits.x_train[:300], digits.y_train[:300], eps=0.1, epochs=2, steps=1, lr=0.01)
    assert seen == [0.01] * 6


def test_adversarial_training_soft_targets_match_hard_labels_when_one_hot(digits):
    x, y = digits.x_train[:256], digits.y_train[:256]
    nets = []
    for target in (y, torch.nn.functional.one_hot(y, 10).float()):
        torch.manual_seed(3)
        nets.append(adversarial_training(small_cnn(1, 10, 8), x, target, eps=0.1, epochs=1, steps=2, seed=3))
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # genuinely soft targets are used as such, not through their argmax
    soft = 0.6 * torch.nn.functional.one_hot(y, 10).float() + 0.4 * torch.nn.functional.one_hot((y + 1) % 10, 10).float()
    torch.manual_seed(3)
    net = adversarial_training(small_cnn(1, 10, 8), x, soft, eps=0.1, epochs=1, steps=2, seed=3)
    assert any(not torch.allclose(a, b) for a, b in zip(nets[0].parameters(), net.parameters()))


def test_adversarial_training_checks_its_targets_and_leaves_frozen_parameters(digits):
    x, y = digits.x_train[:256], digits.y_train[:256]
    with pytest.raises(ValueError, match="integer labels"):
        adversarial_training(small_cnn(1, 10, 8), x, y.float(), eps=0.1)
    with pytest.raises(ValueError, match="integer labels"):
        adversarial_training(small_cnn(1, 10, 8), x, torch.nn.functional.one_hot(y, 10), eps=0.1)
    with pytest.raises(ValueError, match="rows summing to 1"):
        adversarial_training(small_cnn(1, 10, 8), x, torch.randn(len(y), 10), eps=0.1)  # logits, not probabilities
    teacher = small_cnn(1, 10, 8)
    probs = torch.softmax(teacher(x), 1)  # computed with gradients: training must not reach into the teacher
    net = small_cnn(1, 10, 8)
    net[0].requires_grad_(False)
    before = net[0].weight.clone()
    adversarial_training(net, x, probs, eps=0.1, epochs=2, steps=1)
    assert torch.equal(net[0].weight, before) and all(p.grad is None for p in teacher.parameters())
