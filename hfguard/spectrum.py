"""Spectral transforms in an exportable form, and the HF features of an image.

The 2-D DCT-II is written as two matrix products (``C_h @ x @ C_w.T``) so it
exports to plain ONNX ``MatMul`` and runs as fast as any small GEMM.  The HF
features of an image are the log-power of its DCT coefficients averaged over
channels and over square blocks of the frequency plane, keeping only blocks
whose (row + column) frequency index is at least half of the grid: a
class-wise HF signature is the class mean of those features.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["dct_matrix", "dct2", "pool_matrix", "spectral_tile", "spectral_grid", "hf_block_mask", "dc_blocks", "hf_features", "dct_radius",
           "radial_spectrum", "high_radius_share"]


def dct_matrix(n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
    """Orthonormal DCT-II matrix ``C`` (n, n): ``C @ v`` is the DCT of ``v``, ``C.T @ c`` inverts it."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype=dtype, device=device)


def dct2(x: Tensor, ch: Tensor, cw: Tensor) -> Tensor:
    """2-D orthonormal DCT of ``x`` (..., H, W) with DCT matrices ``ch`` (H, H) and ``cw`` (W, W)."""
    return ch @ x @ cw.T


def pool_matrix(n: int, g: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Averaging matrix (g, n) that pools ``n`` positions into ``g`` bins like ``adaptive_avg_pool1d``."""
    # built from Python numbers, so a traced (ONNX) graph holds it as one constant: traced tensor
    # arithmetic would export the ceiling's floor division of negatives as ONNX's truncating Div
    rows = []
    for b in range(g):
        lo, hi = (b * n) // g, -((-(b + 1) * n) // g)
        rows.append([1.0 / (hi - lo) if lo <= i < hi else 0.0 for i in range(n)])
    return torch.tensor(rows, dtype=dtype)


def spectral_tile(n: int, max_side: int = 32, min_side: int = 16) -> int:
    """Side of the tiles an image side of ``n`` pixels is cut into for its spectrum: ``n`` itself up to
    ``max_side``, else the largest divisor of ``n`` not above ``max_side`` (``n`` when that is below
    ``min_side``, e.g. for a prime ``n``)."""
    if n <= max_side:
        return n
    side = max(d for d in range(1, max_side + 1) if n % d == 0)
    return side if side >= min_side else n


def spectral_grid(h: int, w: int, max_grid: int = 8) -> tuple[int, int]:
    """Size of the frequency-block grid for an ``h`` x ``w`` image (at most ``max_grid`` per side)."""
    return min(h, max_grid), min(w, max_grid)


def hf_block_mask(grid: tuple[int, int]) -> Tensor:
    """Boolean mask (gh * gw,) of the HF frequency blocks: normalised index ``i/gh + j/gw >= 0.5``."""
    gh, gw = grid
    i = torch.arange(gh, dtype=torch.float64)[:, None] / gh
    j = torch.arange(gw, dtype=torch.float64)[None, :] / gw
    return ((i + j) >= 0.5).flatten()


def dc_blocks(ph: Tensor, pw: Tensor) -> list[int]:
    """Indices, in the flattened (gh, gw) grid, of the frequency blocks that pool a tile's DC coefficient
    (row 0 and column 0 of the DCT), given the pooling matrices (gh, sh) and (gw, sw)."""
    rows = (ph[:, 0] != 0).nonzero().flatten().tolist()
    cols = (pw[:, 0] != 0).nonzero().flatten().tolist()
    return [i * int(pw.shape[0]) + j for i in rows for j in cols]


def hf_features(
    pixels: Tensor, ch: Tensor, cw: Tensor, ph: Tensor, pw: Tensor, index: Tensor, eps: float = 1e-6, *,
    channel_weight: Tensor | None = None, band: int | None = None,
) -> Tensor:
    """HF spectral features of a batch of pixel images.

    Images larger than the DCT matrices are cut into tiles of the matrices' size (see
    :func:`spectral_tile`), and the power is averaged over the tiles (Welch's estimate): the frequency
    plane is pooled to a grid of at most 8 x 8 blocks anyway, and a 32-point DCT costs 7 times less per
    pixel than a 224-point one.

    Args:
        pixels: (N, C, H, W) images in pixel units, or images ``(pixels - mean) / std`` with
            ``channel_weight = std ** 2`` (see below).
        ch, cw: DCT matrices (sh, sh) and (sw, sw); sh divides H and sw divides W.
        ph, pw: frequency pooling matrices (gh, sh) and (gw, sw), see :func:`pool_matrix`.
        index: (F,) long indices of the HF blocks in the flattened grid (``hf_block_mask(grid).nonzero()``).
        eps: floor inside the logarithm.
        channel_weight: (C,) or (1,) weights of each channel's power in the mean over channels (default 1).
            A per-channel affine map ``p = x * std + mean`` changes a tile's DCT by ``std`` everywhere but
            at the DC coefficient, so the features of ``p`` are those of ``x`` weighted by ``std ** 2``
            whenever ``index`` leaves out the block holding DC (block 0, never an HF block): the guard
            skips un-normalising the batch (one pass over it).
        band: image rows transformed at a time (a multiple of the tile side dividing H); default one row of
            tiles on a CPU, whose coefficients stay in cache (``benchmarks/spectrum_cost.py``: 3.3 against
            8.0 ms for the whole of a 16x3x224x224 batch), and the whole image on other devices, where
            kernel launches cost more than memory, and while tracing for ONNX.

    Returns:
        (N, F) log-power features; differentiable w.r.t. ``pixels``.
    """
    n, c, h, w = pixels.shape
    h, w, sh, sw = int(h), int(w), int(ch.shape[0]), int(cw.shape[0])  # Python ints, also while tracing for ONNX

    def squared(coeff: Tensor) -> Tensor:  # in place where no gradient needs the coefficients: no second buffer
        return coeff * coeff if coeff.requires_grad else coeff.square_()

    if (sh, sw) == (h, w):
        chan = squared(dct2(pixels, ch, cw))  # (N, C, sh, sw)
    else:
        # rows of each tile, then its columns (no permuted copy), summed over the tiles, one band at a time
        th, tw = h // sh, w // sw
        if band is None:  # a traced (ONNX) graph gets the whole image: one copy of the ops, whatever runs it later
            band = sh if pixels.device.type == "cpu" and not torch.jit.is_tracing() else h
        if band <= 0 or band % sh or h % band:
            raise ValueError(f"band must be a positive multiple of the tile side {sh} that divides the image height {h}, got {band}")
        chan = None
        for i in range(0, h, band):
            rows = ch @ pixels[:, :, i : i + band].reshape(n, c, band // sh, sh, w)  # (N, C, tiles down, sh, W)
            part = squared(rows.reshape(n, c, band // sh, sh, tw, sw) @ cw.T).sum((2, 4))  # (N, C, sh, sw)
            chan = part if chan is None else (chan + part if part.requires_grad else chan.add_(part))
        chan = chan / (th * tw)  # mean over the tiles: (N, C, sh, sw)
    if channel_weight is None:
        power = chan.mean(1)  # over channels: (N, sh, sw)
    else:
        power = (chan * (channel_weight.to(chan.dtype) / c).reshape(1, -1, 1, 1)).sum(1)
    blocks = (ph @ power @ pw.T).flatten(1)
    return torch.log(blocks.index_select(1, index) + eps)


def dct_radius(h: int, w: int, *, device: torch.device | None = None) -> Tensor:
    """Normalised radius (h, w) of each 2-D DCT coefficient: 0 at DC, 1 at the highest frequency in both directions."""
    i = torch.arange(h, dtype=torch.float64, device=device)[:, None] / max(h - 1, 1)
    j = torch.arange(w, dtype=torch.float64, device=device)[None, :] / max(w - 1, 1)
    return torch.sqrt((i**2 + j**2) / 2.0)


def radial_spectrum(pixels: Tensor, ch: Tensor, cw: Tensor, bins: int = 16) -> Tensor:
    """Radially averaged DCT power (N, bins): bin ``b`` covers normalised radius ``[b/bins, (b+1)/bins)`` of
    :func:`dct_radius` (the last bin includes radius 1)."""
    coeff = dct2(pixels, ch, cw)
    power = (coeff * coeff).mean(1)
    h, w = power.shape[-2:]
    r = (dct_radius(h, w, device=pixels.device) * bins).long().clamp_max(bins - 1).flatten()
    flat = power.flatten(1)
    out = torch.zeros(flat.shape[0], bins, dtype=flat.dtype, device=flat.device)
    out.index_add_(1, r, flat)
    counts = torch.bincount(r, minlength=bins).clamp_min(1).to(flat.dtype)
    return out / counts


def high_radius_share(pixels: Tensor, ch: Tensor, cw: Tensor, start: float = 0.5) -> float:
    """Share of a batch's total DCT power (over images, channels and coefficients) at normalised radius >= ``start``."""
    coeff = dct2(pixels, ch, cw)
    power = (coeff * coeff).sum((0, 1))  # (H, W)
    high = dct_radius(*power.shape[-2:], device=pixels.device) >= start
    total = float(power.sum())
    return float(power[high].sum()) / total if total > 0 else float("nan")
