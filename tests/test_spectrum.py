import numpy as np
import pytest
import torch
from scipy.fft import dctn

from hfguard import spectrum


@pytest.mark.parametrize("n", [5, 8, 28])
def test_dct_matrix_is_orthonormal(n):
    c = spectrum.dct_matrix(n, dtype=torch.float64)
    assert torch.allclose(c @ c.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_dct2_matches_scipy():
    x = torch.rand(2, 3, 8, 6, dtype=torch.float64)
    out = spectrum.dct2(x, spectrum.dct_matrix(8, dtype=torch.float64), spectrum.dct_matrix(6, dtype=torch.float64))
    ref = dctn(x.numpy(), type=2, norm="ortho", axes=(-2, -1))
    assert np.allclose(out.numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("n, g", [(28, 8), (8, 8), (10, 3)])
def test_pool_matrix_matches_adaptive_pool(n, g):
    v = torch.rand(4, n, dtype=torch.float64)
    ref = torch.nn.functional.adaptive_avg_pool1d(v[:, None], g)[:, 0]
    assert torch.allclose(v @ spectrum.pool_matrix(n, g, dtype=torch.float64).T, ref)


def test_hf_mask_excludes_dc_and_keeps_highest():
    m = spectrum.hf_block_mask((8, 8))
    assert not m[0] and m[-1]


def _hf(x):
    h, w = x.shape[-2:]
    grid = spectrum.spectral_grid(h, w)
    idx = spectrum.hf_block_mask(grid).nonzero().flatten()
    args = (spectrum.dct_matrix(h, dtype=x.dtype), spectrum.dct_matrix(w, dtype=x.dtype), spectrum.pool_matrix(h, grid[0], dtype=x.dtype), spectrum.pool_matrix(w, grid[1], dtype=x.dtype), idx)
    return spectrum.hf_features(x, *args)


def test_hf_features_shape_and_noise_response():
    x = torch.zeros(3, 1, 12, 12)
    x[:, :, 3:9, 3:9] = 1.0
    f_clean = _hf(x)
    f_noisy = _hf(x + 0.1 * torch.randn_like(x))
    assert f_clean.shape == (3, int(spectrum.hf_block_mask((8, 8)).sum()))
    assert (f_noisy.mean(1) > f_clean.mean(1)).all()


def test_hf_features_gradcheck():
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_hf, (x,))


def test_radial_spectrum_of_constant_image_is_dc_only():
    x = torch.ones(1, 1, 8, 8)
    r = spectrum.radial_spectrum(x, spectrum.dct_matrix(8), spectrum.dct_matrix(8), bins=4)
    assert r[0, 0] > 0 and torch.allclose(r[0, 1:], torch.zeros(3), atol=1e-10)


def test_large_images_are_tiled_and_the_tile_powers_averaged():
    """A 64x96 image's HF features with 32-point DCTs equal the log of the mean block power over its 6 tiles,
    each computed with scipy's DCT."""
    assert [spectrum.spectral_tile(n) for n in (28, 32, 64, 224, 227, 100)] == [28, 32, 32, 32, 227, 25]
    x = torch.rand(2, 3, 64, 96, dtype=torch.float64)
    grid = spectrum.spectral_grid(32, 32)
    ch = spectrum.dct_matrix(32, dtype=torch.float64)
    pm = spectrum.pool_matrix(32, grid[0], dtype=torch.float64)
    index = spectrum.hf_block_mask(grid).nonzero().flatten()
    tiles = [x[:, :, i : i + 32, j : j + 32].numpy() for i in range(0, 64, 32) for j in range(0, 96, 32)]
    power = np.mean([dctn(t, type=2, norm="ortho", axes=(-2, -1)) ** 2 for t in tiles], axis=0).mean(1)  # tiles, channels
    blocks = (pm.numpy() @ power @ pm.numpy().T).reshape(2, -1)[:, index.numpy()]
    for band in (None, 32, 64):  # the default (one row of tiles at a time on a CPU) and the whole image at once (GPUs)
        got = spectrum.hf_features(x, ch, ch, pm, pm, index, eps=0.0, band=band)
        assert np.allclose(got.numpy(), np.log(blocks), atol=1e-10)


@pytest.mark.parametrize("size", [28, 64])  # one whole-image DCT; 32-px tiles
@pytest.mark.parametrize("channels", [1, 3])
def test_channel_weights_stand_in_for_undoing_the_normalisation(size, channels):
    """The guard feeds normalised inputs with std**2 weights instead of un-normalised pixels: equal features
    (only a tile's DC coefficient, never an HF block, feels the mean), with and without gradients."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(4, channels, size, size, dtype=torch.float64, generator=g)
    mean = torch.tensor([0.485, 0.456, 0.406][:channels], dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225][:channels], dtype=torch.float64).view(-1, 1, 1)
    x = (pixels - mean) / std
    tile = spectrum.spectral_tile(size)
    grid = spectrum.spectral_grid(tile, tile)
    ch = spectrum.dct_matrix(tile, dtype=torch.float64)
    pm = spectrum.pool_matrix(tile, grid[0], dtype=torch.float64)
    index = spectrum.hf_block_mask(grid).nonzero().flatten()
    assert 0 not in index.tolist()
    want = spectrum.hf_features(pixels, ch, ch, pm, pm, index)
    got = spectrum.hf_features(x, ch, ch, pm, pm, index, channel_weight=std.flatten() ** 2)
    assert torch.allclose(got, want, atol=1e-9)
    xg = x.clone().requires_grad_(True)
    with_grad = spectrum.hf_features(xg, ch, ch, pm, pm, index, channel_weight=std.flatten() ** 2)
    assert torch.allclose(with_grad.detach(), want, atol=1e-9)
    with_grad.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    kept, ptr = x.clone(), x.data_ptr()
    spectrum.hf_features(x, ch, ch, pm, pm, index, channel_weight=std.flatten() ** 2)
    assert x.data_ptr() == ptr and torch.equal(x, kept)  # the input is never squared in place


def test_dc_blocks_and_band_checks():
    assert spectrum.dc_blocks(spectrum.pool_matrix(32, 8), spectrum.pool_matrix(32, 8)) == [0]
    assert spectrum.dc_blocks(spectrum.pool_matrix(7, 7), spectrum.pool_matrix(6, 3)) == [0]
    assert 0 not in spectrum.hf_block_mask((8, 8)).nonzero().flatten().tolist()
    x = torch.rand(1, 1, 96, 64)
    ch, pm = spectrum.dct_matrix(32), spectrum.pool_matrix(32, 8)
    index = spectrum.hf_block_mask((8, 8)).nonzero().flatten()
    for bad in (0, 48, 64):  # not a multiple of the tile, or not dividing the height
        with pytest.raises(ValueError, match="band"):
            spectrum.hf_features(x, ch, ch, pm, pm, index, band=bad)


def test_radial_bins_cover_the_whole_radius_and_the_share_is_of_total_power():
    """Review: the radius was normalised so that its top bin was always empty, and the report's "share of power"
    summed per-bin averages (bins hold different numbers of coefficients)."""
    c = spectrum.dct_matrix(8, dtype=torch.float64)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    r = spectrum.radial_spectrum(x, c, c, bins=16)
    assert (r > 0).all()
    coeff = c @ x @ c.T
    power = (coeff**2).sum((0, 1))
    radius = spectrum.dct_radius(8, 8)
    assert radius.max() == 1.0 and radius[0, 0] == 0.0
    expected = float(power[radius >= 0.5].sum() / power.sum())
    assert abs(spectrum.high_radius_share(x, c, c, 0.5) - expected) < 1e-12
