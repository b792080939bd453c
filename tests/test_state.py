"""The guard's scoring maths on features (hfguard.state): the grouped kernels equal the per-source modules."""

import torch

import hfguard
from hfguard import evidence


def test_grouped_source_distances_equal_each_source_module(digits_model, digits):
    guard = hfguard.protect(digits_model, progress=False, score_features="all").fit((digits.x_train, digits.y_train))
    assert guard.probed, "the test needs probes"
    x = digits.x_test[:64]
    with torch.no_grad():
        logits, feats = guard._features(x)
        ref = guard._source_distances(feats)  # on a CPU: each source's module
        guard._grouped = True  # the GPU's grouped kernels, here on the CPU
        try:
            got = guard._source_distances(feats)
            score = guard.score(x)
        finally:
            guard._grouped = None
        score_ref = guard.score(x)
    n, p = len(guard.sources), len(guard.sources) + len(guard.probed)
    assert sorted(got) == sorted(ref) == sorted(guard._sources_used())
    assert any(n <= i < p for i in got) and any(i >= p for i in got)  # probes and nearest-neighbour banks
    for i, d in got.items():
        if i < n:
            module = guard.gaussians[i](feats[i])
        elif i < p:
            module = guard.probes[i - n](feats[guard.probed[i - n]], logits)
        else:
            module = guard.banks[i - p](feats[guard.neighboured[i - p]])
        assert torch.equal(ref[i], module)
        assert torch.allclose(d, module, rtol=1e-4, atol=1e-5), guard.evidence_sources[i]
    assert torch.allclose(score, score_ref, rtol=1e-4, atol=1e-4)
    ev = guard._evidence(logits, got)
    assert torch.allclose(ev, evidence.evidence_columns(guard.score_columns, got, logits), atol=1e-6)


def test_derived_constants_are_not_saved_and_follow_the_layout(fitted, tmp_path):
    state = fitted.state_dict()
    assert not {"group_indicator", "group_dims", "evidence_index"} & set(state)
    assert fitted.group_indicator.shape[1] == len(fitted._grouped_sources()[0]) == len(fitted.group_dims)
    assert fitted.group_dims.dtype == torch.long  # exact divisors even in a reduced-precision guard
    assert torch.equal(fitted.evidence_index, evidence.column_index(fitted.score_columns))
    path = str(tmp_path / "g.safetensors")
    fitted.save(path)
    loaded = hfguard.load(path, fitted.model)
    assert torch.equal(loaded.group_indicator, fitted.group_indicator) and torch.equal(loaded.evidence_index, fitted.evidence_index)
    assert torch.equal(loaded.group_dims, fitted.group_dims)


def test_grouped_maths_takes_half_precision_features(fitted, digits):
    x = digits.x_test[:32]
    with torch.no_grad():
        logits, feats = fitted._features(x)
        half = [None if f is None else f.to(torch.float16) for f in feats]
        ref = fitted._source_distances(half)  # the CPU's per-source way
        fitted._grouped = True
        try:
            got = fitted._source_distances(half)
        finally:
            fitted._grouped = None
    for i in ref:
        assert got[i].dtype == ref[i].dtype == torch.float32  # the statistics' dtype, whatever the features'
        assert torch.allclose(got[i], ref[i], rtol=1e-4, atol=1e-5)
