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
