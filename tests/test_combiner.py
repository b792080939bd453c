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


def test_standardised_heads_line_up_their_clean_tails():
    g = torch.Generator().manual_seed(3)
    clean = torch.randn(4000, 4, dtype=torch.float64, generator=g)
    clean[:, 3] = torch.distributions.Exponential(1.0).sample((4000,)).double()  # a heavy upper tail, like the margin's
    heads = [combiner.standardised_head(torch.tensor(w, dtype=torch.float64), 3.0, clean) for w in ([1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 5.0])]
    for w, b in heads:
        h = clean @ w + b
        q = torch.quantile(h, torch.tensor([0.5, combiner.TAIL_QUANTILE], dtype=h.dtype))
        assert abs(float(q[1])) < 1e-6  # the tail quantile at 0 ...
        assert abs(float(q[1] - q[0]) - combiner.SHARPNESS) < 1e-6  # ... and SHARPNESS units above the median
    # the smooth maximum of the two then flags about 2 * (1 - TAIL_QUANTILE) of clean rows above 0: each head a like share
    w = torch.stack([h[0] for h in heads])
    b = torch.tensor([h[1] for h in heads], dtype=torch.float64)
    flagged = float((combiner.head_score(clean, w, b) > 0).double().mean())
    assert 1.5 * (1 - combiner.TAIL_QUANTILE) < flagged < 2.5 * (1 - combiner.TAIL_QUANTILE)


def test_a_head_tied_at_its_median_or_constant_keeps_a_sane_scale():
    clean = torch.zeros(1000, 2, dtype=torch.float64)
    clean[:5, 0] = torch.arange(1.0, 6.0, dtype=torch.float64)  # 99.5 % of the rows share one value: tail == median
    w, b = combiner.standardised_head(torch.tensor([1.0, 0.0], dtype=torch.float64), 0.0, clean)
    assert torch.isfinite(w).all() and float(w.abs().max()) < 1e3
    w, b = combiner.standardised_head(torch.tensor([0.0, 1.0], dtype=torch.float64), 2.0, clean)  # a constant head
    assert torch.isfinite(w).all() and abs(float(clean[0] @ w + b)) < 1e-9
    import pytest

    with pytest.raises(ValueError, match="finite"):
        combiner.standardised_head(torch.tensor([1.0, 0.0], dtype=torch.float64), 0.0, torch.full((10, 2), float("nan"), dtype=torch.float64))


def test_fit_logistic_head_rejects_bad_shapes():
    import pytest

    with pytest.raises(ValueError, match="same F"):
        combiner.fit_logistic_head(torch.zeros(5, 3), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="need clean and attacked"):
        combiner.fit_logistic_head(torch.zeros(5, 3), torch.zeros(0, 3))
