"""CPU cost of the guard's spectrum and pooling on ImageNet-size batches (the choices in hfguard.spectrum / taps).

Interleaved medians (each variant timed in a random order every round, in one process):

* the HF features of a 16x3x224x224 normalised batch: one row of 32-px tiles at a time (the CPU default) vs the
  whole batch at once (the GPU / ONNX path), with the std**2 channel weights vs un-normalising the batch first
  (as 0.2 did, which also transformed the whole batch at once), and with 16- or 8-px tiles (not used: they would change the features of large images);
* the default's features with an even/odd butterfly (half the multiply-adds, more passes over the band; not used);
* the default's features with the tile transforms as strided convolutions (rows and columns, or rows then a matmul),
  and with the columns transformed first in one GEMM over the whole batch (not used);
* pooling a (16, 576, 7, 7) map to one position: ``mean`` (used) vs the two strided sums used for larger grids.

Run:  python benchmarks/spectrum_cost.py
Writes benchmarks/results/spectrum-cost.json.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import hfguard
from hfguard import spectrum
from hfguard.taps import pool_activation


def timed(fns: dict, rounds: int = 40) -> dict[str, float]:
    """Median milliseconds of each function, timed in a shuffled order every round."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for _ in range(rounds):
        random.shuffle(order)
        for k in order:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()}


def _hf_features(chan: torch.Tensor, weight: torch.Tensor, tiles: int, pm: torch.Tensor | None = None) -> torch.Tensor:
    """The default's features from the tiles' summed DCT power ``chan`` (N, C, 32, 32): the mean over ``tiles`` tiles,
    the std**2-weighted mean over channels, the 8x8 frequency blocks (``pm``: the pooling matrix, default the plain
    one) and the log of the HF ones."""
    c, tile = chan.shape[1], chan.shape[-1]
    pm = spectrum.pool_matrix(tile, 8) if pm is None else pm
    power = (chan / tiles * (weight / c).reshape(1, -1, 1, 1)).sum(1)
    return torch.log((pm @ power @ pm.T).flatten(1).index_select(1, spectrum.hf_block_mask((8, 8)).nonzero().flatten()) + 1e-6)


