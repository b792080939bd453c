"""Markdown tables of a benchmark result (the same function writes ``<dataset>.md`` and the README section)."""

from __future__ import annotations

from typing import Any

from hfguard.fitting import MIN_FAMILY_ROWS
from hfguard.selfattack import CW_STEPS, SQUARE_QUERIES

__all__ = ["markdown", "learned_table", "generalisation_table", "summary_table", "adaptive_summary", "auroc_table", "tpr_table", "caught_table", "cost_table", "crosscheck_table", "adaptive_table"]


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None or v != v else f"{v:.{digits}f}"


def _short(name: str) -> str:
    return name.replace("feature squeezing", "feat. squeezing").replace(" (trained on FGSM)", "*")


def _best(values: list[float]) -> float:
    vals = [v for v in values if v is not None and v == v]
    return max(vals) if vals else float("nan")


def auroc_table(run: dict[str, Any], *, ci: bool = True) -> str:
    """Rows: attacks; columns: detectors; AUROC [bootstrap 95 % CI]; the best per row in bold."""
    dets = list(run["detectors"])
    lines = ["| attack | success (n) | " + " | ".join(_short(d) for d in dets) + " |", "|---|---|" + "---|" * len(dets)]
    for name, a in run["attacks"].items():
        ms = [run["detectors"][d]["attacks"][name] for d in dets]
        best = _best([m["auroc"] for m in ms])
        cells = []
        for m in ms:
            cell = _f(m["auroc"])
            if ci and m["auroc"] == m["auroc"] and m["auroc"] is not None:
                cell += f" [{_f(m['auroc_ci95'][0], 2)}, {_f(m['auroc_ci95'][1], 2)}]"
            cells.append(f"**{cell}**" if m["auroc"] == best else cell)
        lines.append(f"| {name} | {a['success_rate']:.2f} ({a['n_successful']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tpr_table(run: dict[str, Any]) -> str:
    """TPR at each detector's calibrated threshold, with the measured clean FPR as the first row."""
    dets = list(run["detectors"])
    lines = ["| attack | " + " | ".join(_short(d) for d in dets) + " |", "|---|" + "---|" * len(dets)]
    lines.append("| *measured clean FPR (target " + f"{run['target_fpr']:.0%})* | " + " | ".join(_f(run["detectors"][d]["clean_fpr"]) for d in dets) + " |")
    for name in run["attacks"]:
        lines.append(f"| {name} | " + " | ".join(_f(run["detectors"][d]["attacks"][name]["tpr"]) for d in dets) + " |")
    return "\n".join(lines)


def caught_table(run: dict[str, Any]) -> str:
    """Caught or correct: flagged, or classified correctly by the defended pipeline; in brackets, the share labelled correctly."""
    dets = list(run["detectors"])
    lines = ["| attack | " + " | ".join(_short(d) for d in dets) + " |", "|---|" + "---|" * len(dets)]
    for name in run["attacks"]:
        cells = []
        for d in dets:
            m = run["detectors"][d]["attacks"][name]
            cell = _f(m["caught_or_correct"])
            if m.get("repaired"):
                cell += f" (labelled correctly {_f(m['repaired'])})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_table(run: dict[str, Any]) -> str:
    lines = [
        "| detector | implementation | trained on | fit (s) | latency vs bare forward | clean FPR | clean-accuracy cost | twin gap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, d in run["detectors"].items():
        lat = d["latency"]
        lines.append(
            f"| {name} | {d['implementation']} | {d['trained_on']} | {d['fit_s']:.1f} | {lat['ratio']:.2f}x ({lat['other_s'] * 1e3:.1f} vs {lat['base_s'] * 1e3:.1f} ms) | "
            f"{_f(d['clean_fpr'])} | {d['clean_accuracy_cost'] * 100:+.1f} pt | {d['twin_gap']:.0e} |"
        )
    return "\n".join(lines)


def crosscheck_table(run: dict[str, Any]) -> str:
    lines = ["| hfguard attack | torchattacks attack | images | hfguard success | torchattacks success | difference |", "|---|---|---|---|---|---|"]
    for r in run["crosscheck"]:
        extra = ""
        if "own_median_l2" in r:
            extra = f" (median L2 {_f(r['own_median_l2'], 2)} vs {_f(r['torchattacks_median_l2'], 2)})"
        lines.append(f"| {r['own']} | {r['torchattacks']} | {r['n_images']} | {r['own_success']:.3f} | {r['torchattacks_success']:.3f} | {r['difference'] * 100:+.1f} pt{extra} |")
    return "\n".join(lines)


def checker_recipe(c: dict[str, Any]) -> str:
    """How the bench's checker was made, from its facts. Results written before 0.8.2 lack init, targets and schedule:
    those runs trained the small CNN on the true labels at a constant learning rate."""
    how = "FGSM with a random start" if c["steps"] == 1 else f"PGD-{c['steps']}"
    net = "a copy of the model, fine-tuned from its weights," if c.get("init", "scratch") == "model" else "the small CNN"
    targets = "the model's softmax as soft targets (robust distillation)" if c.get("targets", "labels") == "softmax" else "the true labels"
    lr = "a cosine learning rate" if c.get("schedule", "constant") == "cosine" else "a constant learning rate"
    return f"{net} trained by {how} adversarial training at eps {c['eps']:g} for {c['epochs']} epochs on the fit images, with {targets} and {lr}"


def checker_line(c: dict[str, Any]) -> str:
    """What the bench's robust checker is and how far it agrees with the model (``hfguard bench --checker``)."""
    cached = "loaded from the cache; its" if c["loaded_from_cache"] else "its"
    return (f"Robust checker (`hfguard + robust checker`): {checker_recipe(c)} ({cached} training took {c['training_seconds']:.0f} s); clean test accuracy "
            f"{c['test_accuracy']:.3f}, agreement with the model {c['test_agreement_with_model']:.3f} on the test images and "
            f"{c['agreement_with_model']:.3f} on the calibration images; {c['classes_on_pooled_tail']} classes take the pooled tail of its term "
            f"(fewer than {c['min_class_rows']} calibration rows).")


def adaptive_table(run: dict[str, Any]) -> str:
    """Rows: eps x attack; columns: hfguard and the strongest peer; evasion rate (misclassified rate)."""
    ad = run["adaptive"]
    dets = list(ad["detectors"])
    lines = ["| eps | attack | " + " | ".join(f"{d} evasion (misclassified)" for d in dets) + " |", "|---|---|" + "---|" * len(dets)]
    first = ad["detectors"][dets[0]]
    for eps in first:
        # every detector's attacks, in order (hfguard's BPDA row and a checker's joint attack are not everyone's)
        attacks = list(dict.fromkeys(a for d in dets for a in ad["detectors"][d][eps] if a != "best of all (per image)")) + ["best of all (per image)"]
        for att in attacks:
            cells = []
            for d in dets:
                r = ad["detectors"][d][eps].get(att)
                cells.append(("n/a (no filter)" if "BPDA" in att else "n/a") if r is None else f"{r['evasion_rate']:.3f} ({r['misclassified_rate']:.3f})")
            lines.append(f"| {eps.split('=')[1]} | {att} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def source_weights(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per head, the summed absolute weight of each source's features (layers, logits, spectrum, margin) as a share of the head's total."""
    out: dict[str, dict[str, float]] = {}
    for head, weights in report.get("heads", {}).items():
        per: dict[str, float] = {}
        for name, w in weights.items():
            src = name.rpartition(":")[0] or name
            per[src] = per.get(src, 0.0) + abs(w)
        total = sum(per.values()) or 1.0
        out[head] = {k: v / total for k, v in per.items()}
    return out


def learned_table(run: dict[str, Any]) -> str:
    """What hfguard's self-attack calibration learned: the share of each source in each head, and what the fit cost."""
    rep = run.get("hfguard_fit_report", {})
    shares = source_weights(rep)
    if not shares:
        return "hfguard was fitted with `calibration='clean'` (no heads learned)."
    sources = list(next(iter(shares.values())))
    lines = ["| head | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
    for head, per in shares.items():
        lines.append(f"| {head} | " + " | ".join(f"{per[s]:.0%}" for s in sources) + " |")
    sa = rep.get("self_attacks", {})
    sec = rep.get("seconds", {})
    fam = ", ".join(f"{f} {sa['succeeded'][f]}/{sa['attempted'][f]}" for f in sa.get("attempted", {}))
    lines += ["", f"Self-attacks: {sa.get('images', 0)} clean images attacked (successful/attempted: {fam}). Fit time: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in sec.items()) + "."]
    shared = sa.get("heads_on_their_regime", [])
    if shared:
        regimes = sa.get("families", {})
        named = ", ".join(f"{h} ({regimes.get(h, 'its regime')})" for h in shared)
        lines.append(f"Heads learned from their whole regime (fewer than {MIN_FAMILY_ROWS} successful self-attacks of their own family, so they are "
                     f"copies of one regime head, counted once by the smooth maximum): {named}.")
    if "fpr_if_calibrated_on_fit_data" in rep:
        lines.append(f"A threshold set on the fit data instead of the calibration split would have flagged "
                     f"{rep['fpr_if_calibrated_on_fit_data']:.3f} of the calibration images (target {run.get('target_fpr', 0.05):.2f}).")
    return "\n".join(lines)


#: the bench's attack names -> the self-attack family of the same kind, if hfguard generates one during fit
def _generated_kind(attack: str, families: list[str], shared: tuple[str, ...] = ()) -> str:
    a = attack.lower()
    kind = ("fgsm-linf" if "fgsm" in a else "pgd-l2" if "l2" in a and "pgd" in a else "pgd-linf" if "pgd" in a and "apgd" not in a
            else "square-linf" if "square" in a else "cw-l2" if "cw" in a else None)
    if kind is None:
        return "never generated"
    if kind not in families:
        return f"never generated (`{kind}` left out)"
    return f"same kind as `{kind}`" + (" (generated, but its head is its regime's: too few successes)" if kind in shared else "")


def generalisation_table(run: dict[str, Any], detector: str = "hfguard") -> str:
    """hfguard's AUROC and TPR per bench attack, marking the attacks whose kind it never generated during fit."""
    sa = run.get("hfguard_fit_report", {}).get("self_attacks", {})
    fams, shared = list(sa.get("attempted", {})), tuple(sa.get("heads_on_their_regime", ()))
    d = run["detectors"][detector]
    lines = ["| tested on | trained on (self-attacks during fit) | AUROC | TPR |", "|---|---|---|---|"]
    for name, m in d["attacks"].items():
        lines.append(f"| {name} | {_generated_kind(name, fams, shared) if fams else 'clean only'} | {_f(m['auroc'])} | {_f(m['tpr'])} |")
    return "\n".join(lines)


def summary_table(run: dict[str, Any]) -> str:
    """AUROC per attack (no intervals) plus clean FPR, TPR on the strongest PGD, latency and fit time per detector."""
    dets = list(run["detectors"])
    lines = auroc_table(run, ci=False).splitlines()
    pgd = next(a for a in run["attacks"] if a.startswith("PGD-Linf"))
    rows = [
        (f"*TPR on {pgd} at the threshold*", lambda d: _f(d["attacks"][pgd]["tpr"])),
        ("*measured clean FPR (target 5 %)*", lambda d: _f(d["clean_fpr"])),
        ("*latency vs bare forward*", lambda d: f"{d['latency']['ratio']:.2f}x"),
        ("*fit time (s)*", lambda d: f"{d['fit_s']:.0f}" if d["fit_s"] >= 1 else f"{d['fit_s']:.1f}"),
    ]
    for label, fn in rows:
        lines.append(f"| {label} | | " + " | ".join(fn(run["detectors"][d]) for d in dets) + " |")
    return "\n".join(lines)


def adaptive_summary(run: dict[str, Any]) -> str:
    """Per eps: hfguard vs the strongest peer, best-of-all evasion and its strongest single attack."""
    ad = run["adaptive"]["detectors"]
    dets = list(ad)
    lines = ["| eps | " + " | ".join(f"{d}: evasion, best of all attacks (strongest single attack)" for d in dets) + " |", "|---|" + "---|" * len(dets)]
    for eps in ad[dets[0]]:
        cells = []
        for d in dets:
            r = ad[d][eps]
            single = {k: v for k, v in r.items() if k != "best of all (per image)"}
            top = max(single, key=lambda k: single[k]["evasion_rate"])
            masking = next((v["evaded_only_without_gradients"] for v in single.values() if "evaded_only_without_gradients" in v), None)
            note = "" if masking is None else f"; evaded only by the gradient-free search: {masking:.3f}"
            cells.append(f"**{r['best of all (per image)']['evasion_rate']:.3f}** ({top}: {single[top]['evasion_rate']:.3f}{note})")
        lines.append(f"| {eps.split('=')[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """The full report of :func:`hfguard.bench.run.run_bench`'s result."""
    cfg, v = result["config"], result["versions"]
    out = [
        f"# hfguard bench: {result['dataset']}",
        "",
        f"Command: `{result['command']}` ({result['machine']}; torch {v['torch']}, torchattacks {v['torchattacks']}, pytorch-ood {v['pytorch-ood']}; "
        f"{result['seconds'] / 60:.1f} min in all).",
        "",
        *([f"**Partial result:** the run stopped after {', '.join(result['runs'])} of {', '.join(cfg['archs'])}.", ""]
          if result.get("complete") is False else []),
        f"Every detector is fitted on the same clean training images; the peers' thresholds are calibrated at {cfg['fpr']:.0%} FPR on "
        f"{cfg['n_cal']} held-out clean training images that the model never trained on; hfguard sets its threshold on the same images "
        "(`fit(..., calibration_data=...)`). Only successful "
        "adversarials count (clean image correct, adversarial wrong); AUROC is against the clean scores of every test image, with a "
        "bootstrap 95 % interval. SpectralDefense (marked *) is not clean-fitted: it is trained on FGSM images of training data, so its "
        "FGSM column is in-distribution for it. Latency: the detector's deployed call (logits + score) over the bare forward, "
        f"batch {cfg['latency_batch']}, median of {cfg['latency_repeats']} interleaved pairs in the same run. Twin gap: largest "
        "|differentiable twin - real score| over the clean score spread (the twin steers the adaptive attacks; evasion is judged on the real score).",
    ]
    if not cfg.get("peers", True):
        out[-1] += (" **No peers or ablations ran in this run** (`--no-peers`): only hfguard" + (" and hfguard with the robust checker, the "
                    "only detector attacked adaptively here (hfguard alone and the peers under the same attacks: the main bench)" if cfg.get("checker") else "")
                    + "; the sentences on peers describe the full bench.")
    for arch, run in result["runs"].items():
        run = {**run, "target_fpr": cfg["fpr"]}
        out += [
            "",
            f"## {arch}: clean accuracy {run['clean_accuracy']:.3f} ({run['parameters']:,} parameters"
            + (f"; weights sha256 {run['weights_sha256'][:16]}" if "weights_sha256" in run else "") + ")",
            "",
            f"Fitted on {run['n_fit']} images; tested on the first {run['n_test']} test images (torchattacks on the first {cfg['n_cross']}); "
            f"hfguard watches {run['hfguard_layers']} and scores {run['hfguard_score_features']}. {run['seconds'] / 60:.1f} min.",
            *(["", checker_line(run["checker"])] if "checker" in run else []),
            "",
            "### AUROC [95 % CI] (best per row in bold)",
            "",
            auroc_table(run),
            "",
            "### TPR at the calibrated threshold",
            "",
            tpr_table(run),
            "",
            "### Caught or correct (flagged, or correct after the defence; hfguard's filter policy filters flagged inputs only, so its rate equals its "
            "TPR, and the bracket gives the share of adversarials it also labels correctly; the peers only flag)",
            "",
            caught_table(run),
            "",
            "### Cost",
            "",
            cost_table(run),
            "",
            "### What hfguard learned (share of each source's absolute weight per head) and what its fit cost",
            "",
            learned_table(run),
            "",
            "### Generalisation: attacks hfguard generated during fit vs the attacks it is tested on",
            "",
            "Budgets of the self-attacks are random (L-inf 0.01-0.15, the random search 0.06-0.15, L2 proportional; CW has none), on training images; no test image is used. "
            f"APGD is never generated. The bench's CW ({cfg['cw_steps']} steps) is of the kind of the `cw-l2` family (hfguard's own "
            f"CW-L2, {CW_STEPS} steps) and torchattacks' Square ({cfg['square_queries']} queries) of the `square-linf` family "
            f"(hfguard's own random search with Square's proposals, {SQUARE_QUERIES} queries), when the fit generated them (second "
            "column); the leave-one-family-out columns of the main table (`w/o ...`) are fits that never generate that kind.",
            "",
            generalisation_table(run),
            "",
            "### Own attacks vs torchattacks (same images, same budget)",
            "",
            crosscheck_table(run),
            "",
            f"### Adaptive attacks ({run['adaptive']['n_images']} images, {run['adaptive']['n_correct']} correctly classified; {run['adaptive']['steps']} steps): "
            + (f"hfguard vs the strongest peer, {run['strongest_baseline']}" if run.get("strongest_baseline") else
               ", ".join(run["adaptive"]["detectors"]) + " (no peers in this run)"),
            "",
            "Evasion = misclassified by the defended pipeline and not flagged by the real score at its threshold. Per image, the pipeline PGD "
            "(and BPDA) keeps its first iterate that evades the real score, the weighted sums (CE - lambda * score) their first that evades "
            "the attack's differentiable twin of the score with a margin, selective and orthogonal PGD the misclassified iterate with the "
            "lowest twin score below the threshold, the query attack its lowest objective; the feature trajectory (the same images "
            "for every detector) ends at its last iterate. The best of all counts an image evaded by any of them.",
            "",
            adaptive_table(run),
        ]
    return "\n".join(out) + "\n"
