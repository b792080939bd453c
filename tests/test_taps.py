import threading

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from hfguard.data import small_cnn, small_resnet
from hfguard.taps import Pooling, capture, choose_layers, discover_layers, pool_activation, pooled_grid, watchable_units


def _auto(model, shape, k=10):
    infos, _ = discover_layers(model, torch.zeros(2, *shape))
    return choose_layers(infos, dict(watchable_units(model)), k, input_shape=shape)


def test_auto_layers_sequential_cnn():
    assert _auto(small_cnn(1, 10, 28).eval(), (1, 28, 28)) == ["1", "4", "8"]


def test_auto_layers_torchvision_resnet18():
    m = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    layers = _auto(m, (3, 64, 64))
    assert layers == ["relu", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]


def test_auto_layers_custom_module(custom_net):
    # the in-place ReLU module is skipped (runs once, same shape as conv1): the stage keeps its last module
    assert _auto(custom_net, (1, 8, 8)) == ["act", "conv2"]


def test_auto_layers_small_resnet():
    # the stem and layer1 share a shape: one stage, whose last module is kept
    assert _auto(small_resnet().eval(), (1, 28, 28)) == ["layer1", "layer2", "layer3"]


def test_shared_module_called_twice_is_not_chosen():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(1, 4, 3, padding=1)
            self.c2 = nn.Conv2d(4, 4, 3, padding=1)
            self.act = nn.ReLU()
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(self.act(self.c2(self.act(self.c1(x)))).flatten(1))

    layers = _auto(Shared().eval(), (1, 8, 8), 3)
    assert "act" not in layers and layers


def test_pooled_grid_respects_max_dim():
    assert pooled_grid((32, 28, 28), 512) == 4
    assert pooled_grid((64, 14, 14), 512) == 2
    assert pooled_grid((512, 7, 7), 512) == 1
    assert pooled_grid((200,), 512) == 0


def test_pool_activation_paths_agree():
    a = torch.rand(3, 4, 8, 8)
    fast = pool_activation(a, 4)
    slow = pool_activation(a.clone().requires_grad_(True), 4)
    assert torch.allclose(fast, slow.detach(), atol=1e-6)
    assert pool_activation(torch.rand(3, 4, 7, 7), 2).shape == (3, 16)
    one = torch.rand(3, 5, 7, 6)
    assert torch.allclose(pool_activation(one, 1), torch.nn.functional.adaptive_avg_pool2d(one, 1).flatten(1), atol=1e-6)
    one.requires_grad_(True)
    pool_activation(one, 1).sum().backward()
    assert torch.allclose(one.grad, torch.full_like(one, 1 / 42))


def test_capture_removes_hooks_even_on_error():
    m = small_cnn(1, 10, 8).eval()
    mods = [("1", m[1])]
    with pytest.raises(RuntimeError):
        with capture(mods, {"1": Pooling("map", 2)}):
            raise RuntimeError("boom")
    assert all(len(mod._forward_hooks) == 0 for mod in m.modules())


def test_capture_ignores_other_threads():
    m = small_cnn(1, 10, 8).eval()
    mods = [("1", m[1])]
    other = {}
    with capture(mods, {"1": Pooling("map", 2)}) as store:
        t = threading.Thread(target=lambda: other.setdefault("out", m(torch.rand(5, 1, 8, 8))))
        t.start()
        t.join()
        assert "1" not in store
        m(torch.rand(2, 1, 8, 8))
    assert store["1"].shape[0] == 2


def test_pooling_a_map_the_grid_does_not_divide_matches_adaptive_pooling():
    a = torch.randn(3, 5, 15, 11)
    for grid in (2, 4):
        ref = torch.nn.functional.adaptive_avg_pool2d(a, grid).flatten(1)
        assert torch.allclose(pool_activation(a, grid), ref, atol=1e-6)


