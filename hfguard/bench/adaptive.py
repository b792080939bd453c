"""Adaptive attacks: attacks that know the defence, reported as evasion rates.

Evasion: the clean image was classified correctly, and the attacked image is
misclassified by the defended pipeline *and* not flagged by the detector's
real score at its calibrated threshold (the twin score only steers the attack).

1. ``pipeline PGD``: PGD on what the deployment returns. For hfguard that is
   ``guard(x)`` under the filter policy: the Gaussian filter is differentiable,
   so the true gradient flows through it; a BPDA variant (identity backward
   through the filter) is run as well. The guard is deterministic, so EOT has
   one sample. For flag-only peers the deployment returns the model's logits,
   so this is PGD on the model.
2. ``CE - lambda * score``: PGD maximising cross-entropy minus lambda times the
   detector's score standardised on clean data, lambda swept; and the same sum
   with one lambda per image, adapted during the run
   (:func:`hfguard.attacks.weighted_pgd`).
3. ``orthogonal PGD`` (Bryniarski et al. 2022): steps on the classification
   loss until misclassified, then lowers the score with its gradient
   projected orthogonally to the classification gradient.
4. ``feature trajectory``: targeted at each image's runner-up class, pushes
   every watched layer's activations (and the logits) toward that class's
   expectations under hfguard's fitted Gaussians: the attack the paper's
   theory suggests. The same images are scored by every detector.

5. ``joint targeted PGD`` (only for a guard with a checker network, :mod:`hfguard.checker`): at each image's
   runner-up class, both networks pushed there from the first step while the combined score is lowered
   (maximise ``-CE(model, t) - CE(checker, t) - score``); the first iterate that evades the real score.

6. ``query attack``: a gradient-free random search (Square attack's proposals) on
   "misclassified and real score below the threshold"; images it evades on where
   no gradient attack did are reported as ``evaded_only_without_gradients``: the
   check for gradient masking (it should be about zero).

Iterates kept per image: 1 and 5 keep the first iterate that evades the real
score and 2 the first that evades its differentiable twin (with a margin),
else the last; 3 (and the selective variants) the misclassified iterate with
the lowest twin score below the threshold; 6 its lowest objective; 4 ends at
its last iterate (its images are shared by every detector).
``best of all (per image)`` counts an image as evaded when any attack above
evaded on it: the number to quote as the detector's adaptive robustness.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hfguard.attacks import detector_pgd, evasion_loss, orthogonal_pgd, pgd, random_search, weighted_pgd
from hfguard.bench.peers import Detector, HFGuardDetector
from hfguard.filters import lowpass

__all__ = ["evasion", "pipeline_pgd", "bpda_filter_pgd", "lambda_pgd", "per_image_lambda_pgd", "trajectory_attack", "joint_targeted_pgd", "query_attack",
           "adaptive_suite"]


def evasion(detector: Detector, x_adv: Tensor, y: Tensor, correct: Tensor, *, defended: bool = False) -> dict[str, float]:
    """Evasion and misclassification rates over the correctly classified clean images."""
    scores, pred = detector.outputs(x_adv, defended=defended)
    flagged = scores > detector.threshold
    wrong = correct & (pred != y)
    n = correct.sum().clamp_min(1)
    return {"evasion_rate": float((wrong & ~flagged).sum() / n), "misclassified_rate": float(wrong.sum() / n), "_evaded": wrong & ~flagged, "_wrong": wrong}


def _union(results: dict[str, dict[str, Any]], n: int) -> dict[str, float]:
    """Per image: evaded if ANY of the attacks evaded (the attacker keeps whichever image works)."""
    evaded = torch.stack([r["_evaded"] for r in results.values()]).any(0)
    wrong = torch.stack([r["_wrong"] for r in results.values()]).any(0)
    return {"evasion_rate": float(evaded.sum() / max(1, n)), "misclassified_rate": float(wrong.sum() / max(1, n))}


def _evades(detector: Detector, scale: float) -> Any:
    """``pgd``'s ``success``: the iterate evades the deployment's real score and logits (:func:`_pipeline_loss` is 0)."""
    return lambda _logits, y, xa: _pipeline_loss(detector, xa, y, scale) == 0


def pipeline_pgd(detector: Detector, x: Tensor, y: Tensor, eps: float, steps: int, scale: float) -> Tensor:
    """PGD with true gradients on the deployed logits (hfguard: the filter policy); per image the first iterate
    that evades the real score, else the last."""
    target = detector.filter_policy() if isinstance(detector, HFGuardDetector) else detector.model
    return pgd(target, x, y, eps, steps=steps, success=_evades(detector, scale))


def bpda_filter_pgd(detector: HFGuardDetector, x: Tensor, y: Tensor, eps: float, steps: int, scale: float) -> Tensor:
    """PGD through hfguard's filter policy with BPDA: the filter's forward, the identity's gradient (best iterate
    as in :func:`pipeline_pgd`)."""
    guard, model = detector.guard, detector.model
    sigma = float(guard.sigma_)

    def defended(xr: Tensor) -> Tensor:
        with torch.no_grad():
            flagged = guard.detect(xr)
        xf = xr + (lowpass(xr, sigma) - xr).detach()
        return torch.where(flagged[:, None], model(xf), model(xr))

    return pgd(defended, x, y, eps, steps=steps, success=_evades(detector, scale))


def lambda_pgd(detector: Detector, x: Tensor, y: Tensor, eps: float, steps: int, lam: float, scale: float) -> Tensor:
    """PGD on ``CE - lam * (score - threshold) / scale`` (one forward pass per step gives both terms); per image the
    first iterate that evades the attack's own (twin) score, else the last."""
    held: dict[str, Tensor] = {}

    def model(xr: Tensor) -> Tensor:
        logits, held["score"] = detector.diff_both(xr)
        return logits

    def loss(logits: Tensor, yy: Tensor, _xr: Tensor) -> Tensor:
        return F.cross_entropy(logits, yy, reduction="none") - lam * (held["score"] - detector.threshold) / scale

    def evades(logits: Tensor, yy: Tensor, _xa: Tensor) -> Tensor:  # the score of the same pass as ``logits``
        return evasion_loss(logits, yy, held["score"].detach(), detector.threshold, scale) == 0

    return pgd(model, x, y, eps, steps=steps, loss_fn=loss, success=evades)


