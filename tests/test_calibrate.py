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


def test_standardizer_shrinks_towards_a_prior_of_its_own_class():
    """With a prior (fit passes the fit hold-out's statistics when it standardises on calibration_data), a class with few
    rows moves from the prior towards its own statistics in proportion to its count; with none it keeps the prior."""
    g = torch.Generator().manual_seed(0)
    ev = torch.cat([torch.randn(500, 2, generator=g) + 1, torch.randn(5, 2, generator=g) + 100])
    pred = torch.cat([torch.zeros(500), torch.ones(5)]).long()
    prior = (torch.tensor([[0.0, 0.0], [50.0, 50.0], [7.0, 7.0]]), torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    mean, std = calibrate.fit_standardizer(ev, pred, 3, min_count=20, prior=prior)
    assert torch.allclose(mean[0], ev[:500].mean(0), atol=1e-5)  # enough rows: the prior plays no part
    assert torch.allclose(mean[1], 0.25 * ev[500:].mean(0) + 0.75 * prior[0][1], atol=1e-4)
    assert torch.allclose(std[1], 0.25 * ev[500:].std(0) + 0.75 * prior[1][1], atol=1e-4)
    assert torch.equal(mean[2], prior[0][2]) and torch.equal(std[2], prior[1][2])  # no rows: the prior
    one = calibrate.fit_standardizer(ev[:1], pred[:1], 3, prior=prior)  # too few rows for any spread: the prior itself
    assert torch.equal(one[0], prior[0]) and torch.equal(one[1], prior[1])


def test_standardize_uses_the_predicted_class_row():
    ev = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    mean = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    std = torch.tensor([[1.0, 2.0], [0.5, 0.5]])
    z = calibrate.standardize(ev, torch.tensor([0, 1]), mean, std)
    assert torch.allclose(z, torch.tensor([[1.0, 1.0], [0.0, 2.0]]))


def test_a_constant_feature_in_one_class_does_not_explode_its_z_scores():
    """Defect: a class whose held-out gaps are all exactly 0 got std 1e-6, so any positive gap gave z ~ 1e5."""
    g = torch.Generator().manual_seed(0)
    ev = torch.randn(400, 2, generator=g).abs()
    pred = torch.arange(400) % 2
    ev[pred == 0, 1] = 0.0  # class 0: gap always 0 on clean data
    mean, std = calibrate.fit_standardizer(ev, pred, 2)
    pooled = ev[:, 1].std()
    assert std[0, 1] >= calibrate.RELATIVE_FLOOR * pooled * 0.999
    z = calibrate.standardize(torch.tensor([[0.5, 1.0]]), torch.tensor([0]), mean, std)
    assert z.abs().max() < 1.0 / (calibrate.RELATIVE_FLOOR * float(pooled)) + 1


def test_threshold_holds_on_clean_scores_it_never_saw():
    """The quantile is set on one sample; its FPR is measured on an independent one (binomial interval)."""
    g = torch.Generator().manual_seed(1)
    t = calibrate.threshold_at_fpr(torch.randn(4000, generator=g), 0.05)
    fresh = torch.randn(20000, generator=g)
    fpr = float((fresh > t).float().mean())
    # sd of the quantile's FPR with 4000 samples is about 0.0034; of the measurement about 0.0015
    assert abs(fpr - 0.05) < 0.012
