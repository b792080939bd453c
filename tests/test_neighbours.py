"""Nearest-neighbour class distances (hfguard.neighbours) and how fit builds the banks."""

import pytest
import torch

import hfguard
from hfguard.errors import SettingsError
from hfguard.neighbours import ClassSample, NeighbourBank, bank_size, leaving_out
from hfguard.reservoir import content_priority


def _stream(n=300, k=4, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"source0": torch.randn(n, d, generator=g), "y": torch.randint(0, k, (n,), generator=g)}, torch.rand(n, generator=g, dtype=torch.float64)


def test_class_sample_keeps_each_class_lowest_priorities_whatever_the_order():
    rows, prio = _stream()
    a, b = ClassSample(4, 7, {"source0": 5}), ClassSample(4, 7, {"source0": 5})
    for i in range(0, 300, 32):  # in order, in batches
        a.offer({k: v[i : i + 32] for k, v in rows.items()}, prio[i : i + 32])
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    for i in range(0, 300, 50):  # shuffled, other batches
        j = perm[i : i + 50]
        b.offer({k: v[j] for k, v in rows.items()}, prio[j])
    for c in range(4):
        want = torch.sort(prio[rows["y"] == c]).values[:7]
        assert torch.equal(torch.sort(a.priority[a.y == c]).values, want)
        assert torch.equal(torch.sort(b.priority[b.y == c]).values, want)
    ra, va, pa = a.rows("source0")
    rb, vb, pb = b.rows("source0")
    assert ra.shape == (4, 7, 5) and bool(va.all()) and torch.equal(ra, rb) and torch.equal(pa, pb)
    assert bool((pa[:, 1:] >= pa[:, :-1]).all())  # priority order within each class
    r3, v3, p3 = a.rows("source0", 3)  # a smaller bank keeps each class's lowest priorities
    assert torch.equal(r3, ra[:, :3]) and torch.equal(p3, pa[:, :3])


def test_class_sample_marks_the_empty_slots_of_a_rare_class():
    s = ClassSample(3, 4, {"source0": 2})
    s.offer({"source0": torch.arange(10.0).reshape(5, 2), "y": torch.tensor([0, 0, 0, 0, 1])}, torch.rand(5, dtype=torch.float64))
    rows, valid, prio = s.rows("source0")
    assert valid.sum(1).tolist() == [4, 1, 0] and bool(torch.isinf(prio[~valid]).all())


