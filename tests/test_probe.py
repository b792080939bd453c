"""Linear probes from a layer to the logits: the streamed maths against a direct computation, and the guard's use of them."""

from __future__ import annotations

import pytest
import torch

import hfguard
from hfguard.probe import MIN_RESIDUAL_SHARE, CrossMoments, fit_probe
from hfguard.stats import ClassGaussianAccumulator, fit_tied_gaussian


def _data(n=600, d=12, k=5, seed=0, linear=False):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    z = torch.randn(n, d, generator=g, dtype=torch.float64) + 2.0 * torch.randn(k, d, generator=g, dtype=torch.float64)[y] + 3.0
    a = torch.randn(d, k, generator=g, dtype=torch.float64)
    logits = z @ a + 0.5
    if not linear:
        logits = logits + torch.tanh(z[:, :k]) * 3 + 0.3 * torch.randn(n, k, generator=g, dtype=torch.float64)
    return z, logits, y


def _sums(z, logits, y, k):
    acc_z, acc_l, cross = ClassGaussianAccumulator(k, z.shape[1]), ClassGaussianAccumulator(k, logits.shape[1]), CrossMoments(z.shape[1], logits.shape[1])
    acc_z.update(z, y)
    acc_l.update(logits, y)
    cross.update(z, logits)
    return acc_z, acc_l, cross


@pytest.mark.parametrize("dim", [5, 3])
def test_streamed_probe_equals_the_direct_ridge_fit_and_residual_gaussians(dim):
    """Weights, centres and the residual's class Gaussians from the sums equal a ridge regression and a Gaussian fit
    on the explicitly computed residuals (with a projection onto the leading logit directions when dim < K)."""
    z, logits, y = _data()
    m = fit_probe(*_sums(z, logits, y, 5), dim=dim, ridge=1e-2, noise=0.0)
    mz, ml = z.mean(0), logits.mean(0)
    cov_l = (logits - ml).T @ (logits - ml) / len(z)
    if dim < 5:
        evals, evecs = torch.linalg.eigh(cov_l)
        lead = evecs[:, -dim:]
        assert torch.allclose(m.proj.T @ m.proj, torch.eye(dim, dtype=torch.float64), atol=1e-10)
        assert torch.allclose((m.proj @ m.proj.T), lead @ lead.T, atol=1e-8)  # the same subspace
    else:
        assert torch.equal(m.proj, torch.eye(5, dtype=torch.float64))
    t = (logits - ml) @ m.proj
    zc = z - mz
    cov_z = zc.T @ zc / len(z)
    w = torch.linalg.solve(cov_z + 1e-2 * torch.trace(cov_z) / 12 * torch.eye(12, dtype=torch.float64), zc.T @ t / len(z)).T
    assert torch.allclose(m.weight, w, atol=1e-9) and torch.allclose(m.logit_center, ml) and torch.allclose(m.layer_center, mz)
    r = t - zc @ w.T
    acc = ClassGaussianAccumulator(5, dim)
    acc.update(r, y)
    ref = acc.finalize()
    assert torch.allclose(m.residual.means, ref.means, atol=1e-8)
    assert torch.allclose(m.residual.whitener @ m.residual.whitener.T, ref.whitener @ ref.whitener.T, rtol=1e-6, atol=1e-8)
    within = sum(((r[y == c] - r[y == c].mean(0)) ** 2).sum() for c in range(5)) / len(z)
    within_t = sum(((t[y == c] - t[y == c].mean(0)) ** 2).sum() for c in range(5)) / len(z)
    assert m.residual_share == pytest.approx(float(within / within_t), rel=1e-8)


def test_shards_merge_exactly():
    z, logits, y = _data()
    whole = fit_probe(*_sums(z, logits, y, 5), noise=0.0)
    parts = [_sums(z[s], logits[s], y[s], 5) for s in (slice(0, 250), slice(250, None))]
    for a, b in zip(parts[0], parts[1]):
        a.merge(b)
    merged = fit_probe(*parts[0], noise=0.0)
    precision = [m.residual.whitener @ m.residual.whitener.T for m in (whole, merged)]  # the whitener itself is defined up to a rotation
    assert torch.allclose(whole.weight, merged.weight, atol=1e-10) and torch.allclose(*precision, rtol=1e-8, atol=1e-10)


