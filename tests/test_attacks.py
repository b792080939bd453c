import pytest
import torch

from hfguard.attacks import cw_l2, fgsm, orthogonal_pgd, pgd, random_search, square_linf


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
    assert all(p.grad is None for p in digits_model.parameters())  # autograd.grad only, like every attack here
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


def test_per_image_budgets_are_respected(digits_model, digits):
    from hfguard.attacks import fgsm, pgd

    x, y = digits.x_test[:30], digits.y_test[:30]
    eps = torch.linspace(0.01, 0.2, 30)
    for xa in (fgsm(digits_model, x, y, eps), pgd(digits_model, x, y, eps, steps=4)):
        assert ((xa - x).flatten(1).abs().max(1).values <= eps + 1e-6).all()
    l2 = torch.linspace(0.1, 1.5, 30)
    xa = pgd(digits_model, x, y, l2, steps=4, norm="2")
    assert ((xa - x).flatten(1).norm(dim=1) <= l2 + 1e-5).all()
    with pytest.raises(ValueError, match="one budget per image"):
        pgd(digits_model, x, y, torch.ones(3), steps=1)


def test_boundary_pgd_stops_at_the_first_misclassified_iterate(digits_model, digits):
    from hfguard.attacks import boundary_pgd

    x, y = digits.x_test[:100], digits.y_test[:100]
    with torch.no_grad():
        right = digits_model(x).argmax(1) == y
    x, y = x[right], y[right]
    strong = pgd(digits_model, x, y, 0.3, steps=20)
    minimal = boundary_pgd(digits_model, x, y, 0.3, steps=20)
    assert ((minimal - x).abs().flatten(1).max(1).values <= 0.3 + 1e-6).all()
    assert minimal.min() >= 0 and minimal.max() <= 1
    with torch.no_grad():
        lm, ls = digits_model(minimal), digits_model(strong)
    fooled = (lm.argmax(1) != y) & (ls.argmax(1) != y)
    assert fooled.float().mean() > 0.5
    # just across the boundary: far less confident in the wrong class than PGD that keeps climbing
    def margin(lo):
        top = lo.topk(2, 1).values
        return top[:, 0] - top[:, 1]
    assert margin(lm)[fooled].median() < 0.5 * margin(ls)[fooled].median()
    assert ((minimal - x).flatten(1).norm(dim=1)[fooled] < (strong - x).flatten(1).norm(dim=1)[fooled]).float().mean() > 0.9


def test_margin_loss_is_clipped_at_kappa():
    from hfguard.attacks import margin_loss

    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 9.0, 1.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(margin_loss(logits, y), torch.tensor([-2.0, 9.0]))
    assert torch.allclose(margin_loss(logits, y, kappa=5.0), torch.tensor([-2.0, 5.0]))


@pytest.mark.parametrize("mode, loss", [("selective", "ce"), ("orthogonal", "margin"), ("selective", "margin")])
def test_detector_pgd_variants_evade_and_keep_the_best_iterate(fitted, digits, mode, loss):
    from hfguard.attacks import detector_pgd

    x, y = digits.x_test[:60], digits.y_test[:60]
    with torch.no_grad():
        right = fitted.model(x).argmax(1) == y
    adv = detector_pgd(fitted.model, fitted.score, x, y, 0.15, threshold=fitted.threshold, mode=mode, loss=loss, steps=40)
    assert ((adv - x).abs().flatten(1).max(1).values <= 0.15 + 1e-6).all() and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        wrong = fitted.model(adv).argmax(1) != y
        s = fitted.score(adv)
    evaded = right & wrong & (s <= fitted.threshold)
    # the kept iterate of an evading image is itself misclassified and below the threshold: best-iterate bookkeeping
    assert evaded.any()
    plain = pgd(fitted.model, x, y, 0.15, steps=20)
    with torch.no_grad():
        evaded_plain = right & (fitted.model(plain).argmax(1) != y) & (fitted.score(plain) <= fitted.threshold)
    assert evaded.sum() > evaded_plain.sum()


def test_detector_pgd_rejects_unknown_modes(fitted, digits):
    from hfguard.attacks import detector_pgd

    with pytest.raises(ValueError, match="mode"):
        detector_pgd(fitted.model, fitted.score, digits.x_test[:2], digits.y_test[:2], 0.1, threshold=0.0, mode="sideways")