def _bank(k=3, per=6, d=4, near=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(k, per, d, generator=g) * torch.tensor([1.0, 3.0, 0.5, 2.0])
    valid = torch.ones(k, per, dtype=torch.bool)
    valid[2, 3:] = False  # class 2 has three rows
    bank = NeighbourBank(k, per, d, near)
    bank.set_rows(rows, valid)
    return bank, rows, valid


@pytest.mark.parametrize("near", [1, 2, 3])  # one neighbour takes the plain-min path
def test_bank_distances_are_the_mean_of_the_nearest_standardised_squared_distances(near):
    bank, rows, valid = _bank(near=near)
    q = torch.randn(9, 4, generator=torch.Generator().manual_seed(5))
    x = rows[valid].double()
    var = x.var(0, unbiased=False)
    scale = 1 / torch.sqrt(var + 0.01 * var.mean() + 1e-12)
    want = []
    for c in range(3):
        ref = (rows[c][valid[c]].double() - x.mean(0)) * scale
        d2 = torch.cdist((q.double() - x.mean(0)) * scale, ref).square()
        want.append(d2.topk(near, dim=1, largest=False).values.mean(1) / 4)
    got = bank(q)
    assert got.shape == (9, 3)
    assert torch.allclose(got.double(), torch.stack(want, 1), rtol=1e-4, atol=1e-5)  # empty slots are never nearest


def test_bank_distances_are_differentiable_and_a_bank_row_is_at_distance_zero():
    bank, rows, _ = _bank()
    q = rows[0, :1].clone().requires_grad_(True)
    bank1 = NeighbourBank(3, 6, 4, 1)
    bank1.load_state_dict(bank.state_dict())
    assert float(bank1(q)[0, 0]) == pytest.approx(0.0, abs=1e-5)
    bank(q * 1.5).sum().backward()
    assert q.grad is not None and bool(torch.isfinite(q.grad).all()) and float(q.grad.abs().sum()) > 0


def test_bank_size_is_about_500_rows_up_to_250_classes_and_two_per_class_beyond():
    assert bank_size(10) == (50, 3)
    assert bank_size(1000) == (2, 2)
    assert bank_size(2) == (50, 3)
    assert bank_size(100, 2000) == (20, 3)


def test_leaving_out_a_slot_equals_a_bank_without_that_row():
    bank, rows, valid = _bank()
    q = torch.randn(4, 4, generator=torch.Generator().manual_seed(7))
    slots = torch.tensor([1, -1, 6 + 2, 2 * 6 + 1])  # class 0 row 1; none; class 1 row 2; class 2 row 1
    with leaving_out([bank], slots):
        got = bank(q)
    assert bank._left_out is None
    full = bank(q)
    assert torch.equal(got[1], full[1])
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        fewer = valid.clone()
        fewer[slot // 6, slot % 6] = False
        ref = NeighbourBank(3, 6, 4, 2)
        ref.load_state_dict(bank.state_dict())  # the same standardisation
        ref.bank_sq[slot] = float("inf")
        assert torch.allclose(got[i], ref(q[i : i + 1])[0])
        assert float(got[i, slot // 6]) >= float(full[i, slot // 6])


def test_fit_banks_the_first_layer_and_the_logits_and_leaves_each_attack_origin_out(digits_model, digits, monkeypatch):
    """The banks hold clean statistics rows (never a held-out row, whose own distance would be zero); an adversarial
    made from a bank image gets its evidence with its own clean image left out of the banks."""
    import hfguard.fitting as fitting

    seen = {}
    real_ev, real_cal, real_banks = fitting._evidence_of_pixels, fitting._calibrate, fitting._set_banks

    def ev(guard, pixels, left_out=None):
        if left_out is not None:
            seen["left_out"] = left_out.clone()
        return real_ev(guard, pixels, left_out)

    def cal(guard, layout, hold, *args, **kw):
        seen["held"] = hold["priority"].clone()
        return real_cal(guard, layout, hold, *args, **kw)

    def banks(guard, sums):
        seen["bank"] = real_banks(guard, sums)
        return seen["bank"]

    monkeypatch.setattr(fitting, "_evidence_of_pixels", ev)
    monkeypatch.setattr(fitting, "_calibrate", cal)
    monkeypatch.setattr(fitting, "_set_banks", banks)
    g = hfguard.protect(digits_model, progress=False).fit((digits.x_train, digits.y_train))
    assert g.neighboured == [0, len(g.layers)] and len(g.banks) == 2
    assert any(f.startswith(f"{g.layers[0]}~knn:") for f in g.fit_report["score_features"])
    assert any(f.startswith("logits~knn:") for f in g.fit_report["score_features"])
    per = g.layout["bank_per_class"]
    filled = torch.isfinite(g.banks[0].bank_sq).reshape(10, per).sum(1)
    assert bool((filled > g.layout["bank_neighbours"]).all())  # one left out still leaves enough
    in_bank = seen["bank"][torch.isfinite(seen["bank"])]
    assert len(in_bank) == int(filled.sum()) and not bool(torch.isin(seen["held"], in_bank).any())
    # every image is in the self-attack sample here (small data): the adversarials of bank images leave their slot out
    left = seen["left_out"]
    assert bool((left >= 0).any()) and bool((left < 0).any())
    assert bool(torch.isfinite(seen["bank"].flatten()[left[left >= 0]]).all())
    # the bank rows are those images' logits, standardised
    prio = content_priority(digits.x_train, g.seed)
    images = digits.x_train[torch.isin(prio, in_bank)]
    assert len(images) == len(in_bank)
    with torch.no_grad():
        logits = digits_model.eval()(images)
    u = (logits - g.banks[1].center) * g.banks[1].scale
    stored = g.banks[1].bank[torch.isfinite(g.banks[1].bank_sq)]
    assert float(torch.cdist(u, stored).min(1).values.max()) < 1e-2  # cdist rounds; other images lie at 1 and more


def test_no_bank_when_switched_off_and_settings_are_checked(digits_model, digits):
    g = hfguard.protect(digits_model, progress=False, neighbour_bank=0, calibration="clean", score_features="all").fit((digits.x_train, digits.y_train))
    assert g.neighboured == [] and len(g.banks) == 0 and not any("~knn" in f for f in g.fit_report["feature_names"])
    for bad in (-1, 2.5, True, "auto"):
        with pytest.raises(SettingsError, match="neighbour_bank"):
            hfguard.protect(digits_model, neighbour_bank=bad)
    import numpy as np

    assert hfguard.protect(digits_model, neighbour_bank=np.int64(200)).neighbour_bank == 200
    with pytest.raises(SettingsError, match="neighbour_bank=0"):
        hfguard.protect(digits_model, progress=False, neighbour_bank=0, score_features=["logits~knn:distance", "margin"]).fit(
            (digits.x_train, digits.y_train))


def test_a_guard_pickled_before_0_7_can_be_fitted_again(fitted, digits, tmp_path):
    """Guards pickled by 0.6 have neither ``neighboured`` nor ``neighbour_bank``: class defaults stand in (no banks)."""
    import copy

    g = copy.deepcopy(fitted)
    g.neighbour_bank = 0
    g.fit((digits.x_train, digits.y_train))  # a guard that keeps no bank, fitted again
    for attr in ("neighboured", "neighbour_bank"):
        g.__dict__.pop(attr, None)
    assert g.neighboured == [] and g.neighbour_bank == 0
    g.fit((digits.x_train, digits.y_train))
    g.save(str(tmp_path / "g.safetensors"))
    assert len(g.banks) == 0 and not any("~knn" in f for f in g.fit_report["score_features"])
