import numpy as np
import pytest
import torch

from hfguard.errors import DataError
from hfguard.stats import (
    ClassGaussianAccumulator,
    batched_sq_distances,
    class_sq_distances,
    fit_tied_gaussian,
    group_indicator,
    grouped_sq_distances,
    oas_shrinkage,
)


def _data(n=300, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    z = torch.randn(n, d, generator=g) + 3.0 * torch.nn.functional.one_hot(y, d).float()
    return z, y


def test_merge_is_exact():
    z, y = _data()
    full = ClassGaussianAccumulator(3, 6)
    full.update(z, y)
    a, b = ClassGaussianAccumulator(3, 6), ClassGaussianAccumulator(3, 6)
    a.update(z[:100], y[:100])
    b.update(z[100:], y[100:])
    a.merge(b)
    assert torch.allclose(a.sums, full.sums) and torch.allclose(a.scatter, full.scatter) and torch.equal(a.count, full.count)


def test_shuffled_stream_gives_same_model():
    z, y = _data()
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(1))
    m1, m2 = ClassGaussianAccumulator(3, 6), ClassGaussianAccumulator(3, 6)
    for i in range(0, 300, 64):
        m1.update(z[i : i + 64], y[i : i + 64])
        m2.update(z[perm][i : i + 64], y[perm][i : i + 64])
    f1, f2 = m1.finalize(), m2.finalize()
    assert torch.allclose(f1.means, f2.means, atol=1e-10)
    assert torch.allclose(f1.whitener @ f1.whitener.T, f2.whitener @ f2.whitener.T, atol=1e-8)


def test_distances_match_numpy_reference():
    z, y = _data()
    acc = ClassGaussianAccumulator(3, 6)
    acc.update(z, y)
    m = acc.finalize()
    d = class_sq_distances(z.double(), m.whitener, m.means @ m.whitener)
    prec = m.whitener @ m.whitener.T
    ref = np.stack([np.einsum("ij,jk,ik->i", (z.double() - mu).numpy(), prec.numpy(), (z.double() - mu).numpy()) for mu in m.means], 1) / 6
    assert np.allclose(d.numpy(), ref, rtol=1e-6, atol=1e-8)


def test_shrinkage_keeps_covariance_invertible_when_dim_exceeds_samples():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(12, 50, generator=g)
    y = torch.arange(12) % 3
    acc = ClassGaussianAccumulator(3, 50)
    acc.update(z, y)
    m = acc.finalize()
    assert 0 < m.shrinkage <= 1
    prec = m.whitener @ m.whitener.T
    assert torch.isfinite(prec).all()
    assert torch.linalg.cond(prec) < 1e4


def test_oas_is_zero_like_for_many_samples_and_one_for_identity():
    cov = torch.eye(5, dtype=torch.float64)
    assert oas_shrinkage(cov, 10) == 1.0
    a = torch.randn(2000, 5, dtype=torch.float64) * torch.tensor([1, 2, 3, 4, 5.0], dtype=torch.float64)
    assert oas_shrinkage(torch.cov(a.T), 2000) < 0.05


def test_empty_class_is_named():
    acc = ClassGaussianAccumulator(3, 2)
    acc.update(torch.randn(5, 2), torch.tensor([0, 0, 1, 1, 0]))
    with pytest.raises(DataError, match=r"class\(es\) \[2\]"):
        acc.finalize()


def test_distances_are_differentiable():
    z, y = _data(d=4)
    acc = ClassGaussianAccumulator(3, 4)
    acc.update(z, y)
    m = acc.finalize()
    x = z[:5].double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: class_sq_distances(t, m.whitener, m.means @ m.whitener), (x,))


def test_fit_tied_gaussian_rejects_too_few_samples():
    with pytest.raises(DataError):
        fit_tied_gaussian(torch.tensor([1.0, 1.0]), torch.zeros(2, 3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64))


from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(1, 299), max_size=5), seed=st.integers(0, 100))
def test_any_split_merges_to_the_same_sums(cuts, seed):
    z, y = _data(seed=seed)
    bounds = [0, *sorted(set(cuts)), 300]
    full = ClassGaussianAccumulator(3, 6)
    full.update(z, y)
    merged = ClassGaussianAccumulator(3, 6)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = ClassGaussianAccumulator(3, 6)
        part.update(z[lo:hi], y[lo:hi])
        merged.merge(part)
    assert torch.equal(merged.count, full.count)
    assert torch.allclose(merged.sums, full.sums) and torch.allclose(merged.scatter, full.scatter)


def test_oas_matches_scikit_learn_up_to_its_dropped_2_over_p_terms():
    """Ours is Chen et al.'s eq. 23 as written; scikit-learn drops the 2/p terms (its comment says so), which
    moves the coefficient by less than a 2/p fraction and vanishes as p grows."""
    from sklearn.covariance import oas

    g = torch.Generator().manual_seed(5)
    for n, d in ((40, 10), (500, 8), (30, 60)):
        x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
        xc = x - x.mean(0)
        cov = xc.T @ xc / n
        _, ref = oas(x.numpy())
        ours = oas_shrinkage(cov, n)
        assert abs(ours - ref) <= (2.0 / d) * max(ours, ref), (n, d, ours, ref)
        if d >= 50:
            assert abs(ours - ref) < 2e-3


def test_float32_distances_match_a_float64_reference():
    g = torch.Generator().manual_seed(6)
    k, d = 5, 64
    means = torch.randn(k, d, generator=g, dtype=torch.float64) * 3 + 50.0  # far from the origin: cancellation risk
    z = means[torch.arange(40) % k] + torch.randn(40, d, generator=g, dtype=torch.float64)
    w = torch.linalg.cholesky(torch.linalg.inv(torch.eye(d, dtype=torch.float64) * 2.0))
    center = means.mean(0)
    ref = class_sq_distances(z - center, w, (means - center) @ w)
    got = class_sq_distances((z - center).float(), w.float(), ((means - center) @ w).float())
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-4)


def _random_sources(dims, k=4, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = [torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True) for d in dims]
    ws = [torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5 for d in dims]
    ms = [torch.randn(k, d, generator=g, dtype=torch.float64) for d in dims]
    return zs, ws, ms


def test_grouped_distances_equal_each_source_alone_values_and_gradients():
    dims = [5, 1, 12, 3]
    zs, ws, ms = _random_sources(dims)
    got = grouped_sq_distances(torch.cat(zs, 1), ws, ms, group_indicator(dims, dtype=torch.float64), torch.tensor(dims))
    assert got.shape == (7, 4, 4)
    ref = torch.stack([class_sq_distances(z, w, m) for z, w, m in zip(zs, ws, ms)], 1)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g_got = torch.autograd.grad((got * weights).sum(), zs)
    g_ref = torch.autograd.grad((ref * weights).sum(), zs)
    for a, b in zip(g_got, g_ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_group_indicator_marks_each_sources_columns():
    ind = group_indicator([2, 3])
    assert ind.tolist() == [[1, 0], [1, 0], [0, 1], [0, 1], [0, 1]]


def test_batched_distances_equal_each_source_alone():
    zs, ws, ms = _random_sources([6, 6, 6], seed=2)
    got = batched_sq_distances(torch.stack(zs), torch.stack(ws), torch.stack(ms))
    ref = torch.stack([class_sq_distances(z, w, m) for z, w, m in zip(zs, ws, ms)], 1)
    assert got.shape == (7, 3, 4)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
