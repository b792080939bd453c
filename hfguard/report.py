"""``hfguard report``: measure the paper's three claims on a model, with figures and verdicts.

Writes ``report.html`` (self-contained text, PNG figures beside it) and
``report.json`` (every number).  Each claim gets a measured result and a plain
verdict (supported / partly supported / not supported on this model); the
thresholds of the verdicts are stated in the report itself.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hfguard import spectrum
from hfguard.attacks import pgd
from hfguard.errors import SettingsError
from hfguard.filters import lowpass

__all__ = ["claim_stability", "claim_trajectory", "claim_hf", "write_report", "report", "run_report"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pixel_model(guard: Any, like: Tensor) -> Callable[[Tensor], Tensor]:
    """The wrapped model as a function of pixel images (the guard's ``from_pixels`` undone inside, in the dtype of
    ``like``, the inputs the caller gave): the claims attack, filter and transform pixels, whatever the
    model's input normalisation. Call it inside ``guard._eval_model()``."""
    return lambda p: guard._forward_model(guard.from_pixels(p).to(like.dtype))


def _inputs(guard: Any, pixels: Tensor, like: Tensor) -> Tensor:
    """Pixel images back to what the guard takes (normalised when it was built with ``normalize``)."""
    return guard.from_pixels(pixels).to(like.dtype)


def _pixel_box(guard: Any, pixels: Tensor) -> tuple[float, float]:
    """The pixel range attacks stay in: the guard's ``input_range``, else (``input_range=None``, no declared range)
    the range of the images given, as ``fit``'s self-attacks do."""
    return guard.input_range if guard.input_range is not None else (float(pixels.min()), float(pixels.max()))


def claim_stability(guard: Any, x: Tensor, y: Tensor) -> dict[str, Any]:
    """Claim 1: per layer, within/between-class dispersion ratio and nearest-expectation accuracy (``x`` as the
    guard takes it)."""
    with guard._eval_model(), torch.no_grad():
        _, feats = guard._features(x)
        insp = guard.inspect(x)
    k = guard.layout["num_classes"]
    ratios, acc = [], []
    for i, name in enumerate(guard.sources[:-1]):  # layers and logits (the spectrum is claim 3's)
        z = feats[i].double()
        means = torch.stack([z[y == c].mean(0) if (y == c).any() else z.mean(0) for c in range(k)])
        within = (z - means[y]).norm(dim=1).mean()
        between = torch.cdist(means, means)[~torch.eye(k, dtype=torch.bool)].mean()
        ratios.append(float(within / between))
        acc.append(float((insp.nearest[:, i] == y).float().mean()))
    supported = min(acc) >= 0.8
    partly = max(acc) >= 0.8
    return {
        "layers": guard.sources[:-1],
        "within_between_ratio": ratios,
        "nearest_expectation_accuracy": acc,
        "verdict": "supported" if supported else ("partly supported" if partly else "not supported"),
        "rule": "supported if the nearest class expectation is the true class for >= 80% of clean test images at every layer; partly if at some layer",
    }


def claim_trajectory(guard: Any, x: Tensor, y: Tensor, eps: float, steps: int = 20) -> dict[str, Any]:
    """Claim 2: per PGD iteration and layer, how often the nearest class is the final target (``x`` as the guard
    takes it; PGD in pixel space, L-inf ``eps`` in pixel units)."""
    with guard._eval_model():
        return _trajectory(guard, x, y, eps, steps)


