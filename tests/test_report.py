import json
import math

import pytest
import torch

from hfguard.cli import main


def test_report_on_digits_writes_finite_in_range_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("HFGUARD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "rep"
    assert main(["report", "--dataset", "digits", "--out", str(out), "--n", "200"]) == 0
    for f in ("report.html", "report.json", "claim1.png", "claim2.png", "claim3.png"):
        assert (out / f).stat().st_size > 500, f
    r = json.loads((out / "report.json").read_text())
    for key in ("claim1", "claim2", "claim3"):
        assert r[key]["verdict"] in ("supported", "partly supported", "not supported")
    for v in r["claim1"]["nearest_expectation_accuracy"] + r["claim3"]["success_lowpassed_perturbation"] + r["claim3"]["success_highpassed_perturbation"]:
        assert 0.0 <= v <= 1.0
    assert all(v > 0 and math.isfinite(v) for v in r["claim1"]["within_between_ratio"])
    assert all(0.0 <= v <= 1.0 for row in r["claim2"]["target_rate"] for v in row)
    assert 0.0 <= r["claim3"]["target_signature_match_rate"] <= 1.0
    assert "Verdict on this model" in (out / "report.html").read_text()
    # the claim-3 shares are shares of total DCT power, and every bin of the radial profile holds coefficients
    assert 0.0 < r["claim3"]["hf_power_share_clean"] < r["claim3"]["hf_power_share_perturbation"] < 1.0
    assert min(r["claim3"]["radial_power_clean"]) > 0


def test_report_refuses_a_sample_too_small_or_too_large(tmp_path, monkeypatch, capsys):
    """Review: --n 3 gave verdicts from 3 images; --n 100000 claimed 100000 images (539 exist)."""
    monkeypatch.setenv("HFGUARD_CACHE", str(tmp_path / "cache"))
    for n in ("3", "100000", "-5"):
        assert main(["report", "--dataset", "digits", "--out", str(tmp_path / "rep"), "--n", n]) == 2
        assert "n must be between" in capsys.readouterr().err


def test_report_measures_in_pixel_space_whatever_the_normalisation(digits_model, digits, tmp_path):
    """Review: the claims attacked, clamped to [0, 1], filtered and transformed the model's (normalised) inputs, so a
    guard built with ``normalize`` got other numbers and verdicts than the same model on pixels."""
    import hfguard
    from hfguard.report import report
    from tests.conftest import Normalized

    x, y = digits.x_test[:150], digits.y_test[:150]
    plain = hfguard.protect(digits_model, calibration="clean", progress=False).fit((digits.x_train, digits.y_train))
    normed = hfguard.protect(Normalized(digits_model, 0.3, 0.4), calibration="clean", progress=False, normalize=([0.3], [0.4]))
    normed.fit(((digits.x_train - 0.3) / 0.4, digits.y_train))
    a = report(plain, x, y, str(tmp_path / "a"), eps=0.15)
    b = report(normed, (x - 0.3) / 0.4, y, str(tmp_path / "b"), eps=0.15)
    for key in ("claim1", "claim2", "claim3"):
        assert a[key]["verdict"] == b[key]["verdict"], key
    assert max(abs(u - v) for u, v in zip(a["claim1"]["nearest_expectation_accuracy"], b["claim1"]["nearest_expectation_accuracy"])) <= 0.01
    for key in ("claim2", "claim3"):  # PGD's sign steps may part on an image or two from rounding
        assert abs(a[key]["n_successful"] - b[key]["n_successful"]) <= 2 and a[key]["n_successful"] > 20
    assert abs(a["claim3"]["hf_power_share_perturbation"] - b["claim3"]["hf_power_share_perturbation"]) < 0.01


def test_report_runs_the_model_in_eval_mode_and_hands_it_back(digits_model, digits, tmp_path):
    """Review: the claims called a model in training mode as such: its BatchNorm statistics moved."""
    import hfguard
    from hfguard.report import report

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(1), digits_model).eval()
    guard = hfguard.protect(model, calibration="clean", progress=False).fit((digits.x_train, digits.y_train))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="training mode"):
        report(guard, digits.x_test[:80], digits.y_test[:80], str(tmp_path / "r"), eps=0.15)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.training and model[0].training
    digits_model.eval()
