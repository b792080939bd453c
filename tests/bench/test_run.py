"""The bench pipeline end to end on digits with tiny settings (seconds), so it cannot silently rot."""

from __future__ import annotations

import json

import pytest
import torch

from hfguard.bench import preset
from hfguard.bench.adaptive import JOINT, trajectory_attack
from hfguard.bench.peers import HFGuardDetector
from hfguard.cli import main


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("HFGUARD_CACHE", str(cache))
    try:
        assert main(["bench", "--dataset", "digits", "--tiny", "--quiet", "--out", str(out)]) == 0
    finally:
        mp.undo()
    return out


def test_writes_json_markdown_and_plots(bench_out):
    for name in ("digits.json", "digits.md", "digits-cnn-roc.png", "digits-cnn-hist.png", "digits-cnn-scores.npz"):
        assert (bench_out / name).stat().st_size > 1000, name
    assert json.loads((bench_out / "digits.json").read_text())["complete"] is True and "Partial" not in (bench_out / "digits.md").read_text()


def test_replot_redraws_from_the_saved_scores(bench_out):
    png = bench_out / "digits-cnn-roc.png"
    png.unlink()
    assert main(["bench", "--dataset", "digits", "--replot", "--out", str(bench_out)]) == 0
    assert png.stat().st_size > 1000


def test_every_detector_is_scored_on_every_attack(bench_out):
    res = json.loads((bench_out / "digits.json").read_text())
    run = res["runs"]["cnn"]
    assert res["config"]["n_test"] == preset("digits", tiny=True).n_test
    expected = {"hfguard", "max-softmax", "energy", "Mahalanobis", "MultiMahalanobis", "SpectralDefense (trained on FGSM)"}
    assert expected <= set(run["detectors"]) and any(d.startswith("feature squeezing") for d in run["detectors"])
    sources = {a["source"] for a in run["attacks"].values()}
    assert sources == {"hfguard", "torchattacks"}
    assert any("Square" in a for a in run["attacks"]) and any("APGD" in a for a in run["attacks"])
    for name, d in run["detectors"].items():
        assert set(d["attacks"]) == set(run["attacks"])
        assert d["latency"]["ratio"] > 0 and d["fit_s"] >= 0
        assert 0 <= d["clean_fpr"] <= 1
        assert d["twin_gap"] < 1e-3, name
        for a, m in d["attacks"].items():
            assert m["n_successful"] == run["attacks"][a]["n_successful"]
            if m["n_successful"]:
                assert 0 <= m["auroc"] <= 1 and 0 <= m["auroc_ci95"][0] <= m["auroc_ci95"][1] <= 1
                # a successful adversarial is misclassified by the model, and hfguard filters only what it flags,
                # so "caught or correct" can only add the flagged ones: it equals the TPR; the repaired share is a part of it
                assert abs(m["tpr"] - m["caught_or_correct"]) < 1e-9
                assert m.get("repaired", 0.0) <= m["tpr"] + 1e-9
    strong = [a for a, v in run["attacks"].items() if v["n_successful"] >= 10]
    assert strong, "the tiny attacks should succeed on some images"


def test_crosscheck_and_adaptive_sections(bench_out):
    run = json.loads((bench_out / "digits.json").read_text())["runs"]["cnn"]
    assert len(run["crosscheck"]) == 5 and all(0 <= r["own_success"] <= 1 for r in run["crosscheck"])
    ad = run["adaptive"]["detectors"]
    assert set(ad) == {"hfguard", run["strongest_baseline"]}
    eps = next(iter(ad["hfguard"]))
    assert {"pipeline PGD", "pipeline PGD (BPDA through the filter)", "orthogonal PGD", "feature trajectory", "selective PGD (CE)",
            "orthogonal PGD (margin, kappa 5)", "selective PGD (margin, kappa 5)", "CE - lambda_i * score (lambda per image)"} <= set(ad["hfguard"][eps])
    best = ad["hfguard"][eps]["best of all (per image)"]["evasion_rate"]
    assert best >= max(r["evasion_rate"] for k, r in ad["hfguard"][eps].items() if k != "best of all (per image)") - 1e-9
    assert any(k.startswith("CE - ") for k in ad["hfguard"][eps])
    query = next(r for k, r in ad["hfguard"][eps].items() if k.startswith("query attack (gradient-free"))
    assert 0 <= query["evaded_only_without_gradients"] <= query["evasion_rate"]
    for r in ad["hfguard"][eps].values():
        assert 0 <= r["evasion_rate"] <= r["misclassified_rate"] <= 1


