import pytest
import torch

from hfguard.attacks import cw_l2, fgsm, orthogonal_pgd, pgd


def _acc(m, x, y):
    with torch.no_grad():
        return (m(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("norm, eps", [("inf", 0.1), ("2", 0.8)])
def test_pgd_stays_in_budget_and_box_and_hurts_accuracy(digits_model, digits, norm, eps):
    x, y = digits.x_test[:100], digits.y_test[:100]
    xa = pgd(digits_model, x, y, eps, steps=10, norm=norm)
    d = (xa - x).flatten(1)
    size = d.abs().max(1).values if norm == "inf" else d.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert xa.min() >= 0 and xa.max() <= 1
    assert _acc(digits_model, xa, y) < _acc(digits_model, x, y) - 0.2


def test_pgd_is_deterministic_and_leaves_grads_alone(digits_model, digits):
    x, y = digits.x_test[:20], digits.y_test[:20]
    a = pgd(digits_model, x, y, 0.1, steps=3, seed=1)
    b = pgd(digits_model, x, y, 0.1, steps=3, seed=1)
    assert torch.equal(a, b)
    assert all(p.grad is None for p in digits_model.parameters())


def test_pgd_rejects_unknown_norm(digits_model, digits):
    with pytest.raises(ValueError):
        pgd(digits_model, digits.x_test[:2], digits.y_test[:2], 0.1, norm="1")


def test_fgsm_budget(digits_model, digits):
    x, y = digits.x_test[:50], digits.y_test[:50]
    xa = fgsm(digits_model, x, y, 0.2)
    assert (xa - x).abs().max() <= 0.2 + 1e-6
    assert _acc(digits_model, xa, y) < _acc(digits_model, x, y)


def test_cw_finds_small_successful_perturbations(digits_model, digits):
    x, y = digits.x_test[:40], digits.y_test[:40]
    xa = cw_l2(digits_model, x, y, c=5.0, steps=60, lr=0.05)
    with torch.no_grad():
        fooled = digits_model(xa).argmax(1) != y
    assert fooled.float().mean() > 0.5
    changed = (xa - x).flatten(1).norm(dim=1)
    assert torch.all(changed[~fooled] == 0)  # failures return the clean image


def test_orthogonal_pgd_lowers_the_detector_score(fitted, digits):
    x, y = digits.x_test[:60], digits.y_test[:60]
    plain = pgd(fitted.model, x, y, 0.15, steps=20)
    adapt = orthogonal_pgd(fitted.model, fitted.score, x, y, 0.15, threshold=fitted.threshold, steps=60)
    with torch.no_grad():
        ok_p = fitted.model(plain).argmax(1) != y
        ok_a = fitted.model(adapt).argmax(1) != y
        assert ok_a.float().mean() > 0.5
        assert fitted.score(adapt)[ok_a].median() < fitted.score(plain)[ok_p].median()
