"""``Guard.fit``: one streaming pass for the statistics, then calibration of the score and threshold.

The steps, in order:

1. **Layers and sizes** from the first batch (:func:`prepare`).
2. **One pass over the clean data**: per-class sums for every source go into the statistics;
   a content-hash sample of rows is held out (``calibration_size``) and a second, small sample of
   images is kept for the self-attacks and the filter choice.  Memory does not grow with the data.
3. **Calibration data** (optional, a second pass): clean images the model never trained on.
   When given, the evidence standardiser and the threshold are set on them; otherwise on two halves of
   the fit hold-out.  A model remembers its training images, so their evidence looks more typical
   than deployment data's.
4. **Score**: evidence is standardised per predicted class on clean held-out rows, then combined by
   :mod:`hfguard.combiner`: the smooth maximum of the standardised evidence (``calibration="clean"``)
   or of logistic heads learned against attacks the guard generates itself
   (``calibration="self-attack"``, :mod:`hfguard.selfattack`), whose clean rows are the fit hold-out.
5. **Threshold** at the ``1 - fpr`` quantile of clean scores that took no part in the heads' fit
   (with ``calibration_data``, the images that set the standardiser: see :mod:`hfguard.calibrate`).

A failed ``fit`` restores the guard to its state before the call.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hfguard import calibrate, combiner, evidence, spectrum
from hfguard.batches import batch_count_hint, iter_batches
from hfguard.checker import CHECKER_QUANTILE, GUARD_QUANTILE, MIN_CLASS_ROWS, checker_term, class_tail_units, tail_units
from hfguard.distributed import agree_on
from hfguard.errors import DataError, ModelError, SettingsError
from hfguard.evidence import LOGITS, SPECTRUM
from hfguard.filters import DEFAULT_SIGMAS, choose_sigma
from hfguard.fingerprint import fitted_fingerprint
from hfguard.neighbours import bank_size, leaving_out
from hfguard.probe import MIN_RESIDUAL_SHARE, PROBE_DIM, held_out_share
from hfguard.reservoir import Reservoir, content_priority
from hfguard.selfattack import FAMILIES, self_attacks
from hfguard.sums import SourceSums
from hfguard.taps import choose_layers, choose_pooling, compiled_hint, discover_layers, layer_kind, watchable_units

__all__ = ["fit_guard", "choose_layout", "family_heads", "CALIBRATIONS"]

logger = logging.getLogger("hfguard")

CALIBRATIONS = ("self-attack", "clean")
#: memory for the images kept for self-attacks (bounds the sample for large images)
IMAGE_BYTES = 256 * 2**20
#: fewer expected clean exceedances of the threshold than this: the FPR estimate is noisy
MIN_EXCEEDANCES = 10
#: fewer held-out clean rows than this: no threshold can be set (half of them fit the combiner)
MIN_HELD_OUT = 10
#: successful self-attacks a family needs for a combiner head of its own (else its head learns from its whole regime)
MIN_FAMILY_ROWS = 50


def fit_guard(guard: Any, data: Any, calibration_data: Any = None) -> Any:
    """Fits ``guard`` on clean ``data`` (see :meth:`hfguard.Guard.fit`); on any error the guard is left as it was.

    Runs outside any caller's ``torch.inference_mode``: the learned buffers must be normal tensors (an inference
    tensor can never take part in a gradient later: ``score().backward()``, attacks, ONNX export), and the
    self-attacks need gradients.
    """
    with torch.inference_mode(False):
        saved = _snapshot(guard)
        try:
            _fit(guard, data, calibration_data)
            guard._recompile_scoring()  # compile_scoring() before: compile for the new state
        except BaseException:
            _restore(guard, saved)
            raise
    return guard


def _snapshot(guard: Any) -> dict[str, Any]:
    # fit re-creates every learned buffer and module (never writes into the old ones), so references suffice
    return {
        "buffers": dict(guard._buffers),
        "modules": {k: guard._modules.get(k) for k in ("gaussians", "probes", "banks")},
        "attrs": {k: getattr(guard, k) for k in ("layout", "score_columns", "layers", "probed", "neighboured", "poolings", "fit_report", "_model_fingerprint",
                                                 "_checker_fingerprint", "_compiled")},
    }


def _restore(guard: Any, saved: dict[str, Any]) -> None:
    guard._buffers.clear()
    guard._buffers.update(saved["buffers"])
    for name, module in saved["modules"].items():
        if module is None:
            guard._modules.pop(name, None)
        else:
            guard._modules[name] = module
    for k, v in saved["attrs"].items():
        setattr(guard, k, v)


def choose_layout(guard: Any, x: Tensor) -> dict[str, Any]:
    """Chooses layers and sizes on the first batch; returns the layout (not yet allocated)."""
    example = x[: min(len(x), 8)]
    infos, out = discover_layers(guard.model, example)
    if not isinstance(out, Tensor) or out.dim() != 2:
        got = type(out).__name__ if not isinstance(out, Tensor) else f"a tensor of shape {tuple(out.shape)}"
        raise ModelError(f"the model must return logits of shape (N, K); got {got}")
    k = int(out.shape[1])
    if k < 2:
        raise ModelError(f"the model must have at least 2 outputs (classes); got {k}")
    if bool((out >= 0).all()) and torch.allclose(out.sum(1), torch.ones(len(out), dtype=out.dtype, device=out.device), atol=1e-4):
        warnings.warn("the model's outputs look like probabilities (non-negative, rows sum to 1); hfguard expects logits", stacklevel=5)
    by_name = {i.name: i for i in infos}
    if guard.layers_setting == "auto":
        layers = choose_layers(infos, dict(watchable_units(guard.model)), k, input_shape=tuple(x.shape[1:]))
        if not layers:
            raise ModelError("no watchable layer found automatically; pass layers=[...] with module names" + compiled_hint(guard.model))
    else:
        layers = list(guard.layers_setting)
        named = dict(guard.model.named_modules())
        for n in layers:
            if n == "":
                raise ModelError("layer '' is the model itself: its output is the logits, which the guard always watches; name inner modules")
            if n not in named:
                raise ModelError(f"layer {n!r} is not a module of the model; some valid names: {list(named)[1:12]}")
        # explicitly named modules may be inside custom blocks: describe them now
        kinds: dict[str, str] = {}
        infos2, _ = discover_layers(guard.model, example, [(n, named[n]) for n in layers], outputs=kinds)
        by_name.update({i.name: i for i in infos2})
        for n in layers:
            info = by_name.get(n)
            if info is None and n in kinds:
                raise ModelError(f"layer {n!r} returns a {kinds[n]}, not a tensor; watch a module whose output is a tensor (e.g. one inside it)")
            if info is None:
                raise ModelError(f"layer {n!r} did not run during the forward pass" + compiled_hint(guard.model))
            if info.calls != 1:
                raise ModelError(f"layer {n!r} runs {info.calls} times per forward pass; choose a module that runs once")
            if tuple(info.shape) == (k,) and info.order == max(i.order for i in infos2):
                warnings.warn(f"layer {n!r} outputs the logits, which the guard watches anyway: it adds nothing but cost", stacklevel=5)
    c, h, w = (int(s) for s in x.shape[1:])
    poolings, dims = [], []
    for n in layers:
        shape = by_name[n].shape
        pooling, dim = choose_pooling(shape, layer_kind(shape, (h, w), guard.model.get_submodule(n)), guard.max_features, (h, w))
        poolings.append([pooling.kind, pooling.size, pooling.channels, pooling.prefix])
        dims.append(dim)
    if guard.norm_mean.numel() not in (1, c):
        raise SettingsError(f"normalize has {guard.norm_mean.numel()} channels but the images have {c}")
    tile = [spectrum.spectral_tile(h), spectrum.spectral_tile(w)]
    grid = spectrum.spectral_grid(*tile)
    # a linear probe per layer (hfguard.probe); a nearest-neighbour bank (hfguard.neighbours) for the first watched layer
    # and the logits (benchmarks/evidence_neighbours.py: most of what a bank per layer adds, for a quarter of its cost)
    banked = [layers[0], LOGITS]
    sources = [*layers, LOGITS, SPECTRUM, *(evidence.probe_name(n) for n in layers)]
    if guard.neighbour_bank:
        sources += [evidence.neighbour_name(n) for n in banked]
    names = evidence.feature_names(sources)
    setting = guard.score_features_setting
    if setting == "all" or (setting == "auto" and guard.calibration == "self-attack"):
        chosen = names
    elif setting == "auto":
        chosen = [f"{layers[0]}:distance", f"{layers[0]}:gap", f"{layers[0]}:nearest", "margin"]
    else:
        chosen = list(setting)
        for feature in chosen:
            if not guard.neighbour_bank and evidence.neighbour_name("") in feature:
                raise SettingsError(f"score_features names {feature!r}, a nearest-neighbour feature, but neighbour_bank=0 keeps no bank")
            evidence.parse_feature(feature, sources)
    # only the probes the score uses are fitted (the others would cost fit time and file size for nothing)
    probes = [i for i, n in enumerate(layers) if any(f.rpartition(":")[0] == evidence.probe_name(n) for f in chosen)]
    neighboured = [i for i, n in zip((0, len(layers)), banked) if any(f.rpartition(":")[0] == evidence.neighbour_name(n) for f in chosen)]
    per_class, near = bank_size(k, guard.neighbour_bank or 1)
    return {
        "score_features": chosen,
        "calibration": guard.calibration,
        "heads": len(chosen) if guard.calibration == "clean" else len(_head_families(guard.attack_families)),
        "layers": layers,
        "poolings": poolings,
        "dims": dims,
        "probes": probes,
        "probe_dim": min(k, PROBE_DIM),
        "neighboured": neighboured,
        "bank_per_class": per_class,
        "bank_neighbours": near,
        "num_classes": k,
        "input_shape": [c, h, w],
        "layer_shapes": {n: list(by_name[n].shape) for n in layers},
        "spectral_tile": tile,
        "spectral_grid": list(grid),
        "hf_index": spectrum.hf_block_mask(grid).nonzero().flatten().tolist(),
        "checker": guard._checker() is not None,
    }


def _head_families(families: list[str]) -> list[str]:
    """The generated families, one combiner head each, in :data:`FAMILIES` order."""
    return [f for f in FAMILIES if f in families]


def _fit(guard: Any, data: Any, calibration_data: Any) -> None:
    t0 = time.perf_counter()
    held = Reservoir(guard.calibration_size)
    images: Reservoir | None = None
    device = next((t.device for t in guard.model.parameters()), torch.device("cpu"))
    sums: SourceSums | None = None
    layout: dict[str, Any] | None = None
    seen_labels = False
    with guard._eval_model(), torch.no_grad():
        bar = tqdm(iter_batches(data, guard.batch_size), total=batch_count_hint(data, guard.batch_size), desc="hfguard fit", disable=not guard.progress, leave=False)
        for index, (x, y) in enumerate(bar):
            if x.shape[0] == 0:
                continue
            x = _clean_batch(guard, x, index, device)
            if layout is None:
                layout = choose_layout(guard, x)
                sums, images = _start(guard, layout, held, x.device)
            elif tuple(x.shape[1:]) != tuple(layout["input_shape"]):
                raise DataError(f"batch {index} has images of shape {tuple(x.shape[1:])}; earlier batches had {tuple(layout['input_shape'])}")
            logits, feats = guard._features(x)
            if y is None:
                y = logits.argmax(1)
            else:
                seen_labels = True
                y = _checked_labels(y.to(x.device), layout["num_classes"], index)
            rows = {f"source{i}": f.float().cpu() for i, f in enumerate(feats)}
            rows["y"] = y.cpu()
            if layout["checker"]:
                rows["checker"] = guard._forward_checker(x).float().cpu()
            pixels = guard.to_pixels(x)
            priority = content_priority(pixels, guard.seed)
            rows["priority"] = priority
            sums.add(held.offer(rows, priority))
            # only the images the sample may keep cross to the host (a GPU batch is mostly rejected once the sample is full)
            img_priority = 1.0 - priority
            rejected = images.cannot_keep(img_priority)
            images.skip(int(rejected.sum()))
            rows_in = (~rejected).nonzero().flatten()
            if len(rows_in):
                on_dev = rows_in.to(pixels.device)
                images.offer({"x": pixels.detach()[on_dev].cpu(), "y": y[on_dev].cpu(), "priority": priority[rows_in]}, img_priority[rows_in])
        bar.close()
    layout, sums, images = _agree(guard, layout, sums, images, held, device)
    hold, lost, seen = held.merged()  # across ranks under torch.distributed
    if lost:
        sums.add(lost)
    sums.all_reduce()
    hold = _hand_back_excess(guard, hold, seen, sums)
    hold = _stratify(hold, sums)
    if len(hold["y"]) < MIN_HELD_OUT:
        raise DataError(
            f"too few clean samples to calibrate the threshold: {len(hold['y'])} held out (at most a third of each class is held "
            f"out, and {MIN_HELD_OUT} are needed); pass more clean images per class"
        )
    counts = sums.count.long()
    few = [(c, int(n)) for c, n in enumerate(counts.tolist()) if n < 2]
    if few:
        what = "labels" if seen_labels else "the model's predictions"
        raise DataError(
            f"each class needs at least 2 clean samples outside the calibration hold-out (which takes at most a third of a class); by {what}, "
            + ", ".join(f"class {c} has {n}" for c, n in few)
        )
    probes = sums.probe_models(int(layout["probe_dim"]))  # [] when nothing is probed
    layout, probe_report = _drop_linear_probes(guard, layout, probes, hold)
    layout = _final_bank_size(guard, layout, sums)
    shrinkage = _set_gaussians(guard, sums.gaussian_models(), [m for i, m in zip(sums.probed, probes) if i in layout["probes"]])
    bank_priority = _set_banks(guard, sums)
    t_stats = time.perf_counter() - t0
    calib = None if calibration_data is None else _calibration_rows(guard, calibration_data, layout, device)
    sample = images.merged()[0]
    report = _calibrate(guard, layout, hold, calib, sample, labelled=seen_labels, bank_priority=bank_priority)
    report.update(
        samples_in_statistics=int(sums.count.sum()),
        class_counts=counts.tolist(),
        shrinkage=dict(zip(guard.evidence_sources, shrinkage)),
        probes=probe_report,
        seconds={"statistics": t_stats, **report.pop("seconds"), "total": time.perf_counter() - t0},
    )
    guard.fit_report = report
    guard._model_fingerprint = fitted_fingerprint(guard.model, guard, tuple(layout["input_shape"]))
    net = guard._checker()
    guard._checker_fingerprint = None if net is None else fitted_fingerprint(net, guard, tuple(layout["input_shape"]))
    logger.info("hfguard fitted: threshold %.4f, filter sigma %.2f", float(guard.calibrated_threshold), float(guard.sigma_))


def _source_dims(layout: dict[str, Any]) -> list[int]:
    return [*layout["dims"], layout["num_classes"], len(layout["hf_index"])]


def _row_template(layout: dict[str, Any]) -> dict[str, Tensor]:
    """Zero-row tensors with the layout of the held-out rows (features of every source and the class)."""
    rows = {f"source{i}": torch.zeros(0, d) for i, d in enumerate(_source_dims(layout))}
    rows["y"] = torch.zeros(0, dtype=torch.long)
    rows["priority"] = torch.zeros(0, dtype=torch.float64)
    if layout.get("checker", False):  # the checker's logits (hfguard.checker): its term needs the model's prediction too
        rows["checker"] = torch.zeros(0, layout["num_classes"])
    return rows


def _start(guard: Any, layout: dict[str, Any], held: Reservoir, device: torch.device) -> tuple[SourceSums, Reservoir]:
    """Allocates the state for ``layout``: accumulators, and the image sample sized to at most ``IMAGE_BYTES``."""
    guard._allocate(layout)
    guard.to(device)
    logger.info("hfguard watches %s", ", ".join(f"{n} ({d} features)" for n, d in zip(layout["layers"], layout["dims"])))
    sums = SourceSums(layout["num_classes"], _source_dims(layout), len(layout["layers"]), layout["probes"], layout["neighboured"],
                      layout["bank_per_class"])
    c, h, w = layout["input_shape"]
    images = Reservoir(max(64, min(guard.attack_size, IMAGE_BYTES // (c * h * w * 4))))
    held.ensure_keys(_row_template(layout))
    images.ensure_keys({"x": torch.zeros(0, c, h, w), "y": torch.zeros(0, dtype=torch.long), "priority": torch.zeros(0, dtype=torch.float64)})
    return sums, images


def _agree(guard: Any, layout: dict[str, Any] | None, sums: SourceSums | None, images: Reservoir | None, held: Reservoir,
           device: torch.device) -> tuple[dict[str, Any], SourceSums, Reservoir]:
    """Under torch.distributed every rank must reach the collectives with the same layout: a rank with an empty shard
    takes the others' layout (zero sums, no samples); ranks that saw different models or image sizes are refused."""
    layouts = agree_on(layout)
    seen = [s for s in layouts if s is not None]
    if not seen:
        raise DataError("fit got no data: the loader or iterable yielded no images" + (" on any rank" if len(layouts) > 1 else ""))
    if any(s != seen[0] for s in seen):
        raise DataError("the ranks of a distributed fit chose different layers, saw different image sizes or differ in having a checker network; every rank must "
                        "wrap the same model (and checker) and data format")
    if layout is None:
        layout = seen[0]
        sums, images = _start(guard, layout, held, device)
    return layout, sums, images


