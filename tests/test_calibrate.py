import torch

from hfguard import calibrate


def test_threshold_hits_the_requested_fpr():
    s = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    t = calibrate.threshold_at_fpr(s, 0.05)
    assert abs((s > t).float().mean().item() - 0.05) < 0.002


def test_combine_is_monotone_in_each_feature_and_differentiable():
    ev = torch.randn(100, 3, dtype=torch.float64)
    mean, std = calibrate.fit_standardizer(ev)
    base = calibrate.combine(ev, mean, std)
    for j in range(3):
        bumped = ev.clone()
        bumped[:, j] += 1.0
        assert (calibrate.combine(bumped, mean, std) > base).all()
    x = ev[:4].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: calibrate.combine(t, mean, std), (x,))