def test_detector_pgd_takes_one_budget_per_image(fitted, digits):
    from hfguard.attacks import detector_pgd

    x, y = digits.x_test[:8], digits.y_test[:8]
    eps = torch.tensor([0.0, 0.02, 0.05, 0.1, 0.0, 0.02, 0.05, 0.1])
    adv = detector_pgd(fitted.model, fitted.score, x, y, eps, threshold=fitted.threshold, steps=5)
    moved = (adv - x).abs().flatten(1).max(1).values
    assert (moved <= eps + 1e-6).all() and (moved[eps > 0] > 0).all() and (moved[eps == 0] == 0).all()
    with pytest.raises(ValueError, match="one budget per image"):
        detector_pgd(fitted.model, fitted.score, x, y, eps[:3], threshold=fitted.threshold, steps=1)


def test_square_linf_finds_misclassifications_without_gradients_within_per_image_budgets(digits_model, digits):
    x, y = digits.x_test[:80], digits.y_test[:80]
    with torch.no_grad():
        correct = digits_model(x).argmax(1) == y
    x, y = x[correct], y[correct]
    eps = torch.linspace(0.05, 0.3, len(x))
    xa = square_linf(digits_model, x, y, eps, queries=150, seed=3)
    assert ((xa - x).abs().flatten(1).max(1).values <= eps + 1e-6).all()
    assert float(xa.min()) >= 0 and float(xa.max()) <= 1
    assert all(p.grad is None for p in digits_model.parameters())
    with torch.no_grad():
        fooled = digits_model(xa).argmax(1) != y
    assert fooled.float().mean() > 0.5
    assert fooled[eps > 0.2].float().mean() >= fooled[eps < 0.1].float().mean()  # a larger ball fools at least as often
    assert torch.equal(xa, square_linf(digits_model, x, y, eps, queries=150, seed=3))


def test_random_search_keeps_the_best_candidate_and_stops_when_done(digits):
    """A distance-to-target objective: only rows not yet at 0 are queried, the best candidate per row is
    returned, the search stops once every row is done, and it never leaves the ball."""
    x = digits.x_test[:16]
    target = (x + 0.2).clamp(0, 1)
    best: dict[int, float] = {}

    def loss_of(cand, rows):
        return ((cand - target[rows]).flatten(1).abs().mean(1) - 0.05).clamp_min(0)

    def objective(cand, rows):
        assert all(best.get(r, float("inf")) > 0 for r in rows.tolist())  # a finished row is never proposed again
        loss = loss_of(cand, rows)
        for r, v in zip(rows.tolist(), loss.tolist()):
            best[r] = min(best.get(r, float("inf")), v)
        return loss

    xa = random_search(objective, x, 0.2, queries=200, seed=0)
    assert float((xa - x).abs().max()) <= 0.2 + 1e-6
    everyone = torch.arange(len(x))
    final = loss_of(xa, everyone)
    assert final.mean() < 0.8 * loss_of(x, everyone).mean()
    assert torch.allclose(final, torch.tensor([best[r] for r in range(len(x))], dtype=final.dtype))  # the best found is returned
    hits = []  # every row done at the start (the stripes): one call, no proposal
    random_search(lambda cand, rows: hits.append(len(rows)) or torch.zeros(len(rows)), x, 0.2, queries=50)
    assert hits == [len(x)]


