import json
import math

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
