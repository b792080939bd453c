import torch

from hfguard.filters import LowPass, choose_sigma, lowpass


def test_module_and_function_agree():
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(LowPass(0.8)(x), lowpass(x, 0.8))


def test_lowpass_removes_high_frequencies_and_keeps_constants():
    x = torch.ones(1, 1, 16, 16) * 0.5
    assert torch.allclose(lowpass(x, 1.0), x, atol=1e-6)
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2
    y = lowpass(checker[None, None].float(), 1.0)
    assert y.std() < 0.1 * checker.float().std()


def test_lowpass_small_images_and_zero_sigma():
    x = torch.rand(2, 1, 8, 8)
    assert lowpass(x, 2.0).shape == x.shape
    assert torch.equal(lowpass(x, 0.0), x)


def test_lowpass_gradcheck():
    x = torch.rand(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: lowpass(t, 0.7), (x,))


def test_choose_sigma_respects_max_flip():
    # a "model" that predicts whether the centre pixel is bright: blur changes it quickly
    def predict(p):
        return (p[:, 0, 4, 4] > 0.6).long()

    imgs = torch.rand(200, 1, 9, 9, generator=torch.Generator().manual_seed(0))
    sigma, rates = choose_sigma(predict, imgs, (0.3, 0.5, 1.0, 2.0), max_flip=0.05)
    assert rates[sigma] <= 0.05
    assert all(r > 0.05 for s, r in rates.items() if s > sigma)


def test_filtered_logits_are_the_model_on_the_low_passed_pixels(digits_model, digits):
    """Under policy='filter' a flagged row's logits are model(normalize(lowpass(pixels))), with and without normalize."""
    import hfguard
    from hfguard.filters import lowpass

    from .conftest import Normalized

    mean, std = 0.3, 0.2
    x = digits.x_test[:12]
    cases = [
        (digits_model, None, x, x),
        (Normalized(digits_model, mean, std).eval(), ([mean], [std]), (x - mean) / std, x),
    ]
    for model, norm, inputs, pixels in cases:
        fit_x = digits.x_train if norm is None else (digits.x_train - mean) / std
        g = hfguard.protect(model, policy="filter", normalize=norm, progress=False, filter_sigma=0.8, calibration="clean").fit((fit_x, digits.y_train))
        g.calibrated_threshold.fill_(float("-inf"))  # flag every row
        v = g.check(inputs)
        assert v.filtered.all()
        smoothed = lowpass(pixels, 0.8)
        expected = model(smoothed if norm is None else (smoothed - mean) / std)
        assert torch.allclose(v.logits, expected, atol=1e-5)