def _clean_batch(guard: Any, x: Tensor, index: int, device: torch.device) -> Tensor:
    x, bad = guard._check_input(x, fitted=False, nonfinite="flag")  # fit data with NaN/Inf is a DataError, whatever nonfinite says
    if bad is not None:
        raise DataError(f"batch {index} holds NaN or Inf values in {int(bad.sum())} images; fit needs clean, finite images")
    return x.to(device)


def _checked_labels(y: Tensor, k: int, index: int, what: str = "") -> Tensor:
    if len(y) and bool((y < 0).any() or (y >= k).any()):
        raise DataError(f"{what}batch {index}: labels must be in [0, {k - 1}] for a model with {k} outputs; got values from {int(y.min())} to {int(y.max())}")
    return y


def _hand_back_excess(guard: Any, hold: dict[str, Tensor], seen: int, sums: SourceSums) -> dict[str, Tensor]:
    """Small data: at most 30 % (at least 40) of the rows stay held out; the rest go back to the statistics."""
    n_held = len(hold["y"])
    keep = min(n_held, max(40, int(0.3 * seen)))
    if keep >= n_held:
        return hold
    order = torch.randperm(n_held, generator=torch.Generator().manual_seed(guard.seed + 3))
    back = torch.zeros(n_held, dtype=torch.bool)
    back[order[keep:]] = True
    return _give_back(hold, back, sums)