def butterfly_features(x: torch.Tensor, weight: torch.Tensor, tile: int = 32) -> torch.Tensor:
    """The default's features (32-px tiles, one row of tiles at a time) with an even/odd butterfly on both axes:
    a tile's DCT-II is ``E (top + flipped bottom)`` for the even frequencies and ``O (top - flipped bottom)`` for
    the odd ones, half the multiply-adds of the full matrix; the pooling matrices are permuted to match."""
    n, c, h, w = x.shape
    half, tw = tile // 2, w // tile
    full = spectrum.dct_matrix(tile)
    even, odd = full[0::2, :half].contiguous(), full[1::2, :half].contiguous()
    perm = torch.cat([torch.arange(0, tile, 2), torch.arange(1, tile, 2)])
    pm = spectrum.pool_matrix(tile, 8)[:, perm].contiguous()
    chan = None
    for i in range(0, h, tile):
        band = x[:, :, i : i + tile].reshape(n, c, tile, tw, tile)
        top, bottom = band[..., :half], band[..., half:].flip(-1)
        rows = torch.cat([(top + bottom) @ even.T, (top - bottom) @ odd.T], -1).reshape(n, c, tile, w)
        top, bottom = rows[:, :, :half], rows[:, :, half:].flip(2)
        ze, zo = (even @ (top + bottom)).reshape(n, c, half, tw, tile), (odd @ (top - bottom)).reshape(n, c, half, tw, tile)
        part = torch.cat([ze.square_().sum(3), zo.square_().sum(3)], 2)
        chan = part if chan is None else chan.add_(part)
    return _hf_features(chan, weight, (h // tile) * tw, pm)


def conv_features(x: torch.Tensor, weight: torch.Tensor, *, columns_by_matmul: bool, tile: int = 32) -> torch.Tensor:
    """The default's features with each tile's row transform as a strided convolution (kernel (tile, 1), stride
    (tile, 1)), and its column transform as a second one or as a matmul."""
    n, c, h, w = x.shape
    d = spectrum.dct_matrix(tile)
    rows = torch.nn.functional.conv2d(x.reshape(n * c, 1, h, w), d.reshape(tile, 1, tile, 1), stride=(tile, 1))  # (nc, k, th, W)
    if columns_by_matmul:
        coeff = rows.reshape(n * c, tile, h // tile, w // tile, tile) @ d.T  # (nc, k, th, tw, l)
        chan = coeff.square_().sum((2, 3))
    else:
        coeff = torch.nn.functional.conv2d(rows.reshape(n * c * tile, 1, h // tile, w), d.reshape(tile, 1, 1, tile), stride=(1, tile))
        chan = coeff.square_().sum((2, 3))
    return _hf_features(chan.reshape(n, c, tile, tile), weight, (h // tile) * (w // tile))


def columns_first_features(x: torch.Tensor, weight: torch.Tensor, tile: int = 32) -> torch.Tensor:
    """The default's features with every tile's columns transformed first, in one GEMM over the whole batch, then its rows."""
    n, c, h, w = x.shape
    d = spectrum.dct_matrix(tile)
    cols = (x.reshape(n, c, h, w // tile, tile) @ d.T).reshape(n, c, h // tile, tile, w)
    coeff = (d @ cols).reshape(n, c, h // tile, tile, w // tile, tile)
    return _hf_features(coeff.square_().sum((2, 4)), weight, (h // tile) * (w // tile))


def main() -> None:
    random.seed(0)
    torch.manual_seed(0)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    x = (torch.rand(16, 3, 224, 224) - mean) / std
    weight = std.flatten() ** 2

    def features(tile: int, **kw):  # noqa: ANN003, ANN202
        ch, grid = spectrum.dct_matrix(tile), spectrum.spectral_grid(tile, tile)
        pm, index = spectrum.pool_matrix(tile, grid[0]), spectrum.hf_block_mask(grid).nonzero().flatten()
        return lambda: spectrum.hf_features(x, ch, ch, pm, pm, index, **kw)

    ch32, pm32 = spectrum.dct_matrix(32), spectrum.pool_matrix(32, 8)
    index = spectrum.hf_block_mask((8, 8)).nonzero().flatten()
    gap = float((butterfly_features(x, weight) - features(32, channel_weight=weight)()).abs().max())
    assert gap < 1e-4, f"the butterfly variant must give the default's features; max difference {gap}"
    variants = {"conv+conv": lambda: conv_features(x, weight, columns_by_matmul=False), "conv+matmul": lambda: conv_features(x, weight, columns_by_matmul=True),
                "columns first": lambda: columns_first_features(x, weight)}
    reference = features(32, channel_weight=weight)()
    gaps = {k: float((f() - reference).abs().max()) for k, f in variants.items()}
    assert max(gaps.values()) < 1e-4, f"every variant must give the default's features; max differences {gaps}"
    spec = timed({
        "32-px tiles, one row of tiles at a time, std^2 weights (default on a CPU)": features(32, channel_weight=weight),
        "32-px tiles, whole batch at once, std^2 weights (GPU / ONNX path)": features(32, channel_weight=weight, band=224),
        "32-px tiles, one row at a time, after un-normalising the batch (one more pass, as 0.2 did)":
            lambda: spectrum.hf_features(x * std + mean, ch32, ch32, pm32, pm32, index),
        "16-px tiles, one row at a time (not used)": features(16, channel_weight=weight),
        "8-px tiles, one row at a time (not used)": features(8, channel_weight=weight),
        "32-px tiles, one row at a time, even/odd butterfly on both axes (half the multiply-adds; not used)": lambda: butterfly_features(x, weight),
        "32-px tiles as two strided convolutions, whole batch (not used)": variants["conv+conv"],
        "32-px tiles as a strided convolution then a matmul, whole batch (not used)": variants["conv+matmul"],
        "32-px tiles, columns first in one GEMM, then rows, whole batch (not used)": variants["columns first"],
    })
    a = torch.relu(torch.randn(16, 576, 7, 7))
    n, c, h, w = a.shape
    pool = timed({
        "(16, 576, 7, 7) to one position: mean (used)": lambda: pool_activation(a, 1),
        "(16, 576, 7, 7) to one position: two strided sums (0.2)":
            lambda: a.reshape(n, c, 1, h, w).sum(3).reshape(n, c, 1, 1, w).sum(4).flatten(1).mul_(1.0 / (h * w)),
    }, rounds=100)
    out = {"command": "python " + " ".join(sys.argv), "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
           f"{torch.get_num_threads()} threads", "butterfly_max_feature_difference": gap, "other_variants_max_feature_difference": gaps, "hfguard": hfguard.__version__, "milliseconds (median)": {"spectrum of 16x3x224x224": spec, "pooling": pool}}
    print(json.dumps(out, indent=2))
    (Path(__file__).resolve().parent / "results" / "spectrum-cost.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
