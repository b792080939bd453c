import json
import os
import pickle

import pytest
import torch
from torch import nn

import hfguard
from hfguard.data import small_cnn


@pytest.fixture()
def saved(fitted, tmp_path):
    path = tmp_path / "guard.safetensors"
    fitted.save(str(path))
    return path


def test_round_trip_gives_identical_scores_and_settings(fitted, digits, saved, digits_model):
    g2 = hfguard.load(str(saved), digits_model)
    x = digits.x_test[:50]
    assert torch.equal(fitted.score(x), g2.score(x))
    assert g2.threshold == fitted.threshold and g2.layers == fitted.layers and g2.policy == fitted.policy
    assert torch.equal(g2.check(x).flagged, fitted.check(x).flagged)


def test_state_dict_carries_the_learned_state(fitted, digits, digits_model):
    sd = fitted.state_dict()
    assert any(k.startswith("gaussians.") for k in sd) and "calibrated_threshold" in sd
    assert {"head_weight", "head_bias"} <= set(sd)  # the learned combiner is state too
    assert set(fitted.guard_state()) == {k for k in sd if not k.startswith("model.")}


def test_load_honours_runtime_overrides_and_refuses_the_rest(saved, digits_model, fitted, digits):
    """Defect: load(p, model, fpr=0.2) reported fpr 0.2 and kept the 0.05 threshold."""
    g = hfguard.load(str(saved), digits_model, filter_sigma=0.9, strict=True)
    assert float(g.sigma_) == pytest.approx(0.9) and g.strict
    assert g.threshold == fitted.threshold
    for bad in ({"fpr": 0.2}, {"layers": ["1"]}, {"normalize": ([0.5], [0.5])}, {"calibration": "clean"}):
        with pytest.raises(ValueError, match="cannot change"):
            hfguard.load(str(saved), digits_model, **bad)


def write_old_file(path, header, tensors, version):
    """Writes ``header`` and ``tensors`` as a guard file of format ``version`` (before format 3 the threshold was named ``threshold_``)."""
    from safetensors.torch import save_file

    from hfguard import io

    header = {**header, "format_version": version}
    if version < 3:
        tensors = {("threshold_" if k == "calibrated_threshold" else k): v for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"hfguard": json.dumps(header, sort_keys=True), "digest": io._digest(header, tensors)})
    return tensors


def test_format_1_files_load_as_the_clean_only_combiner(digits_model, digits, tmp_path):
    """A file written before the combiner heads existed (format 1) still loads and scores as it did."""
    from safetensors.torch import load_file

    from hfguard import io

    g = hfguard.protect(digits_model, progress=False, calibration="clean").fit((digits.x_train, digits.y_train))
    p = tmp_path / "v2.safetensors"
    g.save(str(p))
    header, tensors = io.read_guard_file(str(p))
    header.pop("calibration")
    header["spec"].pop("calibration")
    header["spec"].pop("heads")
    old = tmp_path / "v1.safetensors"
    tensors = write_old_file(old, header, {k: v for k, v in tensors.items() if not k.startswith("head_")}, 1)
    g1 = hfguard.load(str(old), digits_model)
    x = digits.x_test[:40]
    assert torch.allclose(g1.score(x), g.score(x)) and g1.threshold == g.threshold
    assert load_file(str(old)).keys() == tensors.keys()


def test_format_2_files_load_with_their_threshold_name(fitted, digits_model, digits, tmp_path):
    """Format 2 named the threshold tensor ``threshold_``; such files still load and score identically."""
    from hfguard import io

    p = tmp_path / "v3.safetensors"
    fitted.save(str(p))
    header, tensors = io.read_guard_file(str(p))
    assert header["format_version"] == io.FORMAT_WITHOUT_CHECKER and "calibrated_threshold" in tensors  # no checker: 0.7 reads it
    old = tmp_path / "v2.safetensors"
    write_old_file(old, header, tensors, 2)
    g2 = hfguard.load(str(old), digits_model)
    x = digits.x_test[:40]
    assert torch.equal(g2.score(x), fitted.score(x)) and g2.threshold == fitted.threshold


def test_load_with_policy_override(saved, digits_model):
    assert hfguard.load(str(saved), digits_model, policy="filter").policy == "filter"


