import torch

from hfguard import calibrate


def test_threshold_hits_the_requested_fpr():
    s = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    t = calibrate.threshold_at_fpr(s, 0.05)
    assert abs((s > t).float().mean().item() - 0.05) < 0.002


def test_standardizer_is_per_class_and_shrinks_rare_classes():
    g = torch.Generator().manual_seed(0)
    ev = torch.cat([torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g) + 5, torch.randn(5, 2, generator=g) + 100])
    pred = torch.cat([torch.zeros(500), torch.ones(500), torch.full((5,), 2)]).long()
    mean, std = calibrate.fit_standardizer(ev, pred, 4, min_count=20)
    assert mean.shape == (4, 2)
    assert torch.allclose(mean[0], torch.zeros(2), atol=0.15) and torch.allclose(mean[1], torch.full((2,), 5.0), atol=0.15)
    # class 2 has 5 of 20 samples: a quarter of the way from the global mean to its own
    glob = ev.mean(0)
    assert torch.allclose(mean[2], 0.25 * ev[pred == 2].mean(0) + 0.75 * glob, atol=1e-4)
    assert torch.allclose(mean[3], glob)  # no samples: global statistics


def test_combine_is_monotone_in_each_feature_and_differentiable():
    ev = torch.randn(100, 3, dtype=torch.float64)
    pred = torch.arange(100) % 2
    mean, std = calibrate.fit_standardizer(ev, pred, 2)
    base = calibrate.combine(ev, pred, mean, std)
    for j in range(3):
        bumped = ev.clone()
        bumped[:, j] += 1.0
        assert (calibrate.combine(bumped, pred, mean, std) > base).all()
    x = ev[:4].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: calibrate.combine(t, pred[:4], mean, std), (x,))
