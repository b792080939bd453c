"""Two gloo processes on this machine fit the same guard as one process on all the data."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import hfguard
from hfguard.data import small_cnn

from .conftest import assert_equivalent_guards


def _rank_main(rank: int, world: int, tmp: str, split: str = "strided") -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = small_cnn(1, 10, 8)
        model.load_state_dict(load_file(f"{tmp}/model.safetensors"))
        data = load_file(f"{tmp}/data.safetensors")
        n = len(data["x"])
        if split == "strided":
            part = slice(rank, None, world)  # each rank reads only its shard
        elif split == "uneven":
            part = slice(0, 2 * n // 3) if rank == 0 else slice(2 * n // 3, n)
        else:  # "empty": rank 1 gets nothing
            part = slice(0, n) if rank == 0 else slice(0, 0)
        x, y = data["x"][part], data["y"][part]
        guard = hfguard.protect(model.eval(), progress=False).fit((x, y))
        guard.save(f"{tmp}/guard{rank}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in this torch")
def test_two_gloo_ranks_match_a_single_process_fit(digits_model, digits, tmp_path):
    tmp = str(tmp_path)
    save_file({k: v.contiguous() for k, v in digits_model.state_dict().items()}, f"{tmp}/model.safetensors")
    save_file({"x": digits.x_train.contiguous(), "y": digits.y_train.contiguous()}, f"{tmp}/data.safetensors")
    mp.spawn(_rank_main, args=(2, tmp), nprocs=2, join=True)
    single = hfguard.protect(digits_model, progress=False).fit((digits.x_train, digits.y_train))
    ranks = [hfguard.load(f"{tmp}/guard{r}.safetensors", digits_model) for r in range(2)]
    for g in ranks:
        assert abs(g.threshold - single.threshold) < 1e-5
        assert_equivalent_guards(g, single, digits.x_test[:50])


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in this torch")
@pytest.mark.parametrize("split", ["uneven", "empty"])
def test_uneven_and_empty_shards_match_a_single_process_fit(digits_model, digits, tmp_path, split):
    """Defect: a rank with an empty shard raised (or skipped the gather) while the others hung."""
    tmp = str(tmp_path)
    save_file({k: v.contiguous() for k, v in digits_model.state_dict().items()}, f"{tmp}/model.safetensors")
    save_file({"x": digits.x_train.contiguous(), "y": digits.y_train.contiguous()}, f"{tmp}/data.safetensors")
    mp.spawn(_rank_main, args=(2, tmp, split), nprocs=2, join=True)
    single = hfguard.protect(digits_model, progress=False).fit((digits.x_train, digits.y_train))
    for r in range(2):
        g = hfguard.load(f"{tmp}/guard{r}.safetensors", digits_model)
        assert abs(g.threshold - single.threshold) < 1e-5
        assert_equivalent_guards(g, single, digits.x_test[:50])