def test_missing_file(tmp_path, digits_model):
    with pytest.raises(hfguard.StateFileError, match="no guard file"):
        hfguard.load(str(tmp_path / "nope.safetensors"), digits_model)


def test_truncated_file(saved, digits_model):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(hfguard.StateFileError):
        hfguard.load(str(saved), digits_model)


def test_random_bytes(tmp_path, digits_model):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(os.urandom(4096))
    with pytest.raises(hfguard.StateFileError):
        hfguard.load(str(p), digits_model)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/hfguard-pwned",))


def test_pickle_file_is_refused_without_executing(tmp_path, digits_model):
    p = tmp_path / "evil.safetensors"
    p.write_bytes(pickle.dumps(_Boom()))
    if os.path.exists("/tmp/hfguard-pwned"):
        os.remove("/tmp/hfguard-pwned")
    with pytest.raises(hfguard.StateFileError):
        hfguard.load(str(p), digits_model)
    assert not os.path.exists("/tmp/hfguard-pwned")


def test_tampered_header_is_detected(saved, digits_model):
    data = bytearray(saved.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["hfguard"])
    meta["threshold"] = 1e9
    meta["spec"]["layers"] = meta["spec"]["layers"]  # keep structure
    header["__metadata__"]["hfguard"] = json.dumps(meta, sort_keys=True)
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    saved.write_bytes(len(new).to_bytes(8, "little") + new + bytes(data[8 + n :]))
    with pytest.raises(hfguard.StateFileError, match="modified"):
        hfguard.load(str(saved), digits_model)


def test_tampered_tensor_is_detected(saved, digits_model):
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(hfguard.StateFileError, match="modified"):
        hfguard.load(str(saved), digits_model)


def test_foreign_safetensors_file(tmp_path, digits_model):
    from safetensors.torch import save_file

    p = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(p))
    with pytest.raises(hfguard.StateFileError, match="not an hfguard"):
        hfguard.load(str(p), digits_model)


def test_other_model_is_refused(saved):
    other = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    with pytest.raises(hfguard.ModelMismatchError):
        hfguard.load(str(saved), other)
    wider = small_cnn(1, 12, 8)
    with pytest.raises(hfguard.ModelMismatchError, match="outputs"):
        hfguard.load(str(saved), wider)


def test_format_2_file_of_large_images_keeps_its_full_size_spectrum_and_grid_pooling(tmp_path):
    """A format-2 header has ``grids`` and no ``poolings`` or ``spectral_tile``: it loads as it was fitted
    (maps pooled by grid, a whole-image 40-point DCT), and an old state_dict key still loads."""
    from torch import nn

    from hfguard import io, spectrum
    from hfguard.bench.synthetic import usable_random_model
    from hfguard.taps import Pooling

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 20 * 20, 3)).eval()
    x, y = torch.rand(90, 3, 40, 40), torch.arange(90) % 3
    usable_random_model(model, x, y, 3)
    g = hfguard.protect(model, progress=False, calibration="clean").fit((x, y))
    assert g.dct_h.shape == (20, 20)  # format 3: tiles of 20 (the largest divisor of 40 up to 32)
    p = tmp_path / "v3.safetensors"
    g.save(str(p))
    header, tensors = io.read_guard_file(str(p))
    layout = header["spec"]
    layout["grids"] = [q[1] for q in layout.pop("poolings")]
    layout.pop("spectral_tile")
    tensors["dct_h"], tensors["dct_w"] = spectrum.dct_matrix(40), spectrum.dct_matrix(40)  # sized as format 2 saved them
    gh, gw = layout["spectral_grid"]
    tensors["pool_h"], tensors["pool_w"] = spectrum.pool_matrix(40, gh), spectrum.pool_matrix(40, gw)
    old = tmp_path / "v2.safetensors"
    write_old_file(old, header, tensors, 2)
    g2 = hfguard.load(str(old), model)
    assert g2.dct_h.shape == (40, 40) and g2.poolings == {n: Pooling("map", s) for n, s in zip(g.layers, layout["grids"])}
    assert torch.isfinite(g2.score(x[:4])).all()
    g3 = hfguard.protect(model, progress=False, calibration="clean").fit((x, y))
    sd = {("threshold_" if k == "calibrated_threshold" else k): v for k, v in g.state_dict().items()}
    g3.load_state_dict(sd)
    assert g3.threshold == g.threshold