def _trajectory(guard: Any, x: Tensor, y: Tensor, eps: float, steps: int) -> dict[str, Any]:
    model, pixels = _pixel_model(guard, x), guard.to_pixels(x)
    lo, hi = _pixel_box(guard, pixels)
    snaps = [pixels]
    p_adv = pixels
    alpha = 2.5 * eps / steps
    for _ in range(steps):  # PGD without random start, keeping every iterate
        p_adv = pgd(model, p_adv, y, eps, steps=1, step_size=alpha, random_start=False, lo=lo, hi=hi)
        p_adv = (pixels + (p_adv - pixels).clamp(-eps, eps)).clamp(lo, hi)
        snaps.append(p_adv)
    with torch.no_grad():
        final = model(p_adv).argmax(1)
        ok = (final != y) & (model(pixels).argmax(1) == y)
    if int(ok.sum()) == 0:
        return {"verdict": "not supported", "n_successful": 0, "reason": "PGD succeeded on no image"}
    target = final[ok]
    rates, origin_rates = [], []
    for s in snaps:
        insp = guard.inspect(_inputs(guard, s[ok], x))
        rates.append((insp.nearest[:, :-1] == target[:, None]).float().mean(0).tolist())
        origin_rates.append((insp.nearest[:, :-1] == y[ok][:, None]).float().mean(0).tolist())
    last = np.array(rates[-1])
    majority = last > 0.5
    first_majority = int(np.argmax(majority)) if majority.any() else None
    insp_final = guard.inspect(_inputs(guard, p_adv[ok], x))
    per_image_cross = []
    for row in (insp_final.nearest[:, :-1] == target[:, None]).tolist():
        per_image_cross.append(row.index(True) if True in row else len(row))
    increasing = last[-1] > last[0] + 0.2
    early_origin = origin_rates[-1][0] > 0.5
    verdict = "supported" if (increasing and early_origin) else ("partly supported" if increasing or early_origin else "not supported")
    return {
        "layers": guard.sources[:-1],
        "eps": eps,
        "steps": steps,
        "n_successful": int(ok.sum()),
        "target_rate": rates,
        "origin_rate": origin_rates,
        "mean_crossover_layer_index": float(np.mean(per_image_cross)),
        "first_layer_with_majority_target": first_majority,
        "verdict": verdict,
        "rule": "supported if, on the final adversarials, the first layer still points to the origin for > 50% and the last layer's target rate exceeds the first layer's by > 0.2",
        "_affinity_examples": insp_final.affinity[:4].tolist(),
        "_targets": target[:4].tolist(),
        "_origins": y[ok][:4].tolist(),
    }


def claim_hf(guard: Any, x: Tensor, y: Tensor, eps: float, sigmas: tuple[float, ...] = (0.3, 0.5, 0.75, 1.0, 1.5, 2.0)) -> dict[str, Any]:
    """Claim 3: spectrum of the perturbation, match to class HF signatures, low- vs high-pass ablation (``x`` as
    the guard takes it; the attack, the spectra and the filters in pixel space, L-inf ``eps`` in pixel units)."""
    with guard._eval_model():
        return _hf(guard, x, y, eps, sigmas)