def test_layer_kind_reads_maps_by_their_strides():
    from hfguard.taps import layer_kind

    assert layer_kind((96, 56, 56), (224, 224)) == "map"
    assert layer_kind((56, 56, 96), (224, 224)) == "map-last"  # Swin stage
    assert layer_kind((56, 40, 96), (224, 160)) == "map-last"  # non-square input
    assert layer_kind((96, 56, 40), (224, 160)) == "map"
    assert layer_kind((8, 8, 8), (32, 32)) == "map"  # both readings fit: PyTorch's channels-first convention
    assert layer_kind((197, 768), (224, 224)) == "tokens"
    assert layer_kind((1000,), (224, 224)) == "flat"


def test_token_pooling_is_the_class_token_and_the_mean_patch_token():
    from hfguard.taps import Pooling, choose_pooling

    a = torch.randn(3, 5, 8)
    pooling, dim = choose_pooling((5, 8), "tokens", 16)  # no image size: one class token, as before format 4
    assert pooling == Pooling("tokens", 8) and dim == 16 and pooling.prefix == 1
    assert choose_pooling((5, 8), "tokens", 16, (32, 32))[0].prefix == 1  # 4 patches of 16 px and a class token
    assert torch.equal(pooling(a), torch.cat([a[:, 0], a[:, 1:].mean(1)], 1))
    small, dim = choose_pooling((5, 8), "tokens", 8)  # budget 8: each summary averaged to 4 channel groups
    assert dim == 8 and torch.allclose(small(a), torch.cat([a[:, 0].reshape(3, 4, 2).mean(2), a[:, 1:].mean(1).reshape(3, 4, 2).mean(2)], 1))


def test_token_prefix_tells_extra_tokens_from_patches():
    from hfguard.taps import token_prefix

    assert token_prefix(197, (224, 224)) == 1  # 14x14 patches of 16 px + class token
    assert token_prefix(196, (224, 224)) == 0  # patches only (a patch embedding, or no class token)
    assert token_prefix(198, (224, 224)) == 2  # class + distillation token (DeiT)
    assert token_prefix(261, (224, 224)) == 5  # 16x16 patches of 14 px + class token + 4 registers
    assert token_prefix(25, (64, 96)) == 1  # non-square: 4x6 patches + class token
    assert token_prefix(197, (230, 230)) == 1 and token_prefix(197, (224, 225)) == 1  # a partial patch dropped
    assert token_prefix(8, (224, 224)) == 0  # a few learned queries are not 2x2 patches and 4 extra tokens
    assert token_prefix(3136, (224, 224)) == 0  # Swin-like 56x56 tokens
    assert token_prefix(77, (224, 224)) == 0  # unrelated to the image's geometry: no token singled out


def test_token_pooling_without_a_class_token_is_the_mean_and_spread_of_the_tokens():
    from hfguard.taps import Pooling, pool_tokens

    a = torch.randn(3, 6, 8, requires_grad=True)
    out = Pooling("tokens", 8, prefix=0)(a)
    assert torch.allclose(out, torch.cat([a.mean(1), a.std(1, unbiased=False)], 1), atol=1e-5)
    out.sum().backward()
    assert a.grad.isfinite().all()
    const = torch.ones(2, 4, 8, requires_grad=True)  # zero spread: the gradient stays finite
    pool_tokens(const, 8, 0).sum().backward()
    assert const.grad.isfinite().all()
    two = pool_tokens(a.detach(), 8, 2)  # class + distillation: their mean, and the patches' mean
    assert torch.allclose(two, torch.cat([a[:, :2].mean(1), a[:, 2:].mean(1)], 1).detach())


def test_average_groups_matches_adaptive_pooling_and_wide_maps_fit_the_budget():
    from hfguard.taps import Pooling, average_groups, choose_pooling

    v = torch.randn(4, 576)
    assert torch.allclose(average_groups(v, 512), F.adaptive_avg_pool1d(v[:, None], 512)[:, 0], atol=1e-6)
    pooling, dim = choose_pooling((2048, 7, 7), "map", 512)
    assert dim == 512 and pooling == Pooling("map", 1, 512)
    a = torch.randn(2, 2048, 7, 7)
    assert torch.allclose(pooling(a), a.mean((2, 3)).reshape(2, 512, 4).mean(2), atol=1e-5)
    last, dim_last = choose_pooling((7, 7, 64), "map-last", 512)
    b = torch.randn(2, 7, 7, 64)
    assert dim_last == 64 * 2 * 2 and torch.allclose(last(b), pool_activation(b.permute(0, 3, 1, 2), 2))