def per_image_lambda_pgd(detector: Detector, x: Tensor, y: Tensor, eps: float, steps: int, scale: float) -> Tensor:
    """``CE - lambda_i * score`` with one lambda per image adapted during the run (:func:`hfguard.attacks.weighted_pgd`)."""
    return weighted_pgd(detector.diff_both, x, y, eps, threshold=detector.threshold, scale=scale, steps=steps)


def _runner_up(model: Any, x: Tensor, y: Tensor) -> Tensor:
    """(N,) each image's most likely class under ``model`` other than its label: the target of the targeted attacks."""
    with torch.no_grad():
        logits = model(x)
    return logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).argmax(1)


def trajectory_attack(guard: Any, x: Tensor, y: Tensor, eps: float, steps: int) -> Tensor:
    """Targeted PGD lowering, at every watched layer and the logits, the distance to the runner-up class's expectation."""
    target = _runner_up(guard.model, x, y)
    n_sources = len(guard.layers) + 1  # watched layers and the logits (not the input spectrum)
    rows = torch.arange(len(x))

    def loss(_logits: Tensor, _y: Tensor, xr: Tensor) -> Tensor:
        d = guard.inspect(xr, differentiable=True).distances[:, :n_sources]
        return -d[rows, :, target].sum(1)

    return pgd(guard.model, x, y, eps, steps=steps, loss_fn=loss)


#: the checker-aware attack's name in the results
JOINT = "joint targeted PGD (model and checker to the runner-up, minus the score)"


def joint_targeted_pgd(detector: HFGuardDetector, x: Tensor, y: Tensor, eps: float, steps: int, scale: float) -> Tensor:
    """For a guard with a checker network: PGD maximising ``-CE(model, t) - CE(checker, t) - score`` at each image's
    runner-up class ``t``, so that the checker backs the model's wrong answer from the first step; per image the
    first iterate that evades the real score, else the last."""
    guard = detector.guard
    net = guard._checker()
    target = _runner_up(guard.model, x, y)
    held: dict[str, Tensor] = {}

    def model(xr: Tensor) -> Tensor:
        out, held["score"] = guard.logits_and_score(xr)
        return out

    def loss(out: Tensor, t: Tensor, xr: Tensor) -> Tensor:
        return -F.cross_entropy(out, t, reduction="none") - F.cross_entropy(net(xr), t, reduction="none") - held["score"]

    return pgd(model, x, target, eps, steps=steps, loss_fn=loss, success=lambda _o, _t, xa: _pipeline_loss(detector, xa, y, scale) == 0)