def test_markdown_has_every_table(bench_out):
    md = (bench_out / "digits.md").read_text()
    for heading in ("AUROC [95 % CI]", "TPR at the calibrated threshold", "Caught or correct", "### Cost", "torchattacks", "Adaptive attacks",
                    "What hfguard learned", "Generalisation"):
        assert heading in md
    # the learned heads are summarised per source; never-generated families are marked
    assert "| pgd-linf |" in md and "| cw-l2 |" in md and "| square-linf |" in md and "never generated" in md


def test_hfguard_ablations_and_shared_calibration_split(bench_out):
    res = json.loads((bench_out / "digits.json").read_text())
    run = res["runs"]["cnn"]
    assert {"hfguard clean-only", "hfguard w/o L2 self-attacks"} <= set(run["detectors"])
    rep = run["hfguard_fit_report"]
    assert rep["calibration"] == "self-attack" and rep["threshold_samples"] == res["config"]["n_cal"]  # same split as the peers
    impl = run["detectors"]["hfguard w/o L2 self-attacks"]["implementation"]
    assert "attack_families" in impl and "pgd-l2" not in impl
    # the ablations are never attacked adaptively nor chosen as the strongest peer
    assert not run["strongest_baseline"].startswith("hfguard")


def test_trajectory_attack_pulls_layers_toward_the_target(digits_model, digits):
    det = HFGuardDetector(digits_model).fit(digits.x_train, digits.y_train)
    x, y = digits.x_test[:40], digits.y_test[:40]
    with torch.no_grad():
        logits = digits_model(x)
        target = logits.masked_fill(torch.nn.functional.one_hot(y, 10).bool(), float("-inf")).argmax(1)
    n = len(det.guard.layers) + 1
    rows = torch.arange(len(x))

    def target_distance(images):
        return det.guard.inspect(images).distances[:, :n][rows, :, target].sum(1)

    xa = trajectory_attack(det.guard, x, y, 0.15, steps=10)
    assert (xa - x).abs().max() <= 0.15 + 1e-6
    assert target_distance(xa).mean() < 0.7 * target_distance(x).mean()


def test_query_attack_searches_without_gradients_within_the_budget(digits_model, digits):
    """Against a detector that never flags, the gradient-free search must find misclassifications on its own,
    inside the L-inf ball and the pixel box; a detector whose score blocks everything leaves no evasion."""
    from hfguard.bench.adaptive import evasion, query_attack
    from hfguard.bench.peers import Detector

    class Constant(Detector):
        name = "constant"

        def __init__(self, model, value):
            super().__init__(model)
            self.value, self.threshold = value, 0.5

        def score(self, x):
            return torch.full((len(x),), self.value)

        def diff_score(self, x):
            return self.score(x)

    x, y = digits.x_test[:60], digits.y_test[:60]
    with torch.no_grad():
        correct = digits_model(x).argmax(1) == y
    x, y = x[correct], y[correct]
    never = Constant(digits_model, 0.0)
    xa = query_attack(never, x, y, 0.3, queries=150, scale=1.0)
    assert float((xa - x).abs().max()) <= 0.3 + 1e-6 and float(xa.min()) >= 0 and float(xa.max()) <= 1
    with torch.no_grad():
        fooled = (digits_model(xa).argmax(1) != y).float().mean()
    assert fooled > 0.5
    always = Constant(digits_model, 1.0)
    xb = query_attack(always, x, y, 0.3, queries=20, scale=1.0)
    ev = evasion(always, xb, y, torch.ones(len(y), dtype=torch.bool))
    assert ev["evasion_rate"] == 0.0