def test_format_3_token_layers_keep_their_class_token_summary():
    """Files before format 4 stored (kind, size, channels) per layer and summarised every token layer by its first
    token and the mean of the others: they load with a prefix of one token; format 4 stores the prefix."""
    from hfguard.state import layout_poolings
    from hfguard.taps import Pooling

    old = {"poolings": [["map", 4, 0], ["tokens", 256, 0]]}
    new = {"poolings": [["map", 4, 0, 1], ["tokens", 256, 0, 0]]}
    assert layout_poolings(old) == [Pooling("map", 4), Pooling("tokens", 256, 0, 1)]
    assert layout_poolings(new)[1] == Pooling("tokens", 256, 0, 0)


def test_format_3_files_load_end_to_end(fitted, digits_model, digits, tmp_path):
    """A 0.3 file: one head per regime (2) and a token layer stored as (kind, size, channels). Both load and score as
    the file says: the two heads' smooth maximum, and the class-token summary."""
    from hfguard import combiner, io
    from hfguard.bench.synthetic import random_model, usable_random_model

    p = tmp_path / "g.safetensors"
    fitted.save(str(p))
    header, tensors = io.read_guard_file(str(p))
    header = {**header, "spec": {**header["spec"], "heads": 2}}
    tensors = {**tensors, "head_weight": tensors["head_weight"][:2].clone(), "head_bias": tensors["head_bias"][:2].clone()}
    write_old_file(tmp_path / "v3.safetensors", header, tensors, 3)
    g3 = hfguard.load(str(tmp_path / "v3.safetensors"), digits_model)
    x = digits.x_test[:40]
    assert g3.head_weight.shape[0] == 2
    assert torch.allclose(g3.score(x), g3._score_evidence(*_evidence(g3, x)), atol=1e-6)
    five = combiner.head_score(_standardised(fitted, x), fitted.head_weight, fitted.head_bias)
    two = combiner.head_score(_standardised(fitted, x), fitted.head_weight[:2], fitted.head_bias[:2])
    assert torch.allclose(g3.score(x), two, atol=1e-5) and not torch.allclose(two, five)

    vit = random_model("vit_b_16", 4, 32)
    xv = torch.rand(48, 3, 32, 32)
    usable_random_model(vit, xv, torch.arange(48) % 4, 4, batch_size=48)
    g = hfguard.protect(vit, progress=False, calibration="clean", batch_size=16).fit((xv, torch.arange(48) % 4))
    g.save(str(tmp_path / "vit.safetensors"))
    header, tensors = io.read_guard_file(str(tmp_path / "vit.safetensors"))
    assert any(q[0] == "tokens" and q[3] == 1 for q in header["spec"]["poolings"])  # torchvision's class token
    header = {**header, "spec": {**header["spec"], "poolings": [q[:3] for q in header["spec"]["poolings"]]}}
    write_old_file(tmp_path / "vit3.safetensors", header, tensors, 3)
    gv = hfguard.load(str(tmp_path / "vit3.safetensors"), vit)
    assert torch.allclose(gv.score(xv[:8]), g.score(xv[:8]), atol=1e-6)


def _evidence(g, x):
    from hfguard.fitting import _evidence_of_pixels

    return _evidence_of_pixels(g, x)


def _standardised(g, x):
    from hfguard import calibrate

    ev, pred = _evidence(g, x)
    return calibrate.standardize(ev, pred, g.evidence_mean, g.evidence_std)


