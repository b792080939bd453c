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


def test_skipping_the_rows_cannot_keep_rejects_gives_the_same_sample_and_count():
    g = torch.Generator().manual_seed(3)
    pri = torch.rand(500, generator=g, dtype=torch.float64)
    ids = torch.arange(500)
    full, lazy = Reservoir(40), Reservoir(40)
    _stream(full, ids, pri, 32)
    skipped = 0
    for i in range(0, 500, 32):
        p = pri[i : i + 32]
        no = lazy.cannot_keep(p)
        assert not no.any() or len(lazy) == lazy.capacity  # nothing is skipped while the sample fills up
        lazy.skip(int(no.sum()))
        skipped += int(no.sum())
        lazy.offer({"id": ids[i : i + 32][~no]}, p[~no])
    assert skipped > 300  # most of a long stream is decided without its rows
    assert torch.equal(lazy.contents()["id"], full.contents()["id"]) and lazy.seen == full.seen == 500


def test_priorities_on_a_cpu_never_chunk_and_never_write_the_input(monkeypatch):
    import hfguard.reservoir as reservoir

    x = torch.rand(50, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    before = x.clone()
    whole = content_priority(x, seed=2)
    monkeypatch.setattr(reservoir, "_CHUNK", 3 * 64 * 7)  # 7 rows at a time, off a CPU
    assert torch.equal(content_priority(x, seed=2), whole)  # a CPU's product is whole: the 0.6.0 digits
    assert torch.equal(x, before)  # float64 input: the rounding works on a copy
    assert content_priority(x[:0]).shape == (0,)


def test_an_empty_reservoir_of_no_capacity_keeps_nothing():
    assert Reservoir(0).cannot_keep(torch.rand(3, dtype=torch.float64)).all()
