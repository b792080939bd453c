import threading
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

import hfguard
from hfguard.attacks import pgd
from hfguard.data import small_cnn

from .conftest import Normalized, assert_equivalent_guards, assert_same_state, model_state


def test_fit_returns_self(digits_model, digits):
    g = hfguard.protect(digits_model, progress=False)
    assert g.fit((digits.x_train, digits.y_train)) is g
    assert g.fitted and isinstance(g, nn.Module)


@pytest.mark.parametrize("call", ["score", "detect", "check", "inspect", "forward", "save"])
def test_unfitted_guard_raises_not_fitted(digits_model, digits, call, tmp_path):
    g = hfguard.protect(digits_model, progress=False)
    with pytest.raises(hfguard.NotFittedError) as info:
        if call == "save":
            g.save(str(tmp_path / "g.safetensors"))
        elif call == "forward":
            g(digits.x_test[:2])
        else:
            getattr(g, call)(digits.x_test[:2])
    assert isinstance(info.value, ValueError)
    assert "fit" in str(info.value)


def test_score_shape_dtype_and_detect_consistency(fitted, digits):
    x = digits.x_test[:17]
    s = fitted.score(x)
    assert s.shape == (17,) and s.dtype == torch.float32
    assert torch.equal(fitted.detect(x), s.detach() > fitted.threshold)


