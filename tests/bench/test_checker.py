"""The bench's cached checker (hfguard.bench.checker): recipes, cache keys, and a fine-tuned copy that leaves the model alone."""

import torch

from hfguard.bench.checker import cached_checker, recipe, recipe_kind, weights_tag
from hfguard.bench.tables import checker_recipe
from hfguard.data import small_cnn


def _data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10


def test_recipe_names_keep_the_old_cache_keys_and_name_every_change():
    # the names of checkers trained before fine-tuning and schedules existed must not change (their cache files)
    assert recipe(5) == "pgd-5 step 2.5 eps/k random start, half clean half adversarial CE, Adam 1e-3, batch 128, small_cnn, v1"
    assert recipe(1).startswith("fgsm-rs step 1.25 eps") and recipe_kind(1) == "" and recipe_kind(5) == "-pgd5"
    torch.manual_seed(0)
    a, b = small_cnn(1, 10, 8), small_cnn(1, 10, 8)
    assert recipe(5, "cosine") == recipe(5) + ", cosine lr"
    assert recipe(5, "cosine", a) == recipe(5) + f", cosine lr, initialised from Sequential {weights_tag(a)}"
    assert weights_tag(a) != weights_tag(b) and len(weights_tag(a)) == 16
    assert recipe_kind(5, "cosine", a) == "-pgd5-cosine-init"


def test_a_fine_tuned_copy_leaves_the_model_alone_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HFGUARD_CACHE", str(tmp_path))
    x, y = _data()
    torch.manual_seed(1)
    model = small_cnn(1, 10, 8).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        soft = model(x).softmax(1)
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


def test_the_results_say_how_the_checker_was_made():
    base = {"steps": 5, "eps": 0.1, "epochs": 6}
    old = checker_recipe(base)  # a result written before the recipe was recorded: the small CNN on the labels
    assert old.startswith("the small CNN trained by PGD-5") and "the true labels" in old and "constant" in old
    new = checker_recipe({**base, "init": "model", "targets": "softmax", "schedule": "cosine"})
    assert new.startswith("a copy of the model") and "softmax" in new and "cosine" in new
