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
