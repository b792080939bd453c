"""The bench's cached checker (hfguard.bench.checker): recipes, cache keys, and a fine-tuned copy that leaves the model alone."""

import hashlib

import pytest
import torch

import hfguard
from hfguard.bench.checker import cached_checker, model_softmax, recipe, recipe_kind, weights_tag
from hfguard.bench.config import preset
from hfguard.bench.tables import checker_recipe
from hfguard.data import small_cnn, small_resnet
from hfguard.errors import ModelError, SettingsError


def _data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10


def test_recipe_names_keep_the_old_cache_keys_and_name_every_change():
    # the names of checkers trained before fine-tuning and schedules existed must not change (their cache files)
    assert recipe(5) == "pgd-5 step 2.5 eps/k random start, half clean half adversarial CE, Adam 1e-3, batch 128, small_cnn, v1"
    assert recipe(1) == "fgsm-rs step 1.25 eps, half clean half adversarial CE, Adam 1e-3, batch 128, small_cnn, v1"
    assert recipe_kind(1) == "" and recipe_kind(5) == "-pgd5" and recipe_kind(5, "cosine") == "-pgd5-cosine"
    torch.manual_seed(0)
    a, b = small_cnn(1, 10, 8), small_cnn(1, 10, 8)
    assert recipe(5, "cosine") == recipe(5) + ", cosine lr"
    assert recipe(5, "cosine", a) == recipe(5) + f", cosine lr, initialised from Sequential {weights_tag(a)}"
    assert recipe_kind(5, "cosine", a) == "-pgd5-cosine-init" and recipe_kind(1, "cosine", a) == "-cosine-init"
    # the digest of the starting weights is the formula robust_checker.py used before it moved here
    raw = b"".join(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() for v in a.state_dict().values())
    assert weights_tag(a) == hashlib.sha256(raw).hexdigest()[:16] and weights_tag(a) != weights_tag(b)


def test_a_fine_tuned_copy_leaves_the_model_alone_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HFGUARD_CACHE", str(tmp_path))
    x, y = _data()
    torch.manual_seed(1)
    model = small_cnn(1, 10, 8).eval().requires_grad_(False)  # a frozen model: its copy must be trainable, it must stay frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    soft = model_softmax(model, x)
    net, seconds, cached = cached_checker("digits", x, soft, eps=0.1, epochs=1, steps=1, schedule="cosine", init=model)
    assert not cached and seconds > 0 and net is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model's weights are untouched
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())  # the copy was trained
    assert [f.name for f in tmp_path.glob("robust-checker-digits-*")] and all("-cosine-init-" in f.name for f in tmp_path.glob("robust-checker-*"))
    again, seconds_again, cached_again = cached_checker("digits", x, soft, eps=0.1, epochs=1, steps=1, schedule="cosine", init=model)
    assert cached_again and seconds_again == float(f"{seconds:.1f}")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())
    # other targets, or other starting weights, are another checker
    _, _, hard_cached = cached_checker("digits", x, y, eps=0.1, epochs=1, steps=1, schedule="cosine", init=model)
    torch.manual_seed(2)
    _, _, other_cached = cached_checker("digits", x, soft, eps=0.1, epochs=1, steps=1, schedule="cosine", init=small_cnn(1, 10, 8))
    assert not hard_cached and not other_cached


@pytest.mark.filterwarnings("ignore::UserWarning")  # 64 images and a random model: the fit's small-data warnings
def test_a_batchnorm_model_copy_is_a_checker_and_its_statistics_stay_the_models(tmp_path, monkeypatch):
    monkeypatch.setenv("HFGUARD_CACHE", str(tmp_path))
    x, y = _data(64)
    x = torch.nn.functional.interpolate(x, size=16)
    torch.manual_seed(0)
    model = small_resnet(1, 10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}  # BatchNorm running statistics included
    net, _, _ = cached_checker("digits", x, model_softmax(model, x), eps=0.1, epochs=1, steps=2, schedule="cosine", init=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training
    assert not torch.equal(before["stem.1.running_mean"], net.state_dict()["stem.1.running_mean"])  # the copy's statistics moved
    guard = hfguard.protect(model, progress=False, checker=net, calibration="clean").fit((x, y))
    v = guard.check(x[:8])
    assert v.score.shape == (8,) and bool(torch.isfinite(v.score).all()) and 0 <= guard.fit_report["checker"]["agreement_with_model"] <= 1


def test_bad_checker_settings_and_starting_networks_get_typed_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HFGUARD_CACHE", str(tmp_path))
    with pytest.raises(SettingsError, match="checker_targets"):
        preset("digits", checker_targets="probabilities")
    with pytest.raises(SettingsError, match="checker_schedule"):
        preset("digits", checker_schedule="step")
    for bad in (0.0, -0.5, 1.5):  # a share of the largest attack eps, never zero or beyond it
        with pytest.raises(SettingsError, match="checker_eps_scale"):
            preset("fashion-mnist", checker_eps_scale=bad)
    x, _ = _data()
    with pytest.raises(ModelError, match=r"\(N, 3\) logits"):  # a 10-class model cannot start a 3-class checker
        cached_checker("digits", x, torch.full((len(x), 3), 1 / 3), eps=0.1, epochs=1, steps=1, init=small_cnn(1, 10, 8))
    assert not list(tmp_path.glob("robust-checker-*"))


def test_the_checker_trains_at_half_the_largest_attack_eps_unless_told():
    assert preset("fashion-mnist").checker_eps == pytest.approx(0.05) and preset("digits").checker_eps == pytest.approx(0.075)
    assert preset("fashion-mnist", checker_eps_scale=1.0).checker_eps == pytest.approx(0.1)  # the recipe before 0.8.3
    assert "eps 0.05 " in checker_recipe({"steps": 5, "eps": preset("fashion-mnist").checker_eps, "epochs": 6})


def test_the_results_say_how_the_checker_was_made():
    base = {"steps": 5, "eps": 0.1, "epochs": 6}
    old = checker_recipe(base)  # a result written before the recipe was recorded: the small CNN on the labels
    assert old.startswith("the small CNN trained by PGD-5") and "the true labels" in old and "constant" in old
    new = checker_recipe({**base, "init": "model", "targets": "softmax", "schedule": "cosine"})
    assert new.startswith("a copy of the model") and "softmax" in new and "cosine" in new
