import threading

import pytest
import torch
import torchvision
from torch import nn

from hfguard.data import small_cnn, small_resnet
from hfguard.taps import capture, choose_layers, discover_layers, pool_activation, pooled_grid, watchable_units


def _auto(model, shape, k=10):
    infos, _ = discover_layers(model, torch.zeros(2, *shape))
    return choose_layers(infos, dict(watchable_units(model)), k)


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


def test_capture_removes_hooks_even_on_error():
    m = small_cnn(1, 10, 8).eval()
    mods = [("1", m[1])]
    with pytest.raises(RuntimeError):
        with capture(mods, {"1": 2}):
            raise RuntimeError("boom")
    assert all(len(mod._forward_hooks) == 0 for mod in m.modules())


def test_capture_ignores_other_threads():
    m = small_cnn(1, 10, 8).eval()
    mods = [("1", m[1])]
    other = {}
    with capture(mods, {"1": 2}) as store:
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