def _hf(guard: Any, x_in: Tensor, y: Tensor, eps: float, sigmas: tuple[float, ...]) -> dict[str, Any]:
    model, x = _pixel_model(guard, x_in), guard.to_pixels(x_in)
    lo, hi = _pixel_box(guard, x)
    x_adv = pgd(model, x, y, eps, steps=40, lo=lo, hi=hi)
    with torch.no_grad():
        pred_c, pred_a = model(x).argmax(1), model(x_adv).argmax(1)
    ok = (pred_c == y) & (pred_a != y)
    delta = (x_adv - x)[ok]
    xo, target = x[ok], pred_a[ok]
    h, w = x.shape[-2:]
    # the radial profile is over the whole image (the guard's own DCT matrices may be tile-sized)
    fh, fw = (spectrum.dct_matrix(int(n), dtype=x.dtype, device=x.device) for n in (h, w))
    rad_delta = spectrum.radial_spectrum(delta, fh, fw).mean(0)
    rad_clean = spectrum.radial_spectrum(x, fh, fw).mean(0)

    # HF signature match: the HF log-power profile of the perturbation vs each class's mean profile
    def hf(p: Tensor) -> Tensor:
        return spectrum.hf_features(p, guard.dct_h, guard.dct_w, guard.pool_h, guard.pool_w, guard.hf_index)

    with torch.no_grad():
        sig = torch.stack([hf(x[y == c]).mean(0) for c in range(guard.layout["num_classes"]) if (y == c).any()])
        classes = [c for c in range(guard.layout["num_classes"]) if (y == c).any()]
        prof = hf(delta)
        prof_c = prof - prof.mean(1, keepdim=True)
        sig_c = sig - sig.mean(1, keepdim=True)
        corr = F.normalize(prof_c, dim=1) @ F.normalize(sig_c, dim=1).T
        best = torch.tensor(classes)[corr.argmax(1)]
    match_rate = float((best == target).float().mean()) if len(target) else float("nan")
    chance = 1.0 / len(classes)
    low, high = [], []
    with torch.no_grad():
        for s in sigmas:
            lp = lowpass(delta, s)
            low.append(float((model((xo + lp).clamp(lo, hi)).argmax(1) != y[ok]).float().mean()))
            high.append(float((model((xo + delta - lp).clamp(lo, hi)).argmax(1) != y[ok]).float().mean()))
    hf_dominant = np.mean(high) > np.mean(low)
    matches = match_rate > 2 * chance
    verdict = "supported" if (hf_dominant and matches) else ("partly supported" if (hf_dominant or matches) else "not supported")
    # shares of total power (not sums of per-bin averages: the bins hold different numbers of coefficients)
    hf_share_delta = spectrum.high_radius_share(delta, fh, fw, 0.5) if len(delta) else float("nan")
    hf_share_clean = spectrum.high_radius_share(x, fh, fw, 0.5)
    return {
        "eps": eps,
        "n_successful": int(ok.sum()),
        "radial_power_perturbation": rad_delta.tolist(),
        "radial_power_clean": rad_clean.tolist(),
        "hf_power_share_perturbation": hf_share_delta,
        "hf_power_share_clean": hf_share_clean,
        "target_signature_match_rate": match_rate,
        "chance": chance,
        "sigmas": list(sigmas),
        "success_lowpassed_perturbation": low,
        "success_highpassed_perturbation": high,
        "verdict": verdict,
        "rule": "supported if the high-passed perturbation keeps more attack success than the low-passed one (mean over sigmas) and the perturbation's HF profile matches the target class's HF signature more than twice as often as chance",
    }