def test_a_linear_layer_leaves_no_residual_and_the_floor_bounds_its_whitening():
    z, logits, y = _data(linear=True)
    m = fit_probe(*_sums(z, logits, y, 5), ridge=1e-6, noise=0.03)
    assert m.residual_share < 1e-4
    within_l = sum(((logits[y == c] - logits[y == c].mean(0)) ** 2).sum() for c in range(5)) / len(z) / 5  # per direction
    precision = m.residual.whitener @ m.residual.whitener.T
    assert float(torch.linalg.eigvalsh(precision).max()) <= 1.0 / (0.03 * float(within_l)) * (1 + 1e-6)
    z2, l2, y2 = _data()
    assert fit_probe(*_sums(z2, l2, y2, 5)).residual_share > MIN_RESIDUAL_SHARE


def test_min_variance_floors_the_eigenvalues():
    count, sums = torch.tensor([2.0, 2.0], dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    scatter = torch.diag(torch.tensor([4.0, 1e-9, 1e-9], dtype=torch.float64))
    w = fit_tied_gaussian(count, sums, scatter, min_variance=0.5).whitener
    assert float(torch.linalg.eigvalsh(w @ w.T).max()) <= 2.0 + 1e-9


def test_cross_moments_refuse_rows_that_do_not_match():
    with pytest.raises(ValueError, match="same samples"):
        CrossMoments(2, 3).update(torch.zeros(4, 2), torch.zeros(5, 3))


def test_the_guard_probes_its_layers_and_leaves_out_linear_ones(fitted, digits):
    """Every watched layer is probed; a layer that determines the logits linearly (the digits CNN's last watched layer feeds
    its linear classifier) is left out of the score, the others' features are scored, differentiably."""
    rep = fitted.fit_report["probes"]
    assert set(rep) == set(fitted.layers)
    kept = [n for n, r in rep.items() if r["kept"]]
    assert kept and not rep[fitted.layers[-1]]["kept"] and rep[fitted.layers[-1]]["residual_share"] < 1e-3  # ReLU -> Linear
    for n, r in rep.items():
        assert r["kept"] == (r["residual_share"] >= MIN_RESIDUAL_SHARE) and "residual_share_on_fit_samples" in r
        assert any(f.startswith(f"{n}->logits:") for f in fitted.fit_report["score_features"]) == r["kept"]
    probes = fitted.evidence_sources[len(fitted.sources) : len(fitted.sources) + len(fitted.probed)]
    assert probes == [f"{n}->logits" for n in kept]
    x = digits.x_test[:16].clone().requires_grad_(True)
    _, score = fitted.logits_and_score(x)
    (g,) = torch.autograd.grad(score.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_a_probe_named_in_score_features_is_kept(fitted, digits_model, digits):
    linear = next(n for n, r in fitted.fit_report["probes"].items() if not r["kept"])
    names = [f"{linear}->logits:distance", "margin"]
    g = hfguard.protect(digits_model, progress=False, calibration="clean", score_features=names).fit((digits.x_train, digits.y_train))
    assert g.fit_report["probes"][linear]["kept"] and g.fit_report["score_features"] == names
    assert torch.isfinite(g.score(digits.x_test[:8])).all()


def test_unknown_probe_feature_is_refused(digits_model):
    with pytest.raises(ValueError, match="unknown evidence feature"):
        hfguard.protect(digits_model, progress=False, score_features=["nolayer->logits:distance"]).fit(torch.rand(4, 1, 8, 8))


def test_probe_sources_map_to_their_own_layers_and_only_needed_sources_run(digits_model, digits):
    """Named probes of the second and third layers (not a prefix of the layers): evidence source ``n + j`` is the probe of
    layer ``probed[j]``, and only those layers, the logits and the origin's first layer are computed."""
    names = ["4->logits:distance", "8->logits:gap", "margin"]
    g = hfguard.protect(digits_model, progress=False, calibration="clean", score_features=names).fit((digits.x_train, digits.y_train))
    assert g.layers == ["1", "4", "8"] and g.probed == [1, 2]
    n = len(g.sources)
    assert g._features_needed() == {0, 1, 2, 3}  # no spectrum (4)
    with torch.no_grad():
        logits, feats = g._features(digits.x_test[:20])
        d = g._source_distances(feats)
        assert torch.equal(d[n], g.probes[0](feats[1], logits)) and torch.equal(d[n + 1], g.probes[1](feats[2], logits))
        assert g.probes[0].weight.shape[1] == feats[1].shape[1] and g.probes[1].weight.shape[1] == feats[2].shape[1]
        assert not torch.allclose(d[n], d[n + 1])


def test_a_failed_refit_keeps_the_probes(digits_model, digits):
    """A fit that fails after the statistics (calibration images of the wrong shape) leaves the probes and the score as they were."""
    g = hfguard.protect(digits_model, progress=False).fit((digits.x_train, digits.y_train))
    x = digits.x_test[:30]
    before, probed, probes = g.score(x), list(g.probed), g.probes
    with pytest.raises(hfguard.DataError):
        g.fit((digits.x_train, digits.y_train), calibration_data=torch.rand(20, 1, 9, 9))
    assert g.probed == probed and g.probes is probes and torch.equal(g.score(x), before)


def test_many_classes_probe_the_leading_logit_directions_end_to_end(tmp_path):
    """80 classes > PROBE_DIM: the probes target 64 orthonormal directions of the logits; scored, saved, loaded and exported."""
    from hfguard.probe import PROBE_DIM

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 32), torch.nn.ReLU(), torch.nn.Linear(32, 80)).eval()
    x, y = torch.rand(80 * 8, 1, 8, 8), torch.arange(80 * 8) % 80
    names = ["1->logits:distance", "1->logits:gap", "4->logits:nearest", "margin"]
    g = hfguard.protect(model, layers=["1", "4"], progress=False, calibration="clean", score_features=names).fit((x, y))
    proj = g.probes[0].proj
    assert proj.shape == (80, PROBE_DIM) and torch.allclose(proj.T @ proj, torch.eye(PROBE_DIM), atol=1e-5)
    assert torch.equal(proj, g.probes[1].proj)  # one set of directions for every layer
    lead = proj.gather(0, proj.abs().argmax(0, keepdim=True))
    assert (lead > 0).all()  # canonical sign
    s = g.score(x[:16])
    assert torch.isfinite(s).all() and s.std() > 0
    g.save(str(tmp_path / "g.safetensors"))
    g2 = hfguard.load(str(tmp_path / "g.safetensors"), model)
    assert torch.equal(g2.score(x[:16]), s) and g2.score_features_setting == names
    g.export_onnx(str(tmp_path / "g.onnx"), x[:4])
    o = hfguard.OnnxGuard(str(tmp_path / "g.onnx")).check(x[:16])
    assert float((o.score - s).abs().max()) <= 1e-3 * max(float(s.std()), 1.0)