def _stratify(hold: dict[str, Tensor], sums: SourceSums) -> dict[str, Tensor]:
    """A class keeps at most a third of its samples in the hold-out; the rest go back to the statistics.

    The hold-out is a uniform sample, so with a few images per class (1000 classes, 6 images each) it would
    take all of some classes' images; this way every class with 2 or more samples has 2 or more in the
    statistics.  Deterministic, so every rank of a distributed fit makes the same choice.
    """
    y = hold["y"]
    if len(y) == 0:
        return hold
    k = sums.count.shape[0]
    held = torch.bincount(y, minlength=k)
    total = held + sums.count.long()
    allowed = total // 3
    order = torch.argsort(y, stable=True)
    ys = y[order]
    rank = torch.arange(len(ys)) - torch.searchsorted(ys, ys)  # position of each row within its class
    back = torch.zeros(len(y), dtype=torch.bool)
    back[order[rank >= allowed[ys]]] = True
    return _give_back(hold, back, sums)


def _give_back(hold: dict[str, Tensor], back: Tensor, sums: SourceSums) -> dict[str, Tensor]:
    """Moves the held-out rows marked in ``back`` (bool mask) into the statistics; returns the rows still held out."""
    if not bool(back.any()):
        return hold
    sums.add({k: v[back] for k, v in hold.items()})
    return {k: v[~back] for k, v in hold.items()}