def _figures(res: dict[str, Any], out: Path) -> dict[str, str]:
    plt = _plt()
    files = {}
    c1 = res["claim1"]
    fig, ax = plt.subplots(figsize=(6, 4))
    idx = range(len(c1["layers"]))
    ax.plot(idx, c1["nearest_expectation_accuracy"], "o-", label="nearest class expectation = true class")
    ax.plot(idx, c1["within_between_ratio"], "s--", label="within / between class distance")
    ax.set_xticks(list(idx), c1["layers"], rotation=30)
    ax.set_xlabel("watched layer (forward order)")
    ax.set_ylabel("rate / ratio (unitless)")
    ax.set_title("Claim 1: stability of per-class expectations")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "claim1.png", dpi=110)
    plt.close(fig)
    files["claim1"] = "claim1.png"
    c2 = res["claim2"]
    if c2.get("n_successful"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        im = axes[0].imshow(np.array(c2["target_rate"]).T, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
        axes[0].set_yticks(range(len(c2["layers"])), c2["layers"])
        axes[0].set_xlabel("PGD iteration")
        axes[0].set_ylabel("layer")
        axes[0].set_title("rate of 'nearest class = final target'")
        fig.colorbar(im, ax=axes[0], label="fraction of successful adversarials")
        aff = np.array(c2["_affinity_examples"])
        for j in range(min(4, len(aff))):
            t, o = c2["_targets"][j], c2["_origins"][j]
            axes[1].plot(aff[j, :-1, t], "-", label=f"ex.{j} target {t}")
            axes[1].plot(aff[j, :-1, o], ":", label=f"ex.{j} origin {o}")
        axes[1].set_xticks(range(len(c2["layers"])), c2["layers"], rotation=30)
        axes[1].set_xlabel("layer")
        axes[1].set_ylabel("class affinity (posterior, 0-1)")
        axes[1].set_title("example trajectories: solid = target, dotted = origin")
        axes[1].legend(fontsize=6, ncol=2)
        fig.suptitle("Claim 2: feature trajectory from origin to target")
        fig.tight_layout()
        fig.savefig(out / "claim2.png", dpi=110)
        plt.close(fig)
        files["claim2"] = "claim2.png"
    c3 = res["claim3"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    nb = len(c3["radial_power_clean"])
    r = (np.arange(nb) + 0.5) / nb
    axes[0].semilogy(r, c3["radial_power_clean"], "o-", label="clean images")
    axes[0].semilogy(r, c3["radial_power_perturbation"], "s-", label="PGD perturbation")
    axes[0].set_xlabel("normalised DCT radius (0 = DC, 1 = highest frequency)")
    axes[0].set_ylabel("mean power (log scale)")
    axes[0].set_title("radially averaged spectrum")
    axes[0].legend()
    axes[1].plot(c3["sigmas"], c3["success_lowpassed_perturbation"], "o-", label="low-passed perturbation only")
    axes[1].plot(c3["sigmas"], c3["success_highpassed_perturbation"], "s-", label="high-passed perturbation only")
    axes[1].set_xlabel("Gaussian cutoff sigma (pixels)")
    axes[1].set_ylabel("attack success rate")
    axes[1].set_ylim(0, 1.02)
    axes[1].set_title("which part of the perturbation fools the model")
    axes[1].legend()
    fig.suptitle("Claim 3: the perturbation is high-frequency")
    fig.tight_layout()
    fig.savefig(out / "claim3.png", dpi=110)
    plt.close(fig)
    files["claim3"] = "claim3.png"
    return files


def _summary(res: dict[str, Any]) -> dict[str, str]:
    c1, c2, c3 = res["claim1"], res["claim2"], res["claim3"]
    acc = c1["nearest_expectation_accuracy"]
    s1 = f"nearest class expectation = true class for {min(acc):.0%} to {max(acc):.0%} of clean images across layers ({', '.join(f'{a:.2f}' for a in acc)})."
    if c2.get("n_successful"):
        last = c2["target_rate"][-1]
        s2 = (f"on {c2['n_successful']} successful PGD examples, the nearest class is the final target at {last[0]:.0%} of images at the first layer "
              f"and {last[-1]:.0%} at the logits; the first layer still points to the origin for {c2['origin_rate'][-1][0]:.0%}; mean crossover layer index {c2['mean_crossover_layer_index']:.1f}.")
    else:
        s2 = "PGD succeeded on no image."
    s3 = (f"{c3['hf_power_share_perturbation']:.0%} of the perturbation's DCT power is at normalised frequency radius >= 0.5 (clean images: {c3['hf_power_share_clean']:.0%}); "
          f"its HF profile is closest to the target class's signature for {c3['target_signature_match_rate']:.0%} of images (chance {c3['chance']:.0%}); "
          f"mean success of the high-passed vs low-passed perturbation {np.mean(c3['success_highpassed_perturbation']):.0%} vs {np.mean(c3['success_lowpassed_perturbation']):.0%}.")
    return {"claim1": s1, "claim2": s2, "claim3": s3}


def write_report(res: dict[str, Any], out: Path) -> None:
    """Figures, ``report.json`` and ``report.html`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = _figures(res, out)
    summary = _summary(res)
    res["summary"] = summary
    clean = {k: ({kk: vv for kk, vv in v.items() if not kk.startswith("_")} if isinstance(v, dict) else v) for k, v in res.items()}
    (out / "report.json").write_text(json.dumps(clean, indent=2))
    titles = {
        "claim1": "Claim 1: per-class activations have stable expectations at every layer",
        "claim2": "Claim 2: adversarial examples follow a feature trajectory from origin to target",
        "claim3": "Claim 3: the perturbation is mainly HF patterns common in target-class images",
    }
    parts = [f"<html><head><meta charset='utf-8'><title>hfguard report: {html.escape(res['dataset'])}</title></head><body style='font-family:sans-serif;max-width:60em'>",
             f"<h1>hfguard report: {html.escape(res['dataset'])}</h1><p>{html.escape(res['setup'])}</p>"]
    for key, title in titles.items():
        c = res[key]
        parts.append(f"<h2>{html.escape(title)}</h2><p><b>Verdict on this model: {html.escape(c['verdict'])}.</b> {html.escape(summary[key])}</p>")
        parts.append(f"<p><i>Rule: {html.escape(c.get('rule', ''))}</i></p>")
        if key in files:
            parts.append(f"<img src='{files[key]}' style='max-width:100%'>")
    parts.append("<p>All numbers: <a href='report.json'>report.json</a>.</p></body></html>")
    (out / "report.html").write_text("\n".join(parts))


#: fewest test images ``run_report`` measures the claims on
MIN_REPORT_IMAGES = 50


def run_report(dataset: str = "digits", out: str = "hfguard-report", *, n: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Trains/loads the demo model, fits a guard, measures the three claims, writes the report."""
    import hfguard
    from hfguard.data import CALIBRATION_HOLDOUT, cached_model, load_dataset

    torch.manual_seed(0)
    split = load_dataset(dataset)
    available = len(split.x_test)
    n = n if n is not None else (available if dataset == "digits" else 1000)
    if not MIN_REPORT_IMAGES <= n <= available:
        raise SettingsError(f"n must be between {MIN_REPORT_IMAGES} (fewer cannot support a verdict) and the {available} test images of {dataset}, got {n}")
    model = cached_model(dataset, "cnn", progress=progress)
    # the documented workflow (as the demo): fit on the model's training images, calibrate on the split it never saw
    train, validation = split.holdout(CALIBRATION_HOLDOUT[dataset])
    guard = hfguard.protect(model, progress=progress).fit(train, calibration_data=validation)
    eps = 0.15 if dataset == "digits" else 0.1
    setup = (f"small CNN, guard fitted on {len(train[0])} clean training images and calibrated on {len(validation[0])} the model never trained on; "
             f"claims measured on {n} test images; PGD L-inf eps {eps}.")
    return report(guard, split.x_test[:n], split.y_test[:n], out, eps=eps, name=dataset, setup=setup)


def report(guard: Any, x: Tensor, y: Tensor, out: str = "hfguard-report", *, eps: float = 0.1, name: str = "model", setup: str = "") -> dict[str, Any]:
    """The three claims measured on a user's fitted guard and labelled clean images.

    ``x`` is given as the guard takes it (normalised when the guard was built with ``normalize``); the claims
    attack, filter and take spectra in pixel space (the guard's ``to_pixels``), with the L-inf budget ``eps`` in
    pixel units and the attacks kept in the guard's ``input_range`` (with ``input_range=None``, in the range of
    the images given). The model runs in eval mode and is handed
    back with every submodule's own mode.

    Example:
        >>> from hfguard.report import report
        >>> res = report(guard, x_test, y_test, "my-report", eps=8 / 255)   # doctest: +SKIP
    """
    res: dict[str, Any] = {
        "dataset": name,
        "setup": setup or f"{len(x)} labelled clean images; PGD L-inf eps {eps}.",
        "claim1": claim_stability(guard, x, y),
        "claim2": claim_trajectory(guard, x[:300], y[:300], eps),
        "claim3": claim_hf(guard, x, y, eps),
    }
    write_report(res, Path(out))
    return res