def test_weights_digest_names_the_exact_weights(bench_out, digits_model):
    """The run records a digest of the attacked model's state, so runs on other weights are told apart."""
    import copy

    from hfguard.bench.run import weights_digest

    run = json.loads((bench_out / "digits.json").read_text())["runs"]["cnn"]
    assert len(run["weights_sha256"]) == 64 and int(run["weights_sha256"], 16) >= 0
    assert "weights sha256 " + run["weights_sha256"][:16] in (bench_out / "digits.md").read_text()
    other = copy.deepcopy(digits_model)
    assert weights_digest(other) == weights_digest(digits_model)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-6
    assert weights_digest(other) != weights_digest(digits_model)


def test_the_checker_variant_alone_is_fitted_reported_and_attacked(tmp_path, monkeypatch):
    monkeypatch.setenv("HFGUARD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["bench", "--dataset", "digits", "--tiny", "--quiet", "--checker", "--no-peers", "--tag", "chk", "--out", str(out)]) == 0
    result = json.loads((out / "digits-chk.json").read_text())
    run = result["runs"]["cnn"]
    assert set(run["detectors"]) == {"hfguard", "hfguard + robust checker"}  # no peers, no ablations
    assert list(run["adaptive"]["detectors"]) == ["hfguard + robust checker"] and run["strongest_baseline"] is None
    eps = next(iter(run["adaptive"]["detectors"]["hfguard + robust checker"].values()))
    assert JOINT in eps and 0 <= eps[JOINT]["evasion_rate"] <= eps["best of all (per image)"]["evasion_rate"]  # the checker-aware attack ran
    assert run["checker"]["loaded_from_cache"] is False and run["checker"]["training_seconds"] > 0
    assert 0 <= run["checker"]["test_agreement_with_model"] <= 1
    assert run["checker"]["eps"] == 0.075 and "at eps 0.075 " in (out / "digits-chk.md").read_text()  # half digits' largest eps, 0.15
    assert (out / "digits-chk-cnn-roc.png").exists() and "no peers in this run" in (out / "digits-chk.md").read_text()
    # the second run finds the trained checker in the cache
    assert main(["bench", "--dataset", "digits", "--tiny", "--quiet", "--checker", "--no-peers", "--tag", "chk", "--out", str(out)]) == 0
    assert json.loads((out / "digits-chk.json").read_text())["runs"]["cnn"]["checker"]["loaded_from_cache"] is True
    assert main(["bench", "--dataset", "digits", "--replot", "--tag", "chk", "--out", str(out)]) == 0


def test_a_run_stopped_after_one_architecture_keeps_its_results(tmp_path, monkeypatch):
    from hfguard.bench import run as R

    monkeypatch.setenv("HFGUARD_CACHE", str(tmp_path / "cache"))
    real_model, real_bench = R.cached_model, R.bench_model
    monkeypatch.setattr(R, "cached_model", lambda dataset, arch, **kw: real_model(dataset, "cnn", **kw))  # no resnet to train

    def bench_model(model, split, cfg, *, arch="model", progress=True):
        if arch == "resnet":
            raise KeyboardInterrupt  # the user stops the run during the second architecture
        return real_bench(model, split, cfg, arch=arch, progress=progress)

    monkeypatch.setattr(R, "bench_model", bench_model)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        R.run_bench("digits", str(out), archs=("cnn", "resnet"), cfg=preset("digits", tiny=True, peers=False), progress=False)
    result = json.loads((out / "digits.json").read_text())
    assert list(result["runs"]) == ["cnn"] and result["complete"] is False and result["seconds"] > 0
    assert "**Partial result:** the run stopped after cnn of cnn, resnet." in (out / "digits.md").read_text()
    assert (out / "digits-cnn-roc.png").exists() and (out / "digits-cnn-scores.npz").exists()