def _set_gaussian(g: Any, model: Any, dtype: torch.dtype) -> float:
    """Copies fitted class Gaussians into a :class:`~hfguard.state.ClassGaussian`'s buffers; returns the shrinkage."""
    center = model.means.mean(0)
    g.center.copy_(center.to(dtype))
    g.whitener.copy_(model.whitener.to(dtype))
    g.white_means.copy_(((model.means - center) @ model.whitener).to(dtype))
    return float(model.shrinkage)


def _set_gaussians(guard: Any, gaussians: list[Any], probes: list[Any]) -> list[float]:
    """Copies the fitted sources' and probes' models into the buffers; returns the shrinkage coefficients (evidence-source order)."""
    dtype = guard.dct_h.dtype
    shrink = [_set_gaussian(g, model, dtype) for g, model in zip(guard.gaussians, gaussians)]
    for p, model in zip(guard.probes, probes):
        p.proj.copy_(model.proj.to(dtype))
        p.weight.copy_(model.weight.to(dtype))
        p.logit_center.copy_(model.logit_center.to(dtype))
        p.layer_center.copy_(model.layer_center.to(dtype))
        shrink.append(_set_gaussian(p.residual, model.residual, dtype))
    return shrink


def _final_bank_size(guard: Any, layout: dict[str, Any], sums: SourceSums) -> dict[str, Any]:
    """The layout with the bank's rows per class and neighbours fitted to the data (no more slots than the best-filled
    class uses, fewer neighbours than the least-filled class has); re-allocates the state when they change."""
    if sums.sample is None:
        return layout
    rows = torch.bincount(sums.sample.y, minlength=len(sums.count))
    per = max(1, int(rows.max()))
    # one fewer than the least-filled class has: with an attack's own image left out (_bank_slots) enough rows remain
    near = max(1, min(int(layout["bank_neighbours"]), int(rows.min()) - 1))
    if (per, near) == (layout["bank_per_class"], layout["bank_neighbours"]):
        return layout
    layout = {**layout, "bank_per_class": per, "bank_neighbours": near}
    device = guard.dct_h.device
    guard._allocate(layout)
    guard.to(device)
    return layout