def test_ambiguous_maps_are_read_by_the_module_that_made_them():
    """(96, 96, 96) from a 384-px image fits both readings: a Swin-like block (LayerNorm over the last
    dimension, no convolution) is channels-last, a convolution channels-first."""
    from hfguard.taps import layer_kind

    swin_like = nn.Sequential(nn.LayerNorm(96), nn.Linear(96, 96))
    conv = nn.Sequential(nn.Conv2d(3, 96, 3), nn.BatchNorm2d(96))
    assert layer_kind((96, 96, 96), (384, 384), swin_like) == "map-last"
    assert layer_kind((96, 96, 96), (384, 384), conv) == "map"
    assert layer_kind((56, 56, 64), (224, 224)) == "map-last"  # strides 4, 4 vs 4, 3.5: only channels-last fits


def test_a_single_token_is_pooled_as_a_vector():
    from hfguard.taps import Pooling, choose_pooling

    pooling, dim = choose_pooling((1, 768), "tokens", 512)
    assert pooling == Pooling("flat", 0, 512) and dim == 512
    assert pooling(torch.randn(3, 1, 768)).shape == (3, 512)


def test_cached_matrices_made_under_inference_mode_still_allow_gradients():
    """Review finding: a pooling matrix first built under inference_mode was cached as an inference tensor
    and broke every later backward pass through it."""
    from hfguard.taps import _averaging_matrix, average_groups

    _averaging_matrix.cache_clear()
    with torch.inference_mode():
        average_groups(torch.randn(2, 768), 512)
        pool_activation(torch.randn(2, 4, 7, 7), 2)
    v = torch.randn(2, 768, requires_grad=True)
    average_groups(v, 512).sum().backward()
    a = torch.randn(2, 4, 7, 7, requires_grad=True)
    pool_activation(a, 2).sum().backward()
    assert v.grad is not None and a.grad is not None


class _Normalize(nn.Module):
    def forward(self, x):
        return (x - 0.5) / 0.25


class _BackboneAndHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = torchvision.models.resnet18(weights=None)
        self.backbone.fc = nn.Identity()
        self.head = nn.Linear(512, 10)

    def forward(self, x):
        return self.head(self.backbone(x))


def test_auto_layers_see_through_wrappers():
    """Review: a network one level down (behind an input normalisation, under a small head, in an adapter) was one
    opaque unit: auto watched only the normalised input, or only the penultimate embedding."""
    stages = ["relu", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    wrapped = nn.Sequential(_Normalize(), torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    assert _auto(wrapped, (3, 64, 64)) == [f"1.{n}" for n in stages]  # the parameter-free normalisation is no stage
    assert _auto(_BackboneAndHead().eval(), (3, 64, 64)) == [f"backbone.{n}" for n in stages]
    # a plain model is not affected: no child of its root holds 90 % of its parameters
    assert _auto(torchvision.models.resnet18(weights=None, num_classes=10).eval(), (3, 64, 64)) == stages


def test_the_wrapper_rule_does_not_open_a_stage_through_a_container():
    """Review: a wrapped Sequential of stages was itself opened like the root, so a stage holding 90 % of its
    parameters was split into its internals."""

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv, self.sc = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

        def forward(self, x):
            return torch.relu(self.conv(x)) + self.sc(x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.stages = nn.Sequential(Block(8), nn.Conv2d(8, 64, 3, stride=2, padding=1), Block(64))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

        def forward(self, x):
            return self.head(self.stages(self.stem(x)))

    layers = _auto(Net().eval(), (3, 16, 16))
    assert "stages.2" in layers and not any(n.startswith("stages.2.") for n in layers)