def test_format_4_files_without_probes_load_and_score_as_before(fitted, digits_model, digits, tmp_path):
    """A 0.4 file has no linear probes (no ``probes`` in its layout, no probe tensors; here a 0.5 file rewritten as
    format 4): it loads and scores with the evidence it was fitted on."""
    from hfguard import combiner, io

    p = tmp_path / "g.safetensors"
    fitted.save(str(p))
    header, tensors = io.read_guard_file(str(p))
    spec = dict(header["spec"])
    keep = [i for i, f in enumerate(spec["score_features"]) if "->" not in f and "~knn" not in f]  # no probes, no banks
    assert len(keep) < len(spec["score_features"])
    spec["score_features"] = [spec["score_features"][i] for i in keep]
    for key in ("probes", "probe_dim", "neighboured", "bank_per_class", "bank_neighbours"):
        spec.pop(key)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(("probes.", "banks."))}
    for k in ("evidence_mean", "evidence_std", "head_weight"):
        tensors[k] = tensors[k][:, keep].clone()
    header = {k: v for k, v in header.items() if k not in ("score_features_setting", "neighbour_bank")}  # new in formats 5 and 7
    write_old_file(tmp_path / "v4.safetensors", {**header, "spec": spec}, tensors, 4)
    g4 = hfguard.load(str(tmp_path / "v4.safetensors"), digits_model)
    x = digits.x_test[:40]
    assert g4.evidence_sources == g4.sources and len(g4.probes) == 0
    assert g4.score_features_setting == spec["score_features"]  # before format 5 only the list was saved
    assert g4.attack_families == header["attack_families"]
    expected = combiner.head_score(_standardised(fitted, x)[:, keep], fitted.head_weight[:, keep], fitted.head_bias)
    assert torch.allclose(g4.score(x), expected, atol=1e-5)


def test_the_attack_families_round_trip(digits_model, digits, tmp_path):
    """A family list given in any order is saved, and loaded, in FAMILIES order (the heads' order)."""
    g = hfguard.protect(digits_model, progress=False, calibration="clean", attack_families=["cw-l2", "pgd-linf"]).fit((digits.x_train, digits.y_train))
    g.save(str(tmp_path / "g.safetensors"))
    g2 = hfguard.load(str(tmp_path / "g.safetensors"), digits_model)
    assert g2.attack_families == g.attack_families == ["pgd-linf", "cw-l2"]  # FAMILIES order


def test_a_0_5_file_keeps_its_five_self_attack_families(fitted, digits_model, digits, tmp_path):
    """0.5 saved the resolved family list (five names, boundary-l2 among them) and no setting: the file loads with
    its five heads, says which families they were fitted on, and a refit generates those five again."""
    from hfguard import combiner, io

    five = ["fgsm-linf", "pgd-linf", "pgd-l2", "boundary-linf", "boundary-l2"]
    p = tmp_path / "g.safetensors"
    fitted.save(str(p))
    header, tensors = io.read_guard_file(str(p))
    spec = {**header["spec"], "heads": 5}
    keep = [i for i, f in enumerate(spec["score_features"]) if "~knn" not in f]  # 0.5 had probes but no banks
    spec["score_features"] = [spec["score_features"][i] for i in keep]
    for key in ("neighboured", "bank_per_class", "bank_neighbours"):
        spec.pop(key)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("banks.")}
    for k in ("evidence_mean", "evidence_std"):
        tensors[k] = tensors[k][:, keep].clone()
    tensors = {**tensors, "head_weight": tensors["head_weight"][:5, keep].clone(), "head_bias": tensors["head_bias"][:5].clone()}
    header = {k: v for k, v in header.items() if k != "neighbour_bank"}
    write_old_file(tmp_path / "v05.safetensors", {**header, "spec": spec, "attack_families": five}, tensors, 5)
    g = hfguard.load(str(tmp_path / "v05.safetensors"), digits_model)
    assert g.attack_families == five and len(g.banks) == 0 and len(g.probes) > 0
    x = digits.x_test[:40]
    expected = combiner.head_score(_standardised(fitted, x)[:, keep], fitted.head_weight[:5, keep], fitted.head_bias[:5])
    assert torch.allclose(g.score(x), expected, atol=1e-5)
    g.fit((digits.x_train, digits.y_train))
    assert list(g.fit_report["heads"]) == five and g.head_weight.shape[0] == 5
    assert len(g.banks) == 0  # fitted again as it was: without banks


def test_load_keeps_each_submodule_mode(saved, digits_model):
    """Defect: load() ran model.eval() then model.train(was_training) on the whole tree, unfreezing a submodule
    the user had put in eval mode inside a model in training mode."""
    digits_model.train()
    digits_model[0].eval()
    modes = [m.training for m in digits_model.modules()]
    try:
        hfguard.load(str(saved), digits_model)
        assert [m.training for m in digits_model.modules()] == modes
    finally:
        digits_model.eval()


