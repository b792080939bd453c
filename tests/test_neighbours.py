"""Nearest-neighbour class distances (hfguard.neighbours) and how fit builds the banks."""

import pytest
import torch

import hfguard
from hfguard.errors import SettingsError
from hfguard.neighbours import ClassSample, NeighbourBank, bank_size
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


def test_bank_distances_are_the_mean_of_the_nearest_standardised_squared_distances():
    bank, rows, valid = _bank()
    q = torch.randn(9, 4, generator=torch.Generator().manual_seed(5))
    x = rows[valid].double()
    var = x.var(0, unbiased=False)
    scale = 1 / torch.sqrt(var + 0.01 * var.mean() + 1e-12)
    want = []
    for c in range(3):
        ref = (rows[c][valid[c]].double() - x.mean(0)) * scale
        d2 = torch.cdist((q.double() - x.mean(0)) * scale, ref).square()
        want.append(d2.topk(2, dim=1, largest=False).values.mean(1) / 4)
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


def test_bank_size_is_fixed_whatever_the_number_of_classes():
    assert bank_size(10) == (50, 3)
    assert bank_size(1000) == (2, 2)
    assert bank_size(2) == (50, 3)
    assert bank_size(100, 2000) == (20, 3)


def test_fit_banks_the_first_layer_and_the_logits_and_never_attacks_a_bank_image(digits_model, digits, monkeypatch):
    """The banks hold clean statistics rows (never a held-out row, whose own distance would be zero), at most a quarter
    of a class's rows, and no self-attack starts from a bank image."""
    import hfguard.fitting as fitting

    seen = {}
    real_heads, real_banks, real_cal = fitting._self_attack_heads, fitting._set_banks, fitting._calibrate

    def heads(guard, sample, *args):
        seen["attacked"] = sample["priority"].clone()
        return real_heads(guard, sample, *args)

    def banks(guard, sums):
        seen["bank"] = real_banks(guard, sums)
        return seen["bank"]

    def cal(guard, layout, hold, *args, **kw):
        seen["held"] = hold["priority"].clone()
        return real_cal(guard, layout, hold, *args, **kw)

    monkeypatch.setattr(fitting, "_self_attack_heads", heads)
    monkeypatch.setattr(fitting, "_set_banks", banks)
    monkeypatch.setattr(fitting, "_calibrate", cal)
    g = hfguard.protect(digits_model, progress=False).fit((digits.x_train, digits.y_train))
    assert g.neighboured == [0, len(g.layers)] and len(g.banks) == 2
    assert any(f.startswith(f"{g.layers[0]}~knn:") for f in g.fit_report["score_features"])
    assert any(f.startswith("logits~knn:") for f in g.fit_report["score_features"])
    per = g.layout["bank_per_class"]
    filled = torch.isfinite(g.banks[0].bank_sq).reshape(10, per).sum(1)
    counts = torch.tensor(g.fit_report["class_counts"])
    assert bool((filled <= torch.clamp(counts // 4, min=2)).all()) and bool((filled >= g.layout["bank_neighbours"]).all())
    assert len(seen["bank"]) == int(filled.sum())
    assert not bool(torch.isin(seen["attacked"], seen["bank"]).any()) and not bool(torch.isin(seen["held"], seen["bank"]).any())
    # the bank rows are those images' logits, standardised
    prio = content_priority(digits.x_train, g.seed)
    images = digits.x_train[torch.isin(prio, seen["bank"])]
    assert len(images) == len(seen["bank"])
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