class _LogitsAndScore(torch.nn.Module):
    """A model and a score in one module (``weighted_pgd`` takes such a callable; a module is run in eval mode)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, z):
        logits = self.model(z)
        return logits, logits.logsumexp(1)


def test_attacks_leave_a_model_in_training_mode_unchanged_and_take_any_integer_labels(digits):
    """Review: every attack ran a model in training mode as such: its BatchNorm statistics moved on every step."""
    import numpy as np

    from hfguard.attacks import boundary_pgd, detector_pgd, weighted_pgd
    from hfguard.data import small_resnet

    torch.manual_seed(0)
    model = small_resnet(1, 10).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([1, 2, 3])
    runs = [lambda t: fgsm(model, x, t, 0.1), lambda t: pgd(model, x, t, 0.1, steps=2), lambda t: pgd(model, x, t, 1.0, steps=2, norm="2"),
            lambda t: boundary_pgd(model, x, t, 0.1, steps=2), lambda t: cw_l2(model, x, t, steps=2), lambda t: square_linf(model, x, t, 0.1, queries=2),
            lambda t: detector_pgd(model, lambda z: model(z).logsumexp(1), x, t, 0.1, threshold=0.0, steps=2),
            lambda t: weighted_pgd(_LogitsAndScore(model), x, t, 0.1, threshold=0.0, steps=2)]
    for run in runs:
        ref = run(y)
        for labels in (y.int(), y.tolist(), y.numpy().astype(np.int32)):
            assert torch.equal(run(labels), ref)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="eps"):
            pgd(model, x, y, bad, steps=1)
    with pytest.raises(ValueError, match="one integer class per image"):
        fgsm(model, x, torch.tensor([0.5, 1.0, 2.0]), 0.1)
    assert pgd(model, x, y, torch.tensor([0.1]), steps=1).shape == x.shape  # a one-element budget is one budget
    model.eval()


def test_pgd_with_a_custom_loss_takes_soft_targets(digits_model, digits):
    """Review: the label check refused the float (N, K) targets a custom loss_fn may take."""
    x = digits.x_test[:4]
    soft = torch.softmax(torch.randn(4, 10, generator=torch.Generator().manual_seed(0)), 1)
    out = pgd(digits_model, x, soft, 0.1, steps=2, loss_fn=lambda logits, y, _x: -(y * logits.log_softmax(1)).sum(1))
    assert out.shape == x.shape and (out - x).abs().max() <= 0.1 + 1e-6


def test_pgd_success_keeps_the_first_successful_iterate_else_the_last(digits_model, digits):
    """Per image the first iterate that reaches the goal is returned (a later step may lose it), else the last."""
    x, y = digits.x_test[:30], digits.y_test[:30]
    last = pgd(digits_model, x, y, 0.1, steps=6, seed=2)
    never = pgd(digits_model, x, y, 0.1, steps=6, seed=2, success=lambda logits, yy, xa: torch.zeros(len(xa), dtype=torch.bool))
    assert torch.equal(never, last)
    start = pgd(digits_model, x, y, 0.1, steps=0, seed=2)  # the random start alone
    always = pgd(digits_model, x, y, 0.1, steps=6, seed=2, success=lambda logits, yy, xa: torch.ones(len(xa), dtype=torch.bool))
    assert torch.equal(always, start)
    # the goal "misclassified at step k": each image keeps the iterate at which it first was, even if a later step undoes it
    seen = []

    def wrong(logits, yy, xa):
        seen.append(xa.clone())
        return logits.argmax(1) != yy

    kept = pgd(digits_model, x, y, 0.1, steps=6, seed=2, success=wrong)
    assert len(seen) == 7  # the start, five more iterates, and the last one
    with torch.no_grad():
        first = [next((i for i, it in enumerate(seen) if digits_model(it[r : r + 1]).argmax(1).item() != y[r]), None) for r in range(len(x))]
    for r, i in enumerate(first):
        assert torch.equal(kept[r], seen[i][r] if i is not None else last[r])
    with pytest.raises(ValueError, match="one bool per image"):
        pgd(digits_model, x, y, 0.1, steps=1, success=lambda logits, yy, xa: torch.zeros(3, dtype=torch.bool))


def test_weighted_pgd_adapts_one_weight_per_image_and_evades_more_than_one_global_weight(fitted, digits):
    from hfguard.attacks import evasion_loss, weighted_pgd

    x, y = digits.x_test[:60], digits.y_test[:60]
    thr, scale = fitted.threshold, 1.0
    with torch.no_grad():
        right = fitted.model(x).argmax(1) == y

    def evaded(adv):
        with torch.no_grad():
            logits, s = fitted.logits_and_score(adv)
        return right & (evasion_loss(logits, y, s, thr, scale) == 0)

    adv = weighted_pgd(fitted.logits_and_score, x, y, 0.15, threshold=thr, scale=scale, steps=40)
    assert ((adv - x).abs().flatten(1).max(1).values <= 0.15 + 1e-6).all() and adv.min() >= 0 and adv.max() <= 1
    held = {}

    def model(z):
        logits, held["s"] = fitted.logits_and_score(z)
        return logits

    def fixed(lam):  # the same sum with one global weight, the same step size and the same first-evading-iterate bookkeeping
        return pgd(model, x, y, 0.15, steps=40, step_size=2.5 * 0.15 / 10,
                   loss_fn=lambda logits, yy, _z: torch.nn.functional.cross_entropy(logits, yy, reduction="none") - lam * (held["s"] - thr),
                   success=lambda logits, yy, _z: evasion_loss(logits, yy, held["s"].detach(), thr, scale) == 0)

    assert evaded(adv).sum() > max(evaded(fixed(lam)).sum() for lam in (0.1, 1.0, 10.0))
    with pytest.raises(ValueError, match="factor"):
        weighted_pgd(fitted.logits_and_score, x[:2], y[:2], 0.1, threshold=thr, factor=1.0)
    with pytest.raises(ValueError, match="loss"):
        weighted_pgd(fitted.logits_and_score, x[:2], y[:2], 0.1, threshold=thr, loss="hinge")
