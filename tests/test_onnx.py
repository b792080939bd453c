import numpy as np
import pytest
import torch
import torchvision

import hfguard


def _parity(guard, x, path):
    guard.export_onnx(str(path), x[:4])
    ort_guard = hfguard.OnnxGuard(str(path))
    v, o = guard.check(x), ort_guard.check(x)
    assert (o.logits - v.logits).abs().max() <= 1e-4
    assert (o.score - v.score).abs().max() <= 1e-4
    assert torch.equal(o.flagged, v.flagged)
    assert torch.equal(o.origin, v.origin)
    assert torch.equal(o.filtered, v.filtered)
    return o


@pytest.mark.parametrize("policy", ["flag", "filter"])
def test_sequential_cnn_parity(digits_model, digits, policy, tmp_path):
    g = hfguard.protect(digits_model, policy=policy, progress=False).fit((digits.x_train, digits.y_train))
    from hfguard.attacks import pgd

    x = torch.cat([digits.x_test[:60], pgd(digits_model, digits.x_test[60:100], digits.y_test[60:100], 0.15, steps=10)])
    o = _parity(g, x, tmp_path / "g.onnx")
    assert o.flagged.any() and (~o.flagged).any()  # both branches exercised, batch size differs from export
    assert not (tmp_path / "g.onnx.data").exists()  # one file


def test_resnet18_parity(tmp_path):
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    x = torch.rand(96, 3, 32, 32)
    g = hfguard.protect(m, progress=False, calibration_size=40, calibration="clean").fit((x, torch.arange(96) % 4))  # random weights: nothing to learn from attacks
    _parity(g, x[:20], tmp_path / "r.onnx")


def test_onnx_guard_rejects_wrong_shapes(fitted, digits, tmp_path):
    fitted.export_onnx(str(tmp_path / "g.onnx"), digits.x_test[:2])
    og = hfguard.OnnxGuard(str(tmp_path / "g.onnx"))
    with pytest.raises(hfguard.ShapeError):
        og.check(torch.zeros(2, 1, 9, 9))
    with pytest.raises(hfguard.InputError):
        og.check(np.zeros((2, 1, 8, 8)))


def test_nan_rows_are_flagged_like_guard_check(digits_model, digits, tmp_path):
    """Defect: OnnxGuard.check returned NaN images unflagged while Guard.check flags them."""
    g = hfguard.protect(digits_model, progress=False, nonfinite="flag").fit((digits.x_train, digits.y_train))
    g.export_onnx(str(tmp_path / "g.onnx"), digits.x_test[:2])
    og = hfguard.OnnxGuard(str(tmp_path / "g.onnx"))
    x = digits.x_test[:6].clone()
    x[1, 0, 2, 3] = float("nan")
    x[4, 0, 0, 0] = float("inf")
    v, o = g.check(x), og.check(x)
    assert o.flagged[1] and o.flagged[4] and torch.isinf(o.score[[1, 4]]).all()
    assert torch.equal(o.flagged, v.flagged)
    # under the filter policy too: the zeroed image's own score decides its filtering, in both (defect: torch filtered every NaN row)
    gf = hfguard.load(str(_saved(g, tmp_path)), digits_model, policy="filter")
    gf.export_onnx(str(tmp_path / "f.onnx"), digits.x_test[:2])
    vf, of = gf.check(x), hfguard.OnnxGuard(str(tmp_path / "f.onnx")).check(x)
    assert torch.equal(vf.flagged, of.flagged) and torch.equal(vf.filtered, of.filtered)
    assert torch.allclose(vf.logits, of.logits, atol=1e-3)
    assert not vf.filtered[[1, 4]].any()  # the zeroed images of this batch are not suspicious themselves
    strict = hfguard.protect(digits_model, progress=False).fit((digits.x_train, digits.y_train))
    strict.export_onnx(str(tmp_path / "s.onnx"), digits.x_test[:2])
    with pytest.raises(hfguard.InputError, match="NaN"):
        hfguard.OnnxGuard(str(tmp_path / "s.onnx")).check(x)


