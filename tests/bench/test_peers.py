"""The peer detectors: real implementations, faithful differentiable twins, one contract."""

from __future__ import annotations

import kornia
import pytest
import torch

from hfguard.bench import peers as P
from hfguard.errors import HFGuardError, MissingDependencyError


@pytest.fixture(scope="module")
def fitted_peers(digits_model, digits):
    x, y = digits.x_train[:600], digits.y_train[:600]
    layers = ["1", "4", "8"]
    dets = [
        P.MaxSoftmaxPeer(digits_model),
        P.EnergyPeer(digits_model),
        P.MahalanobisPeer(digits_model),
        P.MultiMahalanobisPeer(digits_model, layers),
        P.FeatureSqueezingPeer(digits_model, bits=2, median=2),
        P.FeatureSqueezingPeer(digits_model, bits=4, median=3),
    ]
    for d in dets:
        d.fit(x, y)
    spectral = P.SpectralDefensePeer(digits_model).fit(x[:200], y[:200], P.fgsm_training_set(digits_model, x[:200], y[:200], 0.15))
    hf = P.HFGuardDetector(digits_model).fit(x, y)
    dets += [spectral, hf]
    for d in dets:
        d.calibrate(digits.x_train[1000:1200], 0.05)
    return dets


def test_contract_for_every_detector(fitted_peers, digits):
    x = digits.x_test[:50]
    for d in fitted_peers:
        s = d.score_all(x)
        assert s.shape == (50,) and torch.isfinite(s).all(), d.name
        logits, s2 = d.deployed(x)
        assert logits.shape == (50, 10) and torch.allclose(s2, s, atol=1e-5), d.name
        s3, pred = d.outputs(x)
        assert pred.shape == (50,) and torch.allclose(s3, s, atol=1e-5)
        assert torch.equal(d.outputs(x, defended=False)[1], logits.argmax(1))
        assert d.threshold == d.threshold, d.name  # calibrated
        # twin == real, and the twin carries a gradient to the input
        assert P.twin_gap(d, x) < 1e-3, d.name
        xr = x.clone().requires_grad_(True)
        g = torch.autograd.grad(d.diff_score(xr).sum(), xr)[0]
        assert g.abs().sum() > 0, d.name


def test_calibrated_threshold_holds_on_clean_images_it_never_saw(fitted_peers, digits):
    """Calibrated on one half of the test digits, measured on the other (neither seen by the model nor the fits)."""
    cal, fresh = digits.x_test[:270], digits.x_test[270:]
    for d in fitted_peers:
        if isinstance(d, P.HFGuardDetector):
            continue
        before = d.threshold
        try:
            d.calibrate(cal, 0.05)
            fpr = float((d.score_all(fresh) > d.threshold).float().mean())
        finally:
            d.threshold = before
        # 270 calibration and 269 fresh images: about 0.019 of binomial spread
        assert abs(fpr - 0.05) < 0.055, (d.name, fpr)


def test_mahalanobis_peer_is_pytorch_ood(fitted_peers, digits_model, digits):
    """The peer's score is exactly pytorch-ood's own predict() with the penultimate encoder."""
    maha = next(d for d in fitted_peers if isinstance(d, P.MahalanobisPeer))
    x = digits.x_test[:40]
    maha.detector.encoder = digits_model[:-1]  # everything before the last Linear
    try:
        expected = maha.detector.predict(x)
    finally:
        maha.detector.encoder = None
    assert torch.allclose(maha.score(x), expected)


def test_logit_peers_match_their_formulas(fitted_peers, digits_model, digits):
    x = digits.x_test[:40]
    with torch.no_grad():
        logits = digits_model(x)
    msp = next(d for d in fitted_peers if isinstance(d, P.MaxSoftmaxPeer))
    energy = next(d for d in fitted_peers if isinstance(d, P.EnergyPeer))
    assert torch.allclose(msp.score(x), -logits.softmax(1).max(1).values)
    assert torch.allclose(energy.score(x), -torch.logsumexp(logits, 1))


def test_median_filter_matches_kornia_for_odd_windows_and_keeps_constants():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 9, 9)
    assert torch.allclose(P.median_filter(x, 3), kornia.filters.median_blur(x, (3, 3)))
    const = torch.full((1, 1, 6, 6), 0.3)
    assert torch.equal(P.median_filter(const, 2), const)
    assert P.median_filter(x, 1) is x


def test_feature_squeezing_score_is_a_bounded_l1_distance(fitted_peers, digits):
    fs = next(d for d in fitted_peers if isinstance(d, P.FeatureSqueezingPeer))
    s = fs.score(digits.x_test[:40])
    assert (s >= 0).all() and (s <= 2).all()


def test_spectral_defense_needs_adversarial_training_data(digits_model, digits):
    with pytest.raises(ValueError, match="x_adv"):
        P.SpectralDefensePeer(digits_model).fit(digits.x_train[:20], digits.y_train[:20])


def test_missing_extra_names_the_install_command():
    with pytest.raises(MissingDependencyError, match=r"hfguard\[bench\]") as info:
        P.require("surely_not_an_installed_module_xyz")
    assert isinstance(info.value, ImportError) and isinstance(info.value, HFGuardError)