def test_score_is_differentiable(fitted, digits):
    x = digits.x_test[:8].clone().requires_grad_(True)
    fitted.score(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_score_gradcheck_float64(digits_model, digits):
    m64 = small_cnn(1, 10, 8).double()
    m64.load_state_dict({k: v.double() for k, v in digits_model.state_dict().items()})
    g = hfguard.protect(m64.eval(), progress=False).fit((digits.x_train.double(), digits.y_train)).double()
    # jitter so that no ReLU / max-pool input sits exactly on a kink (digits have many exact zeros)
    jitter = 0.05 * torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = (digits.x_test[:3].double() * 0.9 + jitter).requires_grad_(True)
    assert torch.autograd.gradcheck(g.score, (x,), eps=1e-7, atol=1e-4)


def test_check_matches_score_and_model(fitted, digits):
    x = digits.x_test[:32]
    v = fitted.check(x)
    with torch.no_grad():
        assert torch.allclose(v.logits, fitted.model(x), atol=1e-5)
        assert torch.allclose(v.score, fitted.score(x), atol=1e-5)
    assert torch.equal(v.predicted, v.logits.argmax(1))
    assert torch.equal(v.flagged, v.score > fitted.threshold)
    assert not v.filtered.any()  # flag policy never filters
    assert v.origin.shape == (32,)


def test_forward_under_flag_policy_is_the_model(fitted, digits):
    x = digits.x_test[:10]
    with torch.no_grad():
        assert torch.equal(fitted(x), fitted.model(x))


def test_clean_fpr_near_target_and_pgd_separated(fitted, digits, digits_model):
    x, y = digits.x_test, digits.y_test
    clean = fitted.check(x)
    assert 0.01 <= clean.flagged.float().mean().item() <= 0.12
    xa = pgd(digits_model, x, y, 0.15, steps=20)
    adv = fitted.check(xa)
    ok = (clean.predicted == y) & (adv.predicted != y)
    assert ok.sum() > 100
    auc = roc_auc_score(np.r_[np.zeros(len(x)), np.ones(int(ok.sum()))], np.r_[clean.score, adv.score[ok]])
    assert auc > 0.9
    assert adv.flagged[ok].float().mean() > 0.4  # chance level is the clean FPR (~0.05)


def test_filter_policy_filters_exactly_the_flagged_rows(fitted, digits, digits_model):
    g = hfguard.protect(digits_model, policy="filter", progress=False).fit((digits.x_train, digits.y_train))
    x = torch.cat([digits.x_test[:40], pgd(digits_model, digits.x_test[:40], digits.y_test[:40], 0.15, steps=10)])
    v = g.check(x)
    assert v.flagged.any() and (~v.flagged).any()
    assert torch.equal(v.filtered, v.flagged)
    with torch.no_grad():
        plain = digits_model(x)
        assert torch.allclose(v.logits[~v.flagged], plain[~v.flagged], atol=1e-5)
        assert not torch.allclose(v.logits[v.flagged], plain[v.flagged])
        assert torch.allclose(g(x), v.logits, atol=1e-5)


def test_filter_policy_forward_is_differentiable(digits_model, digits):
    g = hfguard.protect(digits_model, policy="filter", progress=False, filter_sigma=0.8).fit((digits.x_train, digits.y_train))
    x = pgd(digits_model, digits.x_test[:20], digits.y_test[:20], 0.2, steps=10).requires_grad_(True)
    g(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_labels_are_optional(digits_model, digits):
    g = hfguard.protect(digits_model, progress=False).fit(digits.x_train)
    assert g.check(digits.x_test[:5]).score.shape == (5,)


def test_dataloader_dicts_and_lists(digits_model, digits):
    ds = torch.utils.data.TensorDataset(digits.x_train, digits.y_train)
    loader = torch.utils.data.DataLoader(ds, batch_size=100, shuffle=False)
    g1 = hfguard.protect(digits_model, progress=False).fit(loader)
    dicts = [{"image": x, "label": y} for x, y in loader]
    g2 = hfguard.protect(digits_model, progress=False).fit(dicts)
    x = digits.x_test[:20]
    assert torch.allclose(g1.score(x), g2.score(x))


def test_dataloader_over_an_iterable_dataset_fits_like_the_tensors(digits_model, digits):
    """Review: a DataLoader over an IterableDataset (streaming data) has ``__len__`` but raises TypeError from it;
    ``fit`` asked it for a progress total (even with the bar off) and crashed."""

    class Stream(torch.utils.data.IterableDataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __iter__(self):
            yield from zip(self.x, self.y)

    n = len(digits.x_train) - 300
    xt, yt, xc, yc = digits.x_train[:n], digits.y_train[:n], digits.x_train[n:], digits.y_train[n:]
    for progress in (False, True):
        g = hfguard.protect(digits_model, calibration="clean", progress=progress, batch_size=64)
        g.fit(torch.utils.data.DataLoader(Stream(xt, yt), batch_size=64), calibration_data=torch.utils.data.DataLoader(Stream(xc, yc), batch_size=64))
        ref = hfguard.protect(digits_model, calibration="clean", progress=False, batch_size=64).fit((xt, yt), calibration_data=(xc, yc))
        assert g.threshold == ref.threshold
        assert torch.equal(g.score(digits.x_test[:10]), ref.score(digits.x_test[:10]))


def test_fit_is_deterministic_and_refit_replaces(digits_model, digits):
    a = hfguard.protect(digits_model, progress=False).fit((digits.x_train, digits.y_train))
    b = hfguard.protect(digits_model, progress=False).fit((digits.x_train, digits.y_train))
    for (k, v), (k2, v2) in zip(a.guard_state().items(), b.guard_state().items()):
        assert k == k2 and torch.equal(v, v2)
    before = a.threshold
    a.fit((digits.x_train[:600], digits.y_train[:600]))
    assert a.fit_report["samples_in_statistics"] + a.fit_report["samples_held_out"] == 600
    assert a.threshold != before


def test_model_unchanged_after_every_public_call(digits_model, digits, tmp_path):
    digits_model.train()  # also checks that train mode is restored
    before = model_state(digits_model)
    with pytest.warns(UserWarning, match="training mode"):
        g = hfguard.protect(digits_model, policy="filter", progress=False).fit((digits.x_train, digits.y_train))
    x = digits.x_test[:16]
    g.check(x)
    g.score(x).sum().backward()
    g.detect(x)
    g.inspect(x)
    g.inspect(x, differentiable=True)
    g.logits_and_score(x)
    g(x)
    g.save(str(tmp_path / "g.safetensors"))
    hfguard.load(str(tmp_path / "g.safetensors"), digits_model).check(x)
    for p in digits_model.parameters():
        p.grad = None
    before["grads"] = [None for _ in before["grads"]]
    assert_same_state(before, model_state(digits_model))
    digits_model.eval()


def test_model_unchanged_when_forward_raises(digits, fitted):
    class Exploding(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.explode = False

        def forward(self, x):
            out = self.inner(x)
            if self.explode:
                raise RuntimeError("boom")
            return out

    inner = small_cnn(1, 10, 8)
    model = Exploding(inner).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = hfguard.protect(model, progress=False, calibration="clean").fit((digits.x_train, digits.y_train))  # untrained
    before = model_state(model)
    model.explode = True
    for call in (g.check, g.score, g.inspect):
        with pytest.raises(RuntimeError, match="boom"):
            call(digits.x_test[:4])
    with pytest.raises(RuntimeError, match="boom"):
        hfguard.protect(model, progress=False).fit((digits.x_train, digits.y_train))
    assert_same_state(before, model_state(model))


def test_inspect_reports_a_trajectory(fitted, digits):
    r = fitted.inspect(digits.x_test[:6])
    s = len(r.sources)
    assert r.sources[-2:] == ["logits", "spectrum"]
    assert r.distances.shape == (6, s, 10) and r.affinity.shape == (6, s, 10)
    assert torch.allclose(r.affinity.sum(2), torch.ones(6, s))
    path = r.trajectory(0)  # origin -> watched layers -> logits (the spectrum is not a forward step)
    assert [name for name, _ in path] == r.sources[:-1] and path[-1] == ("logits", int(r.nearest[0, -2]))
    # on clean, correctly classified digits the logits' nearest class is the prediction
    assert (r.nearest[:, -2] == r.predicted).float().mean() > 0.8


def test_threads_get_their_own_activations(fitted, digits):
    inputs = [digits.x_test[i * 8 : (i + 1) * 8] for i in range(8)]
    serial = [fitted.check(x).score for x in inputs]
    results = {}
    barrier = threading.Barrier(8)

    def work(i):
        barrier.wait()
        out = []
        for _ in range(50):
            out.append(fitted.check(inputs[i]).score)
        results[i] = out

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        for s in results[i]:
            assert torch.allclose(s, serial[i], atol=1e-5)


def test_explicit_layers_and_custom_module_with_inplace_relu(custom_net, digits):
    g = hfguard.protect(custom_net, layers=["conv1", "conv2"], progress=False, calibration="clean").fit((digits.x_train, digits.y_train))  # untrained
    assert g.layers == ["conv1", "conv2"]
    x = digits.x_test[:4].clone().requires_grad_(True)
    g.score(x).sum().backward()  # conv1's output is overwritten by an in-place ReLU
    assert torch.isfinite(x.grad).all()


def test_normalize_maps_back_to_pixels(digits_model, digits):
    mean, std = 0.3, 0.2
    model = Normalized(digits_model, mean, std).eval()
    g = hfguard.protect(model, normalize=([mean], [std]), progress=False).fit(((digits.x_train - mean) / std, digits.y_train))
    plain = hfguard.protect(digits_model, progress=False).fit((digits.x_train, digits.y_train))
    x = digits.x_test[:20]
    assert torch.allclose(g.score((x - mean) / std), plain.score(x), atol=1e-3)


def test_empty_batch_gives_empty_results(fitted):
    v = fitted.check(torch.zeros(0, 1, 8, 8))
    assert v.score.shape == (0,) and v.logits.shape == (0, 10) and v.flagged.dtype == torch.bool
    assert fitted.score(torch.zeros(0, 1, 8, 8)).shape == (0,)


@pytest.mark.parametrize(
    "x, err",
    [
        (torch.zeros(1, 8, 8), hfguard.ShapeError),
        (torch.zeros(1, 1, 1, 8, 8), hfguard.ShapeError),
        (torch.zeros(2, 3, 8, 8), hfguard.ShapeError),
        (torch.zeros(2, 1, 9, 9), hfguard.ShapeError),
        (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), hfguard.InputError),
        (torch.full((2, 1, 8, 8), float("nan")), hfguard.InputError),
        (np.zeros((2, 1, 8, 8)), hfguard.InputError),
    ],
)
def test_bad_inputs_raise_typed_errors(fitted, x, err):
    with pytest.raises(err) as info:
        fitted.check(x)
    assert isinstance(info.value, ValueError)


def test_noncontiguous_and_channels_last_inputs(fitted, digits):
    x = digits.x_test[:8]
    ref = fitted.score(x)
    assert torch.allclose(fitted.score(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-5)
    wide = torch.zeros(8, 1, 8, 16)
    wide[..., ::2] = x
    assert torch.allclose(fitted.score(wide[..., ::2]), ref, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{"policy": "block"}, {"fpr": 0.0}, {"fpr": 1.5}, {"layers": "all"}, {"layers": []}, {"filter_sigma": -1}, {"score_features": []}],
)
def test_bad_settings_raise_value_error(digits_model, kwargs):
    with pytest.raises(ValueError):
        hfguard.protect(digits_model, **kwargs)


def test_fit_data_errors(digits_model, digits):
    g = hfguard.protect(digits_model, progress=False)
    with pytest.raises(hfguard.DataError, match="no data"):
        g.fit([])
    with pytest.raises(hfguard.DataError, match=r"labels must be in \[0, 9\]"):
        g.fit((digits.x_train, digits.y_train + 5))
    with pytest.raises(hfguard.DataError, match="shape"):
        g.fit([digits.x_train[:50], torch.zeros(50, 1, 9, 9)])
    with pytest.raises(hfguard.DataError, match="class 3 has"):
        keep = digits.y_train != 3
        x = torch.cat([digits.x_train[keep], digits.x_train[digits.y_train == 3][:1]])
        y = torch.cat([digits.y_train[keep], torch.tensor([3])])
        g.fit((x, y))
    with pytest.raises(hfguard.DataError, match="dict without an image key"):
        g.fit([{"pixels": digits.x_train[:10]}])


def test_model_returning_dict_is_a_model_error(digits):
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4 * 36, 10)

        def forward(self, x):
            return {"logits": self.fc(torch.relu(self.c(x)).flatten(1))}

    with pytest.raises(hfguard.ModelError, match="logits"):
        hfguard.protect(DictModel(), progress=False).fit(digits.x_train[:100])


def test_probability_outputs_warn(digits_model, digits):
    model = nn.Sequential(digits_model, nn.Softmax(dim=1)).eval()
    with pytest.warns(UserWarning, match="probabilities"):
        hfguard.protect(model, progress=False).fit((digits.x_train, digits.y_train))


def test_resnet18_end_to_end():
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    x = torch.rand(96, 3, 32, 32)
    g = hfguard.protect(m, progress=False, calibration_size=40, calibration="clean").fit((x, torch.arange(96) % 4))  # random weights: nothing to learn from attacks
    assert g.layers == ["relu", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert g.check(x[:5]).score.shape == (5,)


def test_shuffled_data_gives_the_same_guard(digits_model, digits):
    perm = torch.randperm(len(digits.x_train), generator=torch.Generator().manual_seed(3))
    a = hfguard.protect(digits_model, progress=False).fit((digits.x_train, digits.y_train))
    b = hfguard.protect(digits_model, progress=False).fit((digits.x_train[perm], digits.y_train[perm]))
    assert_equivalent_guards(a, b, digits.x_test[:50], atol=1e-4)


def test_out_of_range_pixels_warn_and_strict_raises(digits_model, digits, fitted):
    x = digits.x_test[:4] * 3.0
    with pytest.warns(UserWarning, match=r"pixel values should lie in \[0.0, 1.0\].*normalize"):
        fitted.check(x)
    strict = hfguard.protect(digits_model, progress=False, strict=True).fit((digits.x_train, digits.y_train))
    with pytest.raises(hfguard.InputError, match="got values from"):
        strict.check(x)
    assert strict.check(digits.x_test[:4]).score.shape == (4,)


def test_nonfinite_rows_can_be_flagged(digits_model, digits):
    g = hfguard.protect(digits_model, progress=False, nonfinite="flag").fit((digits.x_train, digits.y_train))
    x = digits.x_test[:6].clone()
    x[2, 0, 3, 3] = float("nan")
    x[4, 0, 0, 0] = float("inf")
    v = g.check(x)
    assert v.flagged[2] and v.flagged[4] and torch.isinf(v.score[[2, 4]]).all()
    assert torch.equal(g.detect(x), v.flagged)
    clean_rows = [0, 1, 3, 5]
    assert torch.allclose(v.score[clean_rows], g.check(digits.x_test[:6][clean_rows]).score, atol=1e-4)
    with pytest.raises(hfguard.InputError):
        g(x)
    with pytest.raises(hfguard.DataError, match="NaN or Inf"):
        g.fit(x)
    # defect: under the default nonfinite="raise", fit raised an InputError telling the user to pass nonfinite="flag"
    with pytest.raises(hfguard.DataError, match="NaN or Inf"):
        hfguard.protect(digits_model, progress=False, calibration="clean").fit(x)
    with pytest.raises(hfguard.DataError, match="NaN or Inf"):
        hfguard.protect(digits_model, progress=False, calibration="clean").fit((digits.x_train, digits.y_train), calibration_data=x)


def test_two_unlabelled_batches_and_numpy_arrays_are_read_as_data(digits_model, digits):
    """Defect: a list of exactly two image batches was read as an (x, y) pair; NumPy arrays were refused."""
    ref = hfguard.protect(digits_model, progress=False, calibration="clean").fit(digits.x_train)
    n = len(digits.x_train) // 2
    two = hfguard.protect(digits_model, progress=False, calibration="clean").fit([digits.x_train[:n], digits.x_train[n:]])
    x = digits.x_test[:8]
    assert torch.allclose(two.score(x), ref.score(x), atol=1e-4)
    labelled = hfguard.protect(digits_model, progress=False, calibration="clean").fit((digits.x_train, digits.y_train))
    arrays = hfguard.protect(digits_model, progress=False, calibration="clean").fit((digits.x_train.numpy(), digits.y_train.numpy()))
    assert torch.allclose(arrays.score(x), labelled.score(x), atol=1e-4)
    with pytest.raises(hfguard.DataError, match="integer class indices"):
        hfguard.protect(digits_model, progress=False, calibration="clean").fit((digits.x_train[:4], ["a", "b", "c", "d"]))
    with pytest.raises(hfguard.DataError, match="integer class indices"):
        hfguard.protect(digits_model, progress=False, calibration="clean").fit((digits.x_train[:4].numpy(), np.array(list("abcd"))))
    # a reversed view, another byte order, a read-only array: copied, same data
    odd = digits.x_train.numpy()[:, :, ::-1, :].astype(">f4")
    odd.flags.writeable = False
    flipped = hfguard.protect(digits_model, progress=False, calibration="clean").fit((odd, digits.y_train.numpy()))
    assert flipped.fitted


def test_float64_input_is_cast_with_a_warning(fitted, digits):
    x = digits.x_test[:5]
    with pytest.warns(UserWarning, match="casts it to torch.float32"):
        s64 = fitted.score(x.double())
    assert torch.allclose(s64, fitted.score(x))


def test_logits_and_score_is_one_differentiable_pass(fitted, digits):
    x = digits.x_test[:20].clone().requires_grad_(True)
    logits, score = fitted.logits_and_score(x)
    with torch.no_grad():
        assert torch.allclose(score, fitted.score(x), rtol=1e-5, atol=1e-5)  # float32: reshape-mean vs avg_pool2d
        assert torch.allclose(logits, fitted.model(x), atol=1e-6)
    assert torch.autograd.grad(score.sum(), x)[0].abs().sum() > 0


def test_inspect_differentiable_keeps_the_graph_and_the_values(fitted, digits):
    x = digits.x_test[:10].clone().requires_grad_(True)
    plain, diff = fitted.inspect(x), fitted.inspect(x, differentiable=True)
    assert not plain.distances.requires_grad and diff.distances.requires_grad
    assert torch.allclose(plain.distances, diff.distances.detach(), atol=1e-6)
    assert torch.autograd.grad(diff.distances[:, 0, 3].sum(), x)[0].abs().sum() > 0


def test_score_features_as_a_list_fits_and_scores(digits_model, digits):
    """Regression: a custom list once clobbered the recorded input shape, so fit failed on its second batch."""
    names = ["1:distance", "8:distance", "margin"]
    g = hfguard.protect(digits_model, progress=False, score_features=names, batch_size=256).fit((digits.x_train, digits.y_train))
    assert g.fit_report["score_features"] == names
    assert g.score(digits.x_test[:5]).shape == (5,)
    with pytest.raises(ValueError, match="unknown evidence feature"):
        hfguard.protect(digits_model, progress=False, score_features=["nope:distance"]).fit((digits.x_train, digits.y_train))


@pytest.mark.parametrize("size", [(28, 28), (64, 96)])  # a whole-image DCT; 32-px tiles on a non-square image
@pytest.mark.parametrize("normalize", [((0.5,), (0.25,)), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_spectral_features_of_normalised_inputs_equal_those_of_the_pixels(size, normalize):
    """The guard skips un-normalising the batch (channel powers weighted by std**2 instead): same features as
    the pixels' own, under inference_mode too, and the caller's batch is left as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)).eval()
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in normalize)
    x = (torch.rand(90, 3, *size) - mean) / std
    g = hfguard.protect(model, normalize=normalize, calibration="clean", progress=False, calibration_size=40).fit((x, torch.arange(90) % 3))
    assert g._hf_without_dc
    want = hfguard.spectrum.hf_features(g.to_pixels(x[:8]), g.dct_h, g.dct_w, g.pool_h, g.pool_w, g.hf_index)
    kept = x.clone()
    assert torch.allclose(g._spectral(x[:8]), want, atol=1e-4)
    with torch.inference_mode():
        assert torch.allclose(g._spectral(x[:8]), want, atol=1e-4)
    assert torch.equal(x, kept)


def test_models_the_guard_cannot_use_get_typed_errors(digits_model, digits):
    """Review: a model without input gradients failed the self-attacks with a raw RuntimeError; a TorchScript model
    with a raw RuntimeError from register_forward_hook; a layer named twice was reported as "runs 2 times"."""

    class Frozen(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with torch.no_grad():
                return self.inner(x)

    with pytest.raises(hfguard.ModelError, match="calibration='clean'"):
        hfguard.protect(Frozen(digits_model), progress=False).fit((digits.x_train, digits.y_train))
    assert hfguard.protect(Frozen(digits_model), progress=False, calibration="clean").fit((digits.x_train, digits.y_train)).fitted
    with pytest.raises(hfguard.ModelError, match="TorchScript"):
        hfguard.protect(torch.jit.script(digits_model))
    with pytest.raises(hfguard.SettingsError, match="more than once"):
        hfguard.protect(digits_model, layers=["1", "1"])


def test_explicit_layers_that_cannot_be_watched_say_why(digits_model, digits):
    """Review: a layer returning a tuple was reported as "did not run"; the root ('') and the logits layer were
    accepted silently (the logits watched twice)."""

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y, y

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pair, self.fc = Pair(), torch.nn.Linear(256, 10)

        def forward(self, x):
            return self.fc(self.pair(x)[0].flatten(1))

    data = (digits.x_train, digits.y_train)
    with pytest.raises(hfguard.ModelError, match="returns a tuple"):
        hfguard.protect(Net().eval(), layers=["pair"], progress=False, calibration="clean").fit(data)
    with pytest.raises(hfguard.ModelError, match="the model itself"):
        hfguard.protect(digits_model, layers=[""], progress=False, calibration="clean").fit(data)
    with pytest.warns(UserWarning, match="outputs the logits"):
        hfguard.protect(digits_model, layers=["1", "9"], progress=False, calibration="clean").fit(data)


def test_out_of_memory_in_the_self_attacks_is_not_relabelled(digits_model, digits, monkeypatch):
    """Review: every RuntimeError of the self-attacks became a ModelError advising calibration='clean'."""
    import hfguard.fitting as fitting

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(fitting, "self_attacks", oom)
    with pytest.raises(torch.OutOfMemoryError):
        hfguard.protect(digits_model, progress=False).fit((digits.x_train, digits.y_train))


def test_threshold_before_fit_is_a_not_fitted_error(digits_model):
    """Review: nn.Module.__getattr__ replaced the property's NotFittedError by a generic AttributeError."""
    g = hfguard.protect(digits_model, progress=False)
    with pytest.raises(hfguard.NotFittedError, match="not fitted"):
        g.threshold
    with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
        g.no_such_thing
    with pytest.raises(hfguard.NotFittedError):  # the deprecated name too (its warning comes after the check)
        g.threshold_


def test_a_dataset_dict_fits_and_samples_instead_of_batches_get_a_clear_error(digits_model, digits):
    """Review: the whole dataset as a dict was read as batches of its keys ('batch 0 has type str'), and a list of
    (image, label) samples got 'labels should be a 1-d tensor of 1 entries' (the 1 was the channel count)."""
    x, y = digits.x_train, digits.y_train
    ref = hfguard.protect(digits_model, progress=False, calibration="clean").fit((x, y))
    for data in ({"pixel_values": x, "label": y}, {"image": x.numpy(), "labels": y.numpy()}):
        g = hfguard.protect(digits_model, progress=False, calibration="clean").fit(data)
        assert g.threshold == ref.threshold
    unlabelled = hfguard.protect(digits_model, progress=False, calibration="clean").fit({"pixel_values": x})
    assert unlabelled.fit_report.get("held_out_fit_accuracy") is None
    with pytest.raises(hfguard.DataError, match=r"batch 0 is one image of shape \(1, 8, 8\) and its label: fit expects batches"):
        hfguard.protect(digits_model, progress=False).fit([(x[i], int(y[i])) for i in range(50)])
    with pytest.raises(hfguard.DataError, match="one image of shape"):
        hfguard.protect(digits_model, progress=False).fit([x[i] for i in range(50)])
    for gray in (x[:, 0], {"pixel_values": x[:, 0], "label": y}):  # grayscale without a channel axis: the shape error, not "samples"
        with pytest.raises(hfguard.ShapeError, match="4-d batch"):
            hfguard.protect(digits_model, progress=False).fit(gray)