def test_a_map_the_pooling_grid_does_not_divide_exports(tmp_path):
    """Defect: a small CNN on 30x30 inputs could not be exported (adaptive_avg_pool2d)."""
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(16 * 15 * 15, 5)).eval()
    x = torch.rand(120, 1, 30, 30)
    g = hfguard.protect(m, progress=False, calibration_size=40, calibration="clean").fit((x, torch.arange(120) % 5))
    assert 30 % g.poolings["1"].size and 15 % g.poolings["4"].size  # neither map divides by its pooling grid
    _parity(g, x[:16], tmp_path / "c30.onnx")


def _saved(guard, tmp_path):
    path = tmp_path / "guard.safetensors"
    guard.save(str(path))
    return path


def test_export_leaves_every_module_mode_as_it_was(fitted, digits, tmp_path):
    """Defect: torch.onnx.export put the exported wrapper back in training mode, recursively: the user's model came
    back in training mode (BatchNorm then updated its statistics on every plain call)."""
    model = fitted.model
    for mode in ([False] * len(list(model.modules())), [i % 2 == 1 for i in range(len(list(model.modules())))]):
        for m, t in zip(model.modules(), mode):
            m.training = t
        guard_modes = [m.training for m in fitted.modules() if m is not model and not any(m is s for s in model.modules())]
        fitted.export_onnx(str(tmp_path / "g.onnx"), digits.x_test[:2])
        assert [m.training for m in model.modules()] == mode
        assert [m.training for m in fitted.modules() if m is not model and not any(m is s for s in model.modules())] == guard_modes
    model.eval()


def test_onnx_guard_errors_name_what_was_got(fitted, digits, tmp_path):
    with pytest.raises(hfguard.StateFileError, match="no ONNX file"):
        hfguard.OnnxGuard(str(tmp_path / "missing.onnx"))
    fitted.export_onnx(str(tmp_path / "g.onnx"), digits.x_test[:2])
    og = hfguard.OnnxGuard(str(tmp_path / "g.onnx"))
    from_bytes = hfguard.OnnxGuard((tmp_path / "g.onnx").read_bytes())  # a serialised model, as onnxruntime takes
    assert torch.equal(from_bytes.check(digits.x_test[:3]).flagged, og.check(digits.x_test[:3]).flagged)
    with pytest.raises(hfguard.InputError, match="uint8"):
        og.check(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(hfguard.ShapeError, match="4-d"):
        og.check(torch.zeros(1, 8, 8))
    (tmp_path / "garbage.onnx").write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(hfguard.StateFileError, match="not an ONNX graph"):  # review: onnxruntime's InvalidProtobuf leaked
        hfguard.OnnxGuard(str(tmp_path / "garbage.onnx"))


def test_onnx_guard_checks_the_pixel_range_as_the_guard_does(digits_model, digits, tmp_path):
    """Review: a strict guard refused pixels out of its input_range; its exported graph accepted them silently."""
    from tests.conftest import Normalized

    x = digits.x_test[:4]
    for normalize, model, inputs in ((None, digits_model, x), (([0.3], [0.4]), Normalized(digits_model, 0.3, 0.4), (x - 0.3) / 0.4)):
        for strict in (True, False):
            g = hfguard.protect(model, calibration="clean", progress=False, strict=strict, normalize=normalize)
            g.fit(((digits.x_train - 0.3) / 0.4 if normalize else digits.x_train, digits.y_train))
            g.export_onnx(str(tmp_path / "g.onnx"), inputs[:2])
            og = hfguard.OnnxGuard(str(tmp_path / "g.onnx"))
            assert torch.equal(og.check(inputs).flagged, g.check(inputs).flagged)  # in range: no complaint
            far = inputs * 255
            if strict:
                for run in (g.check, og.check):
                    with pytest.raises(hfguard.InputError, match="pixel values should lie in"):
                        run(far)
            else:
                for run in (g.check, og.check):
                    with pytest.warns(UserWarning, match="pixel values should lie in"):
                        run(far)