def _set_banks(guard: Any, sums: SourceSums) -> Tensor | None:
    """Copies the class-stratified sample of clean rows into the banks (:mod:`hfguard.neighbours`); returns the
    content-hash priority of the image behind each slot ((K, per_class), ``inf`` where empty; see :func:`_bank_slots`),
    or None without banks."""
    if sums.sample is None:
        return None
    per, priority = int(guard.layout["bank_per_class"]), None
    for bank, i in zip(guard.banks, guard.neighboured):
        rows, valid, priority = sums.sample.rows(f"source{i}", per)  # the same images behind every source's bank
        bank.set_rows(rows, valid)  # (standardised on the host, then copied to the bank's device)
    return priority


def _bank_slots(bank: Tensor | None, priority: Tensor, labels: Tensor) -> Tensor | None:
    """(N,) the flat slot, in the banks whose images have the priorities ``bank`` (K, per_class), of each image (found by
    its content-hash priority and its class), -1 for an image outside the banks; None without banks. An adversarial
    made from a bank image must not find its own clean image among the nearest rows (no attack on a new image does):
    ``fit`` computes its evidence with that slot left out."""
    if bank is None:
        return None
    k, per = bank.shape
    match = (priority.cpu()[:, None] == bank.reshape(1, -1)) & (labels.cpu()[:, None] == torch.arange(k).repeat_interleave(per)[None, :])
    slot = match.to(torch.int8).argmax(1)
    return torch.where(match.any(1), slot, torch.full_like(slot, -1))


def _drop_linear_probes(guard: Any, layout: dict[str, Any], probes: list[Any], hold: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Leaves out the probes of layers that determine the logits (nearly) linearly (residual share on the held-out
    rows ``hold`` below :data:`~hfguard.probe.MIN_RESIDUAL_SHARE`): their residual is rounding noise, which the
    score would amplify (e.g. under half precision).  The held-out share, not the fit samples' (which a probe
    fitted on few samples for its dimension reads almost exactly), decides.  A probe the user named in
    ``score_features`` is kept.  Re-allocates the state for the new layout; returns it and the report's
    per-layer probe summary."""
    layers, named = layout["layers"], guard.score_features_setting not in ("auto", "all")
    chosen = set(layout["score_features"])
    report, keep = {}, []
    for i, model in zip(layout["probes"], probes):
        name = evidence.probe_name(layers[i])
        wanted = named and any(f"{name}:{k}" in chosen for k in ("distance", "gap", "nearest"))
        held_out = held_out_share(model, hold[f"source{i}"], hold[f"source{len(layers)}"], hold["y"])
        kept = wanted or held_out >= MIN_RESIDUAL_SHARE
        report[layers[i]] = {"residual_share": round(held_out, 4), "residual_share_on_fit_samples": round(model.residual_share, 4), "kept": kept}
        if kept:
            keep.append(i)
    if keep == list(layout["probes"]):
        return layout, report
    dropped = {evidence.probe_name(layers[i]) for i in layout["probes"] if i not in keep}
    features = [f for f in layout["score_features"] if f.rpartition(":")[0] not in dropped]
    layout = {**layout, "probes": keep, "score_features": features}
    if layout["calibration"] == "clean":
        layout["heads"] = len(features)
    device = guard.dct_h.device
    guard._allocate(layout)
    guard.to(device)
    return layout, report


def _calibration_rows(guard: Any, data: Any, layout: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
    """Source features of (a content-hash sample of at most ``calibration_size``) calibration images."""
    res = Reservoir(guard.calibration_size)
    res.ensure_keys(_row_template(layout))
    batches = tqdm(iter_batches(data, guard.batch_size), total=batch_count_hint(data, guard.batch_size), desc="hfguard calibration data",
                   disable=not guard.progress, leave=False)
    with guard._eval_model(), torch.no_grad(), batches:
        for index, (x, y) in enumerate(batches):
            if x.shape[0] == 0:
                continue
            x = _clean_batch(guard, x, index, device)
            if tuple(x.shape[1:]) != tuple(layout["input_shape"]):
                raise DataError(f"calibration batch {index} has images of shape {tuple(x.shape[1:])}; the fit data had {tuple(layout['input_shape'])}")
            _, feats = guard._features(x)
            rows = {f"source{i}": f.float().cpu() for i, f in enumerate(feats)}
            if layout["checker"]:
                rows["checker"] = guard._forward_checker(x).float().cpu()
            rows["y"] = (_checked_labels(y, layout["num_classes"], index, "calibration ") if y is not None else torch.full((len(x),), -1)).cpu()
            rows["priority"] = content_priority(guard.to_pixels(x), guard.seed + 7)
            res.offer(rows, rows["priority"])
    rows, _, _ = res.merged()
    if not rows or len(rows["y"]) == 0:
        raise DataError("calibration_data yielded no images")
    return rows


def _evidence_of_rows(guard: Any, rows: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Evidence (N, F) and predicted classes of stored source rows."""
    dev, dtype = guard.dct_h.device, guard.dct_h.dtype
    feats = [rows[f"source{i}"].to(dev, dtype) for i in range(len(guard.sources))]
    with torch.no_grad():
        return guard._evidence(feats[-2], guard._source_distances(feats)), feats[-2].argmax(1)