def _pipeline_loss(detector: Detector, xa: Tensor, y: Tensor, scale: float) -> Tensor:
    """Zero exactly when ``xa`` is misclassified and its real score is below the threshold; larger the farther it is."""
    with torch.no_grad():
        logits, scores = detector.deployed(xa)
    return evasion_loss(logits, y, scores, detector.threshold, scale)


def query_attack(detector: Detector, x: Tensor, y: Tensor, eps: float, queries: int, scale: float, seed: int = 0) -> Tensor:
    """Gradient-free L-inf random search (:func:`hfguard.attacks.random_search`, Square attack's proposals) on the
    pipeline objective "misclassified and real score below the threshold": the check for gradient masking.

    It never uses a gradient, so a detector whose gradients mislead the white-box attacks is caught out here.
    """
    return random_search(lambda cand, rows: _pipeline_loss(detector, cand, y[rows], scale), x, eps, queries, seed=seed)


#: the stronger detector-aware PGD variants (issue 12): selective steps, and a high-confidence margin loss
DETECTOR_PGD = {
    "selective PGD (CE)": ("selective", "ce", 0.0),
    "orthogonal PGD (margin, kappa 5)": ("orthogonal", "margin", 5.0),
    "selective PGD (margin, kappa 5)": ("selective", "margin", 5.0),
}


def adaptive_suite(
    detectors: list[Detector], guard_detector: HFGuardDetector, x: Tensor, y: Tensor, eps_list: list[float], *,
    steps: int, pgd_steps: int, lambdas: list[float], scales: dict[str, float], queries: int = 0, progress: bool = True,
) -> dict[str, Any]:
    """Every adaptive attack at every eps against each of ``detectors``; the trajectory images are shared."""
    from tqdm.auto import tqdm

    model = guard_detector.model
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    res: dict[str, Any] = {"n_images": len(x), "n_correct": int(correct.sum()), "steps": steps, "detectors": {d.name: {} for d in detectors}}
    jobs = [(eps, d) for eps in eps_list for d in detectors]
    bar = tqdm(total=len(jobs) * (5 + len(lambdas) + len(DETECTOR_PGD)), desc="adaptive attacks", disable=not progress, leave=False)
    for eps in eps_list:
        xt = trajectory_attack(guard_detector.guard, x, y, eps, steps)
        for d in detectors:
            r: dict[str, Any] = {}
            r["pipeline PGD"] = evasion(d, pipeline_pgd(d, x, y, eps, pgd_steps, scales[d.name]), y, correct, defended=True)
            if isinstance(d, HFGuardDetector):
                r["pipeline PGD (BPDA through the filter)"] = evasion(d, bpda_filter_pgd(d, x, y, eps, pgd_steps, scales[d.name]), y, correct, defended=True)
            bar.update()
            for lam in lambdas:
                r[f"CE - {lam:g} * score"] = evasion(d, lambda_pgd(d, x, y, eps, steps, lam, scales[d.name]), y, correct)
                bar.update()
            r["CE - lambda_i * score (lambda per image)"] = evasion(d, per_image_lambda_pgd(d, x, y, eps, steps, scales[d.name]), y, correct)
            bar.update()
            r["orthogonal PGD"] = evasion(d, orthogonal_pgd(model, d.diff_score, x, y, eps, threshold=d.threshold, steps=steps), y, correct)
            bar.update()
            for name, (mode, loss, kappa) in DETECTOR_PGD.items():
                xa = detector_pgd(model, d.diff_score, x, y, eps, threshold=d.threshold, mode=mode, loss=loss, kappa=kappa, steps=steps)
                r[name] = evasion(d, xa, y, correct)
                bar.update()
            r["feature trajectory"] = evasion(d, xt, y, correct)
            if isinstance(d, HFGuardDetector) and d.guard._checker() is not None:
                r[JOINT] = evasion(d, joint_targeted_pgd(d, x, y, eps, steps, scales[d.name]), y, correct)
                bar.total += 1
                bar.update()
            if queries:
                white_box = torch.stack([v["_evaded"] for v in r.values()]).any(0)
                q = evasion(d, query_attack(d, x, y, eps, queries, scales[d.name]), y, correct)
                # the masking check: images the gradient-free search evades on while no gradient attack did
                q["evaded_only_without_gradients"] = float((q["_evaded"] & ~white_box).sum() / correct.sum().clamp_min(1))
                r[f"query attack (gradient-free, {queries} queries)"] = q
            r["best of all (per image)"] = _union(r, int(correct.sum()))
            bar.update()
            res["detectors"][d.name][f"eps={eps}"] = r
    bar.close()
    return res