def test_a_model_with_other_weights_is_refused(saved, digits_model, digits):
    """Defect: a model of the same architecture with other weights loaded silently (and flagged every image)."""
    torch.manual_seed(5)
    other = small_cnn(1, 10, 8).eval()
    with pytest.raises(hfguard.ModelMismatchError, match="other weights"):
        hfguard.load(str(saved), other)
    hfguard.load(str(saved), other, verify_model=False)  # the user's call, on purpose
    import copy

    half = copy.deepcopy(digits_model).to(torch.bfloat16)  # the same model in another precision passes
    assert hfguard.load(str(saved), half).score(digits.x_test[:4].to(torch.bfloat16)).shape == (4,)


def test_load_names_an_unknown_override(saved, digits_model):
    with pytest.raises(hfguard.SettingsError, match="unknown setting.*polcy"):
        hfguard.load(str(saved), digits_model, polcy="filter")


def test_save_into_a_missing_directory_says_so(fitted, tmp_path):
    with pytest.raises(hfguard.StateFileError, match="does not exist"):
        fitted.save(str(tmp_path / "no-such-dir" / "g.safetensors"))


def test_the_weights_check_uses_the_fit_pixel_range_and_skips_random_models(saved, digits_model, digits, tmp_path):
    """Review of 0.6.2: an input_range override at load changed the probe images (the same model was refused); a
    model that is random in eval mode (input noise) was refused at random."""
    for rng in (None, (0.0, 255.0), (-1.0, 1.0)):
        hfguard.load(str(saved), digits_model, input_range=rng)

    class Noisy(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x + 0.05 * torch.randn_like(x))

    noisy = Noisy(digits_model).eval()
    g = hfguard.protect(noisy, progress=False, calibration="clean").fit((digits.x_train, digits.y_train))
    assert g._model_fingerprint is None
    g.save(str(tmp_path / "noisy.safetensors"))
    for _ in range(3):
        hfguard.load(str(tmp_path / "noisy.safetensors"), noisy)


def test_a_loaded_guard_reports_what_its_file_tells(saved, fitted, digits_model):
    """Review: fit_report was empty after load, so fit_report["feature_names"] (to choose score_features) failed."""
    rep = hfguard.load(str(saved), digits_model).fit_report
    assert rep["feature_names"] == fitted.fit_report["feature_names"]
    assert rep["score_features"] == fitted.fit_report["score_features"]
    assert rep["threshold"] == pytest.approx(fitted.threshold)
    json.dumps(rep)


def test_a_loaded_guard_keeps_every_fit_setting_and_refits_as_the_saved_one(digits_model, digits, tmp_path):
    """Review: calibration_size, seed, max_filter_flip, attack_size and filter_sigma='auto' came back as defaults (and
    as the fitted number), so a loaded guard fitted again gave another threshold; load(filter_sigma='auto') failed."""
    opts = dict(calibration_size=150, seed=7, max_filter_flip=0.2, attack_size=200, filter_sigma="auto", progress=False)
    data = (digits.x_train, digits.y_train)
    g = hfguard.protect(digits_model, **opts).fit(data)
    path = str(tmp_path / "g.safetensors")
    g.save(path)
    back = hfguard.load(path, digits_model, progress=False)
    for name in ("calibration_size", "seed", "max_filter_flip", "attack_size", "filter_sigma_setting", "layers_setting"):
        assert getattr(back, name) == getattr(g, name), name
    assert float(back.sigma_) == float(g.sigma_)
    again, ref = back.fit(data), hfguard.protect(digits_model, **opts).fit(data)
    assert again.threshold == ref.threshold and float(again.sigma_) == float(ref.sigma_)
    auto = hfguard.load(path, digits_model, filter_sigma="auto", progress=False)
    assert auto.filter_sigma_setting == "auto" and float(auto.sigma_) == float(g.sigma_)
    assert float(hfguard.load(path, digits_model, filter_sigma=0.7, progress=False).sigma_) == pytest.approx(0.7)
    # a key that a later 0.7.x may add to fit_settings is skipped, not passed on to Guard() (a bare TypeError)
    from hfguard.io import read_guard_file

    header, tensors = read_guard_file(path)
    header["fit_settings"]["some_later_setting"] = 3
    write_old_file(tmp_path / "later.safetensors", header, tensors, header["format_version"])
    assert hfguard.load(str(tmp_path / "later.safetensors"), digits_model, progress=False).seed == 7
