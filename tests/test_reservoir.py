import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfguard.reservoir import Reservoir, content_priority


def _stream(r, ids, pri, batch):
    returned = []
    for i in range(0, len(ids), batch):
        returned.append(r.offer({"id": ids[i : i + batch]}, pri[i : i + batch])["id"])
    return torch.cat(returned) if returned else torch.zeros(0, dtype=torch.long)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 400), cap=st.integers(1, 80), batch=st.integers(1, 70), seed=st.integers(0, 10))
def test_every_row_is_kept_or_returned_exactly_once_and_kept_are_the_lowest(n, cap, batch, seed):
    pri = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r = Reservoir(cap)
    returned = _stream(r, torch.arange(n), pri, batch)
    kept = r.contents().get("id", torch.zeros(0, dtype=torch.long))
    assert len(kept) == min(n, cap)
    assert torch.equal(torch.cat([returned, kept]).sort().values, torch.arange(n))
    assert torch.equal(kept.sort().values, pri.argsort()[: min(n, cap)].sort().values)


def test_sample_does_not_depend_on_order():
    x = torch.rand(1000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(1))
    a, b = Reservoir(100), Reservoir(100)
    for i in range(0, 1000, 64):
        a.offer({"x": x[i : i + 64]}, content_priority(x[i : i + 64]))
        b.offer({"x": x[perm][i : i + 64]}, content_priority(x[perm][i : i + 64]))
    assert torch.equal(a.contents()["x"], b.contents()["x"])


def test_priorities_look_uniform_and_depend_on_the_seed():
    x = torch.rand(5000, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    p = content_priority(x)
    assert ((p >= 0) & (p < 1)).all()
    hist = torch.histc(p.float(), bins=10, min=0, max=1)
    assert hist.min() > 400 and hist.max() < 600
    assert not torch.equal(p, content_priority(x, seed=1))
    assert torch.equal(content_priority(x[:7]), p[:7])
