import torch

from hfguard import combiner


def test_identity_heads_give_the_smooth_maximum_of_the_features():
    z = torch.randn(50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w, b = combiner.identity_heads(4, dtype=torch.float64)
    assert torch.allclose(combiner.head_score(z, w, b), torch.logsumexp(z, 1))
    # hard maximum as the temperature goes to 0
    assert torch.allclose(combiner.head_score(z, w, b, 1e-3), z.max(1).values, atol=1e-2)


def test_score_is_monotone_in_each_head_and_differentiable():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 5, dtype=torch.float64, generator=g)
    b = torch.randn(2, dtype=torch.float64, generator=g)
    z = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: combiner.head_score(t, w, b), (z,))
    base = combiner.head_score(z.detach(), w, b)
    assert (combiner.head_score(z.detach(), w, b + torch.tensor([1.0, 0.0], dtype=torch.float64)) > base).all()


def test_logistic_head_separates_shifted_evidence_and_points_the_right_way():
    g = torch.Generator().manual_seed(2)
    clean = torch.randn(600, 3, generator=g)
    attacked = torch.randn(200, 3, generator=g) + torch.tensor([3.0, 0.0, 0.0])  # only feature 0 carries the attack
    w, b = combiner.fit_logistic_head(clean, attacked)
    assert w[0] > 1.0 and w[1:].abs().max() < 0.3 * w[0]
    acc = ((torch.cat([clean, attacked]) @ w + b > 0).float() == torch.cat([torch.zeros(600), torch.ones(200)])).float().mean()
    assert acc > 0.9


def test_standardised_head_has_zero_mean_unit_sd_on_clean():
    g = torch.Generator().manual_seed(3)
    clean = torch.randn(1000, 4, dtype=torch.float64, generator=g)
    w, b = combiner.standardised_head(torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64), 3.0, clean)
    h = clean @ w + b
    assert abs(float(h.mean())) < 1e-9 and abs(float(h.std()) - 1.0) < 1e-9


def test_fit_logistic_head_rejects_bad_shapes():
    import pytest

    with pytest.raises(ValueError, match="same F"):
        combiner.fit_logistic_head(torch.zeros(5, 3), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="need clean and attacked"):
        combiner.fit_logistic_head(torch.zeros(5, 3), torch.zeros(0, 3))
