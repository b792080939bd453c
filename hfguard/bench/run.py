"""``hfguard bench``: hfguard side by side with real peer detectors, in one run.

For each architecture: load (or train and cache) the model, fit every detector
on the same clean training images, calibrate the peers' thresholds on held-out
clean training images, run the library's attacks and torchattacks on the same
test images, score every detector on the same inputs, time them, and attack
hfguard and the strongest peer adaptively. Writes ``<out>/<dataset>.json``,
``<out>/<dataset>.md`` and, per architecture, ROC and histogram plots and the raw scores
(``<dataset>-<arch>-scores.npz``, from which ``--replot`` redraws the plots).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hfguard.bench import peers as P
from hfguard.bench.adaptive import adaptive_suite
from hfguard.bench.attack_suite import own_attacks, run_attacks, success_rate, successful, torchattacks_attacks
from hfguard.bench.config import BenchConfig, preset
from hfguard.bench.metrics import attack_metrics, clean_view
from hfguard.bench.plots import histograms, roc_grid
from hfguard.bench.tables import checker_recipe, markdown
from hfguard.data import Split, cached_model, load_dataset
from hfguard.evaluate import jsonable, relative_latency
from hfguard.selfattack import DEFAULT_FAMILIES

__all__ = ["run_bench", "bench_model", "replot", "save_scores"]

logger = logging.getLogger(__name__)


def _timed(fn: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _inference_pass(model: nn.Module, x: Tensor, batch_size: int = 512) -> float:
    with torch.no_grad():
        return _timed(lambda: [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])[1]


#: hfguard ablations scored beside the default (never attacked adaptively, never "the strongest peer"):
#: the clean-only combiner, and leave-one-family-out fits that never generate PGD L2, CW or the random search
ABLATIONS = {
    "hfguard clean-only": {"calibration": "clean"},
    "hfguard w/o L2 self-attacks": {"attack_families": [f for f in DEFAULT_FAMILIES if f != "pgd-l2"]},
    "hfguard w/o CW self-attacks": {"attack_families": [f for f in DEFAULT_FAMILIES if f != "cw-l2"]},
    "hfguard w/o random-search self-attacks": {"attack_families": [f for f in DEFAULT_FAMILIES if f != "square-linf"]},
}


#: the name of hfguard fitted with the bench's robust checker (``cfg.checker``)
WITH_CHECKER = "hfguard + robust checker"


def fit_checker_variant(model: nn.Module, x_fit: Tensor, y_fit: Tensor, x_cal: Tensor, cfg: BenchConfig, progress: bool = True) -> tuple[P.HFGuardDetector, dict[str, Any]]:
    """hfguard with the bench's robust checker (:mod:`hfguard.bench.checker`), fitted like hfguard; and the checker's facts."""
    from hfguard.bench.checker import cached_checker, model_softmax

    targets = model_softmax(model, x_fit) if cfg.checker_targets == "softmax" else y_fit
    net, train_s, cached = cached_checker(cfg.dataset, x_fit, targets, eps=cfg.checker_eps, epochs=cfg.checker_epochs, steps=cfg.checker_steps,
                                          schedule=cfg.checker_schedule, init=model if cfg.checker_init == "model" else None, progress=progress)
    det = P.HFGuardDetector(model, fpr=cfg.fpr, checker=net)
    det.name = WITH_CHECKER
    info = {"training_seconds": train_s, "loaded_from_cache": cached, "epochs": cfg.checker_epochs, "steps": cfg.checker_steps, "eps": cfg.checker_eps,
            "init": cfg.checker_init, "targets": cfg.checker_targets, "schedule": cfg.checker_schedule}
    det.implementation = f"hfguard (checker: {checker_recipe(info)})"
    det.trained_on = ("clean images (+ attacks it generates on them in fit); the checker: adversarial training on the same images"
                      + (", against the model's softmax" if cfg.checker_targets == "softmax" else ""))
    det.fit(x_fit, y_fit, x_cal)
    info.update(det.guard.fit_report.get("checker", {}))
    return det, info


def fit_detectors(model: nn.Module, x_fit: Tensor, y_fit: Tensor, x_cal: Tensor, cfg: BenchConfig) -> tuple[P.HFGuardDetector, list[P.Detector], list[P.Detector], dict[str, float]]:
    """hfguard, its ablations and every peer fitted on ``(x_fit, y_fit)``; thresholds calibrated on ``x_cal``; fit seconds.
    Without ``cfg.peers``: hfguard alone (no ablations, no peers)."""
    seconds: dict[str, float] = {}
    hf = P.HFGuardDetector(model, fpr=cfg.fpr)
    seconds[hf.name] = _timed(lambda: hf.fit(x_fit, y_fit, x_cal))[1]
    ablations: list[P.Detector] = []
    if not cfg.peers:
        return hf, ablations, [], seconds
    for name, options in ABLATIONS.items():
        ab = P.HFGuardDetector(model, fpr=cfg.fpr, **options)
        ab.name = name
        seconds[name] = _timed(lambda ab=ab: ab.fit(x_fit, y_fit, x_cal))[1]
        ablations.append(ab)
    peers: list[P.Detector] = [
        P.MaxSoftmaxPeer(model),
        P.EnergyPeer(model),
        P.MahalanobisPeer(model),
        P.MultiMahalanobisPeer(model, hf.guard.layers),
        P.FeatureSqueezingPeer(model, bits=cfg.squeeze_bits, median=cfg.squeeze_median),
    ]
    for d in peers:
        seconds[d.name] = _timed(lambda d=d: d.fit(x_fit, y_fit))[1]
    spectral = P.SpectralDefensePeer(model)
    n = cfg.n_spectral

    def fit_spectral() -> None:
        x_adv = P.fgsm_training_set(model, x_fit[:n], y_fit[:n], cfg.eps_hi)
        spectral.fit(x_fit[:n], y_fit[:n], x_adv)

    seconds[spectral.name] = _timed(fit_spectral)[1]
    peers.append(spectral)
    for d in peers:
        d.calibrate(x_cal, cfg.fpr)
    return hf, ablations, peers, seconds


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the model's state (names, dtypes, shapes and bytes, in name order): two runs whose digests agree
    attacked the same weights (a model retrained on another CPU differs), so their numbers compare."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def bench_model(model: nn.Module, split: Split, cfg: BenchConfig, *, arch: str = "model", progress: bool = True) -> dict[str, Any]:
    """The whole comparison on one model; returns the result dict (tensors under private ``_`` keys)."""
    t_start = time.perf_counter()
    model.eval()
    n_train = len(split.x_train)
    if cfg.n_cal >= n_train:
        raise ValueError(f"n_cal={cfg.n_cal} must be smaller than the {n_train} training images")
    x_cal = split.x_train[n_train - cfg.n_cal :]
    fit_end = n_train - cfg.n_cal if cfg.n_fit is None else min(cfg.n_fit, n_train - cfg.n_cal)
    x_fit, y_fit = split.x_train[:fit_end], split.y_train[:fit_end]
    x, y = split.x_test[: cfg.n_test], split.y_test[: cfg.n_test]
    with torch.no_grad():
        model_pred = torch.cat([model(x[i : i + 512]).argmax(1) for i in range(0, len(x), 512)])
    correct = model_pred == y
    res: dict[str, Any] = {
        "arch": arch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_sha256": weights_digest(model),
        "clean_accuracy": float(correct.float().mean()),
        "n_fit": fit_end,
        "n_cal": cfg.n_cal,
        "n_test": len(x),
    }
    logger.info("[%s] fitting detectors on %d clean images", arch, fit_end)
    hf, ablations, peers, fit_seconds = fit_detectors(model, x_fit, y_fit, x_cal, cfg)
    variants: list[P.Detector] = []
    if cfg.checker:
        t = time.perf_counter()
        hc, res["checker"] = fit_checker_variant(model, x_fit, y_fit, x_cal, cfg, progress)
        fit_seconds[hc.name] = time.perf_counter() - t - (0.0 if res["checker"]["loaded_from_cache"] else res["checker"]["training_seconds"])
        with torch.no_grad():
            checker_pred = torch.cat([hc.guard.checker(x[i : i + 512]).argmax(1) for i in range(0, len(x), 512)])
        res["checker"].update(test_accuracy=float((checker_pred == y).float().mean()), test_agreement_with_model=float((checker_pred == model_pred).float().mean()))
        variants.append(hc)
    detectors: list[P.Detector] = [hf, *variants, *ablations, *peers]
    res["inference_pass_fit_data_s"] = _inference_pass(model, x_fit)
    res["hfguard_layers"] = hf.guard.layers
    res["hfguard_score_features"] = hf.guard.fit_report["score_features"]
    res["hfguard_fit_report"] = {k: v for k, v in hf.guard.fit_report.items() if k not in ("calibration_evidence_mean", "feature_names", "filter_flip_rates")}

    logger.info("[%s] attacking %d test images (torchattacks on %d)", arch, len(x), cfg.n_cross)
    advs = {k: {**v, "source": "hfguard"} for k, v in run_attacks(model, x, y, own_attacks(cfg), progress=progress).items()}
    n_cross = min(cfg.n_cross, len(x))
    advs.update({k: {**v, "source": "torchattacks"} for k, v in run_attacks(model, x[:n_cross], y[:n_cross], torchattacks_attacks(cfg), progress=progress).items()})
    attacks: dict[str, Any] = {}
    for name, a in advs.items():
        n = len(a["x"])
        a["ok"] = ok = successful(model, a["x"], y[:n], correct[:n])
        attacks[name] = {"source": a["source"], "n_images": n, "success_rate": success_rate(ok, correct[:n]), "n_successful": int(ok.sum()), "seconds": a["seconds"]}
    res["attacks"] = attacks
    res["crosscheck"] = crosscheck(model, x[:n_cross], y[:n_cross], correct[:n_cross], advs, cfg)

    logger.info("[%s] scoring %d detectors", arch, len(detectors))
    xb = x[: cfg.latency_batch]
    res["detectors"] = {}
    for d in detectors:
        clean = clean_view(d, x, y, correct)
        entry: dict[str, Any] = {
            "implementation": d.implementation,
            "trained_on": d.trained_on,
            "fit_s": fit_seconds[d.name],
            "threshold": d.threshold,
            **clean.summary(),
            "twin_gap": P.twin_gap(d, x[:128]),
            "latency": relative_latency(lambda: model(xb), lambda d=d: d.deployed(xb), repeats=cfg.latency_repeats),
            "_clean_scores": clean.scores,
            "attacks": {},
        }
        for name, a in advs.items():
            # AUROC always compares against the clean scores of the full test set
            entry["attacks"][name] = attack_metrics(d, clean, a["x"], a["ok"], y[: len(a["x"])], bootstrap=cfg.bootstrap)
        res["detectors"][d.name] = entry
    res["latency_batch"] = len(xb)
    res["strongest_baseline"] = strongest_baseline(res, [d.name for d in peers], exclude=(f"FGSM eps={cfg.eps_hi}",)) if peers else None
    # without peers, a run with the checker attacks only that variant (hfguard alone is the main bench's)
    targets = [hf, *variants, *(d for d in peers if d.name == res["strongest_baseline"])] if peers else (variants or [hf])
    logger.info("[%s] adaptive attacks on %d images against %s", arch, cfg.n_adaptive, ", ".join(d.name for d in targets))
    scales = {d.name: float(d.score_all(x_cal[:2000]).std()) for d in targets}
    res["adaptive"] = adaptive_suite(
        targets, hf, x[: cfg.n_adaptive], y[: cfg.n_adaptive], list(cfg.adaptive_eps),
        steps=cfg.adaptive_steps, pgd_steps=cfg.pgd_steps, lambdas=list(cfg.lambdas), scales=scales, queries=cfg.adaptive_queries, progress=progress,
    )
    res["seconds"] = time.perf_counter() - t_start
    return res


def _median_l2(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> float:
    """Median L2 perturbation of the adversarials that fool the model."""
    with torch.no_grad():
        wrong = model(x_adv).argmax(1) != y
    return float((x_adv - x).flatten(1).norm(dim=1)[wrong].median()) if bool(wrong.any()) else float("nan")


def crosscheck(model: nn.Module, x: Tensor, y: Tensor, correct: Tensor, advs: dict[str, Any], cfg: BenchConfig) -> list[dict[str, Any]]:
    """Own attacks vs torchattacks on the same images and budgets: success rates side by side."""
    pairs = [
        (f"PGD-Linf eps={cfg.eps_hi}", f"torchattacks PGD eps={cfg.eps_hi}"),
        (f"PGD-Linf eps={cfg.eps_lo}", f"torchattacks PGD eps={cfg.eps_lo}"),
        (f"PGD-Linf eps={cfg.eps_hi}", f"torchattacks APGD eps={cfg.eps_hi}"),
        (f"PGD-Linf eps={cfg.eps_hi}", f"torchattacks Square eps={cfg.eps_hi} queries={cfg.square_queries}"),
        (f"CW-L2 c=1 steps={cfg.cw_steps}", f"torchattacks CW c=1 steps={cfg.cw_steps}"),
    ]
    n = len(x)
    out = []
    for own, ta in pairs:
        own_rate, ta_rate = success_rate(advs[own]["ok"][:n], correct), success_rate(advs[ta]["ok"], correct)
        row = {"own": own, "torchattacks": ta, "n_images": n, "own_success": own_rate, "torchattacks_success": ta_rate, "difference": own_rate - ta_rate}
        if "CW" in own:
            row["own_median_l2"], row["torchattacks_median_l2"] = _median_l2(model, x, advs[own]["x"][:n], y), _median_l2(model, x, advs[ta]["x"], y)
        out.append(row)
    return out


def strongest_baseline(res: dict[str, Any], names: list[str], exclude: tuple[str, ...] = ()) -> str:
    """The peer with the highest mean AUROC over the attacks (FGSM excluded: SpectralDefense trains on it)."""

    def mean_auroc(name: str) -> float:
        vals = [m["auroc"] for a, m in res["detectors"][name]["attacks"].items() if a not in exclude and m["auroc"] == m["auroc"]]
        return sum(vals) / max(1, len(vals))

    return max(names, key=mean_auroc)


def run_bench(dataset: str = "digits", out: str = "benchmarks/results", *, archs: tuple[str, ...] | None = None, cfg: BenchConfig | None = None,
              progress: bool = True, command: str | None = None, tag: str = "") -> dict[str, Any]:
    """Runs the benchmark for every architecture of ``dataset`` and writes JSON, Markdown and plots under ``out``
    (named ``<dataset>-<tag>`` when a ``tag`` is given)."""
    cfg = cfg or preset(dataset)
    if archs:
        cfg = replace(cfg, archs=tuple(archs))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    split = load_dataset(dataset)
    result: dict[str, Any] = {
        "command": command or f"hfguard bench --dataset {dataset}",
        "dataset": dataset,
        "config": cfg.as_dict(),
        "versions": _versions(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "runs": {},
    }
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{dataset}-{tag}" if tag else dataset
    for arch in cfg.archs:
        # the model never trains on the n_cal images every detector calibrates its threshold on
        model, train_s = _timed(lambda arch=arch: cached_model(dataset, arch, progress=progress, holdout=cfg.n_cal))
        run = bench_model(model, split, cfg, arch=arch, progress=progress)
        run["model_load_or_train_s"] = train_s
        result["runs"][arch] = run
        save_scores(run, out_dir / f"{stem}-{arch}-scores.npz")
        draw(run, stem, arch, out_dir)
        # after each architecture, so that a run stopped later keeps what it measured (marked partial until the end)
        result["complete"] = len(result["runs"]) == len(cfg.archs)
        result["seconds"] = time.perf_counter() - t0
        (out_dir / f"{stem}.json").write_text(json.dumps(jsonable(result), indent=2))
        (out_dir / f"{stem}.md").write_text(markdown(result))
    return result


def draw(run: dict[str, Any], dataset: str, arch: str, out_dir: Path) -> None:
    roc_grid(run, str(out_dir / f"{dataset}-{arch}-roc.png"), f"{dataset}, {arch}: successful adversarials vs clean test images")
    histograms(run, str(out_dir / f"{dataset}-{arch}-hist.png"), f"{dataset}, {arch}: score histograms")


def save_scores(run: dict[str, Any], path: Path) -> None:
    """Every detector's raw scores (clean test images; successful adversarials per attack) as ``.npz``, to recompute any metric."""
    import numpy as np

    arrays = {}
    for det, d in run["detectors"].items():
        arrays[f"clean|{det}"] = d["_clean_scores"].double().cpu().numpy()
        for att, m in d["attacks"].items():
            arrays[f"{att}|{det}"] = m["_scores"].double().cpu().numpy()
    np.savez_compressed(path, **arrays)