def test_a_loaded_guard_fitted_again_chooses_its_features_like_the_original(fitted, digits_model, digits, tmp_path):
    """The file keeps what protect() was given ("auto"), not the resulting list: a refit may keep or drop probes afresh."""
    fitted.save(str(tmp_path / "g.safetensors"))
    g = hfguard.load(str(tmp_path / "g.safetensors"), digits_model)
    assert g.score_features_setting == "auto" and g.attack_families == fitted.attack_families
    g.fit((digits.x_train, digits.y_train))
    assert g.fit_report["score_features"] == fitted.fit_report["score_features"]


def test_the_held_out_share_sees_through_a_probe_that_fits_its_few_samples_exactly():
    """With fewer fit samples than features the ridge probe reads their logits almost exactly (in-sample share ~0);
    on new samples of the same non-linear layer the share is large, and that is what decides whether it is kept."""
    from hfguard.probe import held_out_share

    z, logits, y = _data(n=1200, d=60, k=5)
    small = fit_probe(*_sums(z[:40], logits[:40], y[:40], 5), ridge=1e-6)
    assert small.residual_share < 0.01
    assert held_out_share(small, z[600:], logits[600:], y[600:]) > 10 * small.residual_share
    big = fit_probe(*_sums(z[:600], logits[:600], y[:600], 5))
    assert held_out_share(big, z[600:], logits[600:], y[600:]) == pytest.approx(big.residual_share, rel=0.3)
