import torch

from hfguard.selfattack import DEFAULT_FAMILIES, FAMILIES, REGIMES, SQUARE_LINF_RANGE, resolve_families, self_attacks


def test_every_family_is_tried_and_only_successes_are_kept(digits_model, digits):
    x, y = digits.x_train[:210], digits.y_train[:210]
    out = self_attacks(digits_model, x, y, seed=0, families=list(FAMILIES))
    assert set(out.attempted) == set(FAMILIES) and sum(out.attempted.values()) == 210
    assert all(out.succeeded[f] > 0 for f in FAMILIES)
    assert len(out.pixels) == sum(out.succeeded.values()) == len(out.family) == len(out.source)
    with torch.no_grad():
        pred = digits_model(out.pixels).argmax(1)
    assert (pred != y[out.source]).all()
    assert torch.equal(out.family, out.source % len(FAMILIES))  # image i gets family i % len(FAMILIES)
    masks = [out.regime_mask(r) for r in REGIMES]
    assert torch.equal(masks[0] | masks[1], torch.ones(len(out.family), dtype=torch.bool)) and not (masks[0] & masks[1]).any()
    for f in FAMILIES:  # each family's rows, counted as succeeded, inside its regime's
        m = out.family_mask(f)
        assert int(m.sum()) == out.succeeded[f] and not (m & ~out.regime_mask(FAMILIES[f])).any()


def test_budgets_and_box_hold_per_image(digits_model, digits):
    x, y = digits.x_train[:140], digits.y_train[:140]
    out = self_attacks(digits_model, x, y, seed=1, families=list(FAMILIES))
    delta = (out.pixels - x[out.source]).flatten(1)
    l2_rows = torch.tensor([list(FAMILIES)[f].endswith("l2") for f in out.family.tolist()])
    size = torch.where(l2_rows, delta.norm(dim=1), delta.abs().amax(1))
    assert (size <= out.budget + 1e-5).all()
    assert (out.budget[~l2_rows] <= 0.15 + 1e-6).all() and (out.budget[~l2_rows] >= 0.01 - 1e-6).all()
    square = out.family_mask("square-linf")  # the random search draws from its own, higher range
    assert square.any() and (out.budget[square] >= SQUARE_LINF_RANGE[0] - 1e-6).all() and (out.budget[square] <= SQUARE_LINF_RANGE[1] + 1e-6).all()
    assert out.pixels.min() >= 0 and out.pixels.max() <= 1
    cw = out.family_mask("cw-l2")
    assert cw.any() and (out.budget[cw] > 0).all()  # CW has no budget: the L2 size it reached, never 0 for a success


def test_attacks_are_deterministic_and_leave_the_model_alone(digits_model, digits):
    x, y = digits.x_train[:50], digits.y_train[:50]
    a = self_attacks(digits_model, x, y, seed=3)
    b = self_attacks(digits_model, x, y, seed=3)
    assert torch.equal(a.pixels, b.pixels)
    assert all(p.grad is None for p in digits_model.parameters())


def test_a_family_can_be_left_out(digits_model, digits):
    import pytest

    x, y = digits.x_train[:60], digits.y_train[:60]
    out = self_attacks(digits_model, x, y, families=["pgd-linf", "boundary-l2"])
    assert set(out.attempted) == {"pgd-linf", "boundary-l2"}
    assert set(out.family.tolist()) <= {list(FAMILIES).index("pgd-linf"), list(FAMILIES).index("boundary-l2")}
    with pytest.raises(ValueError, match="families"):
        self_attacks(digits_model, x, y, families=["nope"])


def test_the_default_families_and_the_settings_that_name_them(digits_model):
    import pytest

    import hfguard

    assert resolve_families("auto") == list(DEFAULT_FAMILIES) and "boundary-l2" not in DEFAULT_FAMILIES
    assert resolve_families("all") == list(FAMILIES)
    assert resolve_families(["square-linf", "fgsm-linf"]) == ["fgsm-linf", "square-linf"]  # FAMILIES order: the heads' order
    assert set(DEFAULT_FAMILIES) <= set(FAMILIES) and {FAMILIES[f] for f in DEFAULT_FAMILIES} == set(REGIMES)
    for bad in ("boundary", "nope", [], ["nope"], ["pgd-linf", "nope"]):
        with pytest.raises(ValueError, match="attack_families"):
            resolve_families(bad)
        with pytest.raises(ValueError, match="attack_families"):
            hfguard.protect(digits_model, attack_families=bad)


def test_without_a_family_list_the_default_families_are_generated(digits_model, digits):
    out = self_attacks(digits_model, digits.x_train[:60], digits.y_train[:60])
    assert list(out.attempted) == list(DEFAULT_FAMILIES)


def test_on_batch_reports_every_attacked_image_by_family(digits_model, digits):
    x, y = digits.x_train[:70], digits.y_train[:70]
    seen = []
    out = self_attacks(digits_model, x, y, families=["fgsm-linf", "cw-l2"], batch_size=16, on_batch=lambda f, n: seen.append((f, n)))
    counts = {f: sum(n for g, n in seen if g == f) for f in ("fgsm-linf", "cw-l2")}
    assert counts == out.attempted == {"fgsm-linf": 35, "cw-l2": 35}
    assert max(n for _, n in seen) == 16 and [f for f, _ in seen] == sorted((f for f, _ in seen), key=["fgsm-linf", "cw-l2"].index)
