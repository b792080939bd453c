import torch

from hfguard import evidence


def test_gap_is_zero_when_prediction_is_nearest():
    d = torch.tensor([[0.1, 2.0, 3.0], [1.0, 0.2, 0.5]])
    pred = torch.tensor([0, 1])
    dist, gap, nearest = evidence.source_evidence(d, pred)
    assert torch.allclose(gap, torch.zeros(2))
    assert torch.allclose(dist, nearest)
    _, gap2, _ = evidence.source_evidence(d, torch.tensor([2, 2]))
    assert (gap2 > 0).all()


def test_margin_is_large_on_the_boundary():
    logits = torch.tensor([[5.0, 4.99, 0.0], [9.0, 0.0, 0.0]])
    m = evidence.margin_evidence(logits)
    assert m[0] > m[1]


def test_feature_names_and_columns_agree():
    sources = ["a", "b"]
    names = evidence.feature_names(sources)
    plan = [evidence.parse_feature(n, sources) for n in names]
    dists = {0: torch.rand(4, 3), 1: torch.rand(4, 3)}
    logits = torch.randn(4, 3)
    pred = logits.argmax(1)
    full = torch.stack([*evidence.source_evidence(dists[0], pred), *evidence.source_evidence(dists[1], pred), evidence.margin_evidence(logits)], 1)
    assert torch.allclose(evidence.evidence_columns(plan, dists, logits), full)


def test_parse_feature_rejects_unknown():
    import pytest

    with pytest.raises(ValueError, match="unknown evidence feature"):
        evidence.parse_feature("nope:distance", ["a"])


def test_any_column_plan_picks_the_right_columns_with_or_without_a_given_index():
    g = torch.Generator().manual_seed(0)
    dists = {i: torch.rand(5, 4, generator=g) + 0.01 for i in (0, 2, 3)}
    logits = torch.randn(5, 4, generator=g)
    pred = logits.argmax(1)
    plan = [("gap", 3), ("margin", -1), ("distance", 0), ("nearest", 3), ("distance", 3)]  # source 2 unused, any order
    ref = torch.stack([
        evidence.source_evidence(dists[3], pred)[1], evidence.margin_evidence(logits), evidence.source_evidence(dists[0], pred)[0],
        evidence.source_evidence(dists[3], pred)[2], evidence.source_evidence(dists[3], pred)[0],
    ], 1)
    assert torch.allclose(evidence.evidence_columns(plan, dists, logits), ref)
    assert torch.allclose(evidence.evidence_columns(plan, dists, logits, index=evidence.column_index(plan)), ref)
    no_margin = [c for c in plan if c[0] != "margin"]
    assert torch.allclose(evidence.evidence_columns(no_margin, dists, logits), ref[:, [0, 2, 3, 4]])
    assert torch.allclose(evidence.evidence_columns([("margin", -1)], dists, logits), ref[:, [1]])


def test_infinite_distances_give_an_infinite_gap_and_no_nan_gradient():
    d = torch.tensor([[float("inf"), float("inf")], [1.0, 2.0]], requires_grad=True)
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    plan = [("margin", -1), ("distance", 0)]
    ev = evidence.evidence_columns(plan, {0: d}, logits)
    ev[1].sum().backward()
    assert torch.isfinite(d.grad).all() and torch.isfinite(logits.grad).all()
    _, gap, _ = evidence.source_evidence(d.detach(), torch.tensor([0, 1]))
    assert gap[0] == float("inf") and torch.isfinite(gap[1])


def test_source_evidence_of_stacked_sources_equals_each_source():
    g = torch.Generator().manual_seed(1)
    d = torch.rand(6, 3, 4, generator=g) + 0.01
    pred = torch.randint(0, 4, (6,), generator=g)
    stacked = evidence.source_evidence(d, pred)
    for s in range(3):
        for a, b in zip(stacked, evidence.source_evidence(d[:, s], pred)):
            assert torch.equal(a[:, s], b)
