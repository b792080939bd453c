import json
import subprocess
import sys

import pytest

from hfguard.cli import main, run_demo


def test_demo_end_to_end_on_digits(tmp_path, monkeypatch):
    monkeypatch.setenv("HFGUARD_CACHE", str(tmp_path / "cache"))
    res = run_demo("digits", str(tmp_path / "out"), n_test=120, progress=False, cw_steps=20, pgd_steps=10)
    assert (tmp_path / "out" / "roc-digits.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "out" / "demo-digits.json").read_text())
    assert 0.85 < saved["clean_accuracy"] <= 1.0
    for name, r in saved["attacks"].items():
        assert 0.0 <= r["success_rate"] <= 1.0
        if r["n_successful"] >= 10:
            assert 0.5 < r["auroc"] <= 1.0, name
    assert "| attack |" in res["table"]


def test_cli_reports_missing_fashion_mnist(tmp_path, monkeypatch, capsys):
    from hfguard import data

    monkeypatch.setattr(data, "FASHION_DIRS", (str(tmp_path / "none"),))
    monkeypatch.delenv("HFGUARD_FASHION_MNIST", raising=False)
    assert main(["demo", "--dataset", "fashion-mnist", "--out", str(tmp_path)]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "hfguard", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout


def test_demo_refuses_a_test_count_it_cannot_honour(tmp_path, monkeypatch, capsys):
    """Review: --n-test 0 attacked all 539 images and --n-test -530 attacked 9 (a slice from the end)."""
    monkeypatch.setenv("HFGUARD_CACHE", str(tmp_path / "cache"))
    for n in ("0", "-530", "100000"):
        assert main(["demo", "--out", str(tmp_path / "d"), "--n-test", n, "--quiet"]) == 2
        assert f"n_test must be between 1 and the 539 test images of digits, got {n}" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # refused before any training


def test_bench_passes_the_checker_init_to_the_settings(tmp_path, monkeypatch):
    from hfguard.bench import run as R
    from hfguard.errors import DatasetNotAvailableError

    seen = {}

    def fake_run_bench(dataset, out, *, archs, cfg, progress, command, tag):
        seen["cfg"], seen["command"] = cfg, command
        raise DatasetNotAvailableError("stop here")  # the settings are all this test reads

    monkeypatch.setattr(R, "run_bench", fake_run_bench)
    args = ["bench", "--dataset", "fashion-mnist", "--arch", "resnet", "--checker", "--checker-init", "scratch", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 2
    assert seen["cfg"].checker and seen["cfg"].checker_init == "scratch" and "--checker-init scratch" in seen["command"]
    assert main(args[:-5] + ["--quiet", "--out", str(tmp_path)]) == 2
    assert seen["cfg"].checker_init == "model"  # the default
    with pytest.raises(SystemExit):
        main(["bench", "--checker-init", "imagenet"])