def replot(dataset: str, out: str = "benchmarks/results", *, stem: str | None = None) -> None:
    """Redraws the plots from the committed ``<dataset>.json`` and ``<dataset>-<arch>-scores.npz`` (no pickle), and
    rewrites ``<dataset>.md`` from the JSON (the tables are a function of it: a change to their layout needs no rerun)."""
    import numpy as np

    out_dir = Path(out)
    stem = stem or dataset
    result = json.loads((out_dir / f"{stem}.json").read_text())
    (out_dir / f"{stem}.md").write_text(markdown(result))
    for arch, run in result["runs"].items():
        with np.load(out_dir / f"{stem}-{arch}-scores.npz", allow_pickle=False) as z:
            for det, d in run["detectors"].items():
                d["_clean_scores"] = torch.from_numpy(z[f"clean|{det}"])
                for att, m in d["attacks"].items():
                    m["_scores"] = torch.from_numpy(z[f"{att}|{det}"])
        draw(run, stem, arch, out_dir)


def _versions() -> dict[str, str]:
    import hfguard

    out = {"hfguard": hfguard.__version__, "torch": torch.__version__}
    for mod, name in (("torchattacks", "torchattacks"), ("pytorch_ood", "pytorch-ood"), ("kornia", "kornia"), ("sklearn", "scikit-learn")):
        try:
            out[name] = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            out[name] = "not installed"
    return out