def _model_input(guard: Any, pixels: Tensor) -> Tensor:
    """Pixels -> the model's input, on the guard's device and in the model's floating dtype (e.g. float16)."""
    dtype = next((p.dtype for p in guard.model.parameters() if p.is_floating_point()), pixels.dtype)
    return guard.from_pixels(pixels.to(guard.dct_h.device)).to(dtype)


def _evidence_of_pixels(guard: Any, pixels: Tensor, left_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Evidence (N, F) and predicted classes of pixel images; ``left_out`` (N,): a bank slot each row's nearest-neighbour
    distances leave out (-1: none), see :func:`_bank_slots`."""
    out_e, out_p = [], []
    with guard._eval_model(), torch.no_grad():
        for i in range(0, len(pixels), guard.batch_size):
            x = _model_input(guard, pixels[i : i + guard.batch_size])
            with leaving_out(guard.banks, None if left_out is None else left_out[i : i + guard.batch_size]):
                logits, feats = guard._features(x)
                out_e.append(guard._evidence(logits, guard._source_distances(feats)))
            out_p.append(logits.argmax(1))
    return torch.cat(out_e), torch.cat(out_p)


def _calibrate(guard: Any, layout: dict[str, Any], hold: dict[str, Tensor], calib: dict[str, Tensor] | None, sample: dict[str, Tensor], *, labelled: bool,
               bank_priority: Tensor | None = None) -> dict[str, Any]:
    """Standardiser, heads, threshold and filter; returns the fit report's calibration part (``bank_priority``: see
    :func:`_bank_slots`)."""
    k = layout["num_classes"]
    seconds: dict[str, float] = {}
    ev_h, pred_h = _evidence_of_rows(guard, hold)
    n = len(ev_h)
    if calib is None:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(guard.seed + 2))
        fit_idx, thr_idx = perm[: n // 2], perm[n // 2 :]
        ev_fit, pred_fit = ev_h[fit_idx], pred_h[fit_idx]
        ev_thr, pred_thr = ev_h[thr_idx], pred_h[thr_idx]
        checker_thr = hold["checker"][thr_idx] if layout["checker"] else None
        mean, std = calibrate.fit_standardizer(ev_fit, pred_fit, k)
    else:
        # the heads' clean rows: the fit hold-out (images of the kind the self-attacks start from); the standardiser: the
        # calibration images, which the model never trained on (a memorised image's evidence looks more typical than a
        # new one's), shrunk towards the hold-out's statistics where a class has few (benchmarks/standardiser_source.py)
        ev_fit, pred_fit = ev_h, pred_h
        ev_thr, pred_thr = _evidence_of_rows(guard, calib)
        checker_thr = calib["checker"] if layout["checker"] else None
        mean, std = calibrate.fit_standardizer(ev_thr, pred_thr, k, prior=calibrate.fit_standardizer(ev_fit, pred_fit, k))
    guard.evidence_mean.copy_(mean)
    guard.evidence_std.copy_(std)
    z_fit = calibrate.standardize(ev_fit, pred_fit, mean, std)
    report: dict[str, Any] = {"calibration": layout["calibration"], "standardiser": "fit hold-out" if calib is None else "calibration_data"}
    if layout["calibration"] == "clean":
        weight, bias = combiner.identity_heads(len(layout["score_features"]), dtype=mean.dtype, device=mean.device)
        report["heads"] = {}
    else:
        t = time.perf_counter()
        weight, bias, report["self_attacks"] = _self_attack_heads(guard, sample, z_fit, mean, std, bank_priority)
        seconds["self_attacks"] = time.perf_counter() - t
        report["heads"] = {f: dict(zip(layout["score_features"], [round(float(v), 4) for v in w])) for f, w in zip(_head_families(guard.attack_families), weight)}
    guard.head_weight.copy_(weight)
    guard.head_bias.copy_(bias)
    with torch.no_grad():
        scores_thr = guard._score_evidence(ev_thr, pred_thr)
    if checker_thr is not None:
        report["checker"] = _set_checker_units(guard, scores_thr, checker_thr.to(scores_thr.device), pred_thr)
        with torch.no_grad():
            scores_thr = guard._with_checker(scores_thr, checker_thr.to(scores_thr.device), pred_thr)
    guard.calibrated_threshold.fill_(calibrate.threshold_at_fpr(scores_thr, guard.fpr))
    report.update(_diagnostics(guard, hold, calib, ev_h, pred_h, scores_thr, labelled))
    t = time.perf_counter()
    report.update(_choose_filter(guard, sample["x"][:512].to(guard.dct_h.device)))  # the blurs run where the model does
    seconds["filter"] = time.perf_counter() - t
    report.update(
        samples_held_out=n,
        threshold_samples=len(scores_thr),
        feature_names=evidence.feature_names(guard.evidence_sources),
        score_features=layout["score_features"],
        calibration_evidence_mean=dict(zip(layout["score_features"], ev_thr.mean(0).tolist())),
        seconds=seconds,
    )
    return report


def _set_checker_units(guard: Any, scores: Tensor, checker_logits: Tensor, pred: Tensor) -> dict[str, Any]:
    """Sets both terms' clean-tail units (:mod:`hfguard.checker`) on the threshold's clean rows; returns the report."""
    k = guard.layout["num_classes"]
    term = checker_term(checker_logits, pred)
    g_med, g_unit = tail_units(scores, GUARD_QUANTILE)
    c_med, c_unit, pooled = class_tail_units(term, pred.to(term.device), k)
    guard.guard_median.fill_(g_med)
    guard.guard_unit.fill_(g_unit)
    guard.checker_median.copy_(c_med)
    guard.checker_unit.copy_(c_unit)
    agree = float((checker_logits.argmax(1) == pred).float().mean())
    return {"agreement_with_model": agree, "classes_on_pooled_tail": pooled, "guard_quantile": GUARD_QUANTILE, "checker_quantile": CHECKER_QUANTILE,
            "min_class_rows": MIN_CLASS_ROWS}


def _require_input_gradient(model: Any, pixels: Tensor) -> None:
    """Raises :class:`ModelError` (pointing to ``calibration="clean"``) when the model's logits have no gradient with
    respect to its input (a quantised model, a forward under ``torch.no_grad()``); only this check is relabelled,
    so an out-of-memory error or a bug elsewhere keeps its own type."""
    probe = pixels.detach().clone().requires_grad_(True)
    try:
        out = model(probe)
        torch.autograd.grad(out.float().sum(), probe)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        raise ModelError(
            f"calibration='self-attack' needs the gradient of the model's logits with respect to its input, and autograd failed "
            f"({exc}); a quantised model or one whose forward runs under torch.no_grad() has none: pass calibration='clean'"
        ) from exc


def _self_attack_heads(guard: Any, sample: dict[str, Tensor], z_clean: Tensor, mean: Tensor, std: Tensor,
                       bank_priority: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Attacks the kept clean images (the model's gradients; one family is gradient-free) and fits one logistic head per generated family
    (a family with fewer than :data:`MIN_FAMILY_ROWS` successful adversarials gets a head fitted on all of its regime's)."""
    dev = guard.dct_h.device
    pixels, labels = sample["x"].to(dev), sample["y"].to(dev)
    with guard._eval_model(), torch.no_grad():
        correct = torch.cat([guard._forward_model(_model_input(guard, pixels[i : i + guard.batch_size])).argmax(1) for i in range(0, len(pixels), guard.batch_size)]) == labels
    pixels, labels = pixels[correct], labels[correct]
    slots = _bank_slots(bank_priority, sample["priority"][correct.cpu()], labels)
    if len(pixels) == 0:
        raise DataError("self-attack calibration found no correctly classified image to attack (check the labels); or pass calibration='clean'")
    lo, hi = guard.input_range if guard.input_range is not None else (float(pixels.min()), float(pixels.max()))

    def model(p: Tensor) -> Tensor:
        return guard._forward_model(_model_input(guard, p)).float()

    # autograd.grad w.r.t. the input only (parameters get no .grad); on even if the caller disabled gradients
    with guard._eval_model(), torch.enable_grad(), tqdm(total=len(pixels), desc="hfguard self-attacks", unit="img", disable=not guard.progress,
                                                        leave=False) as bar:
        _require_input_gradient(model, pixels[:2])

        running = [0]  # images of the batch at work, counted once it is done

        def advance(family: str, images: int) -> None:  # as a batch starts: count the last one, name this one (one redraw)
            bar.update(running[0])
            running[0] = images
            bar.set_postfix_str(family)

        attacks = self_attacks(model, pixels, labels, lo=lo, hi=hi, seed=guard.seed, batch_size=guard.batch_size, families=guard.attack_families,
                               on_batch=advance)
        bar.update(running[0])
    regime_rows = {r: int(attacks.regime_mask(r).sum()) for r in dict.fromkeys(FAMILIES[f] for f in guard.attack_families)}
    for regime, rows in regime_rows.items():
        if rows < 10:
            raise DataError(
                f"self-attack calibration produced only {rows} successful {regime} adversarials from {len(pixels)} correctly classified "
                f"images (per family: {attacks.succeeded}); pass more data, or calibration='clean'"
            )
    ev_adv, pred_adv = _evidence_of_pixels(guard, attacks.pixels, None if slots is None else slots[attacks.source.cpu()])
    z_adv = calibrate.standardize(ev_adv, pred_adv, mean, std)
    weight, bias, pooled = family_heads(z_clean, z_adv, attacks, guard.attack_families, guard.temperature)
    info = {"images": len(pixels), "attempted": attacks.attempted, "succeeded": attacks.succeeded, "families": {f: FAMILIES[f] for f in guard.attack_families},
            "heads_on_their_regime": pooled}
    return weight, bias, info


