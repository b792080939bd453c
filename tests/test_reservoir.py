import torch

from hfguard.reservoir import Reservoir


def test_every_row_is_kept_or_returned_exactly_once():
    r = Reservoir(50, seed=0)
    returned = []
    for i in range(0, 1000, 64):
        ids = torch.arange(i, min(i + 64, 1000))
        returned.append(r.offer({"id": ids})["id"])
    kept = r.contents()["id"]
    allids = torch.cat([torch.cat(returned), kept]).sort().values
    assert len(kept) == 50
    assert torch.equal(allids, torch.arange(1000))


def test_sample_is_roughly_uniform_and_deterministic():
    def run(seed):
        r = Reservoir(200, seed=seed)
        for i in range(0, 10000, 100):
            r.offer({"id": torch.arange(i, i + 100)})
        return r.contents()["id"]

    a, b = run(0), run(0)
    assert torch.equal(a, b)
    # a uniform sample of 200 from 0..9999 has mean ~5000 (sd ~200)
    assert abs(a.float().mean().item() - 5000) < 800
    assert (a < 5000).sum() > 60 and (a >= 5000).sum() > 60


def test_small_stream_keeps_everything():
    r = Reservoir(100)
    out = r.offer({"id": torch.arange(30)})
    assert len(out["id"]) == 0 and len(r) == 30
