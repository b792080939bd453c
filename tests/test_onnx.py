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