def family_heads(z_clean: Tensor, z_adv: Tensor, attacks: Any, families: list[str], temperature: float) -> tuple[Tensor, Tensor, list[str]]:
    """One logistic head per self-attack family (clean rows ``z_clean`` against the family's rows of ``z_adv``, both
    standardised), each rescaled to a common clean tail; a family with fewer than :data:`MIN_FAMILY_ROWS` successful
    adversarials gets a head fitted on all of its regime's, and the copies of one regime head share its weight in the
    smooth maximum. Returns the heads' weights (H, F) and biases (H,), and the families that learned from their regime."""
    weights, biases, pooled, shared = [], [], [], {}
    for family in _head_families(families):
        mask = attacks.family_mask(family)
        if int(mask.sum()) < MIN_FAMILY_ROWS:  # too few for a head of its own: the family's regime's adversarials
            regime = attacks.regime_mask(FAMILIES[family])
            shared.setdefault(FAMILIES[family], []).append(len(weights))
            if int(regime.sum()) > int(mask.sum()):
                pooled.append(family)
            mask = regime
        w, b = combiner.fit_logistic_head(z_clean, z_adv[mask.to(z_adv.device)])
        w, b = combiner.standardised_head(w, b, z_clean)
        weights.append(w)
        biases.append(b)
    for rows in shared.values():  # k copies of one regime head: the smooth maximum would count it k times
        for i in rows:
            biases[i] -= temperature * math.log(len(rows))
    return torch.stack(weights), torch.tensor(biases, dtype=z_clean.dtype), pooled


#: ``fit`` warns when the model agrees with the labels on fewer held-out fit images than this many times chance (or half)
LABEL_AGREEMENT_OVER_CHANCE = 3.0


def _labels_look_wrong(agreement: float, num_classes: int) -> bool:
    """Whether the model agrees with the labels on too few images for them to be its classes (see LABEL_AGREEMENT_OVER_CHANCE)."""
    return agreement < min(0.5, LABEL_AGREEMENT_OVER_CHANCE / num_classes)


def _diagnostics(guard: Any, hold: dict[str, Tensor], calib: dict[str, Tensor] | None, ev_h: Tensor, pred_h: Tensor, scores_thr: Tensor, labelled: bool) -> dict[str, Any]:
    """Warnings and numbers on how far the threshold can be trusted."""
    out: dict[str, Any] = {}
    n_thr = len(scores_thr)
    if n_thr * guard.fpr < MIN_EXCEEDANCES:
        warnings.warn(
            f"the threshold rests on {n_thr} clean samples (about {n_thr * guard.fpr:.0f} above it at fpr={guard.fpr}); the real false-positive "
            f"rate may differ from {guard.fpr} by several points: pass more clean data or calibration_data",
            stacklevel=6,
        )
    if labelled:
        acc = float((pred_h == hold["y"].to(pred_h.device)).float().mean())
        out["held_out_fit_accuracy"] = acc
        k = guard.layout["num_classes"]
        if _labels_look_wrong(acc, k):
            warnings.warn(
                f"the model agrees with the labels on only {acc:.1%} of the held-out fit images ({k} classes: chance {1 / k:.1%}): the "
                "labels may be wrong (shuffled, another class order) or the model untrained. The class statistics follow the labels, so "
                "the guard learns little from them: check the labels, or fit without labels to use the model's predictions",
                stacklevel=6,
            )
        if calib is None and acc >= 0.99:
            warnings.warn(
                f"the model classifies {acc:.1%} of the held-out fit images correctly: it may have memorised its training data, whose "
                "evidence looks more typical than new images', so more than fpr of new clean images may be flagged. Pass "
                "calibration_data= with clean images the model never trained on",
                stacklevel=6,
            )
    if calib is not None:
        with torch.no_grad():
            scores_fit = guard._score_evidence(ev_h, pred_h)
            if guard.layout.get("checker", False):
                scores_fit = guard._with_checker(scores_fit, hold["checker"].to(scores_fit.device), pred_h)
        thr_fit = calibrate.threshold_at_fpr(scores_fit, guard.fpr)
        # what a threshold set on the fit data would have flagged on the calibration images
        out["fpr_if_calibrated_on_fit_data"] = float((scores_thr > thr_fit).float().mean())
        labels = calib["y"]
        if bool((labels >= 0).all()):
            with torch.no_grad():
                _, pred_c = _evidence_of_rows(guard, calib)
            out["calibration_accuracy"] = float((pred_c.cpu() == labels).float().mean())
            k = guard.layout["num_classes"]
            if _labels_look_wrong(out["calibration_accuracy"], k):
                warnings.warn(
                    f"the model agrees with the calibration labels on only {out['calibration_accuracy']:.1%} of the calibration images "
                    f"({k} classes: chance {1 / k:.1%}): check those labels (the threshold does not use them; fit_report['calibration_accuracy'] does)",
                    stacklevel=6,
                )
    return out


def _choose_filter(guard: Any, images: Tensor) -> dict[str, Any]:
    flip_rates: dict[float, float] = {}
    if guard.filter_sigma_setting == "auto":
        # the images once, then once per candidate sigma: at 224x224 on a CPU minutes of forwards, so a bar of its own
        bar = tqdm(total=len(images) * (1 + len(DEFAULT_SIGMAS)), desc="hfguard filter choice", unit="img", disable=not guard.progress, leave=False)

        def predict(p: Tensor) -> Tensor:
            pred = guard._forward_model(_model_input(guard, p)).argmax(1)
            bar.update(len(p))
            return pred

        with guard._eval_model(), torch.no_grad(), bar:
            sigma, flip_rates = choose_sigma(predict, images, DEFAULT_SIGMAS, guard.max_filter_flip, guard.batch_size)
        if flip_rates[sigma] > guard.max_filter_flip and guard.policy == "filter":  # under "flag" nothing is filtered
            warnings.warn(
                f"every candidate filter sigma changes more clean predictions than max_filter_flip={guard.max_filter_flip} (the weakest, "
                f"{sigma}, changes {flip_rates[sigma]:.1%}); it is used anyway on the inputs policy='filter' flags: raise "
                "max_filter_flip, or pass filter_sigma=<number> (fit_report['filter_flip_rates'] has every candidate's rate)",
                stacklevel=5,
            )
    else:
        sigma = float(guard.filter_sigma_setting)
    guard.sigma_.fill_(sigma)
    return {"filter_sigma": sigma, "filter_flip_rates": flip_rates}
