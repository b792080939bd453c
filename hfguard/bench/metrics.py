"""Metrics per (detector, attack), computed the same way for every detector.

* Only successful adversarials count: the clean image was classified
  correctly and its adversarial is not.
* AUROC: adversarial scores against the clean scores of every test image,
  with a bootstrap 95 % interval.
* TPR at the detector's threshold, calibrated on held-out clean *training*
  images at the target FPR; the clean FPR measured on the test images sits beside it.
* Caught or correct: flagged, or classified correctly by the defended pipeline
  (hfguard's filter policy; the model itself for flag-only detectors).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from hfguard.bench.peers import Detector
from hfguard.evaluate import auroc

__all__ = ["CleanView", "clean_view", "attack_metrics"]


class CleanView:
    """A detector's clean test scores, flags and defended predictions (computed once, reused for every attack)."""

    def __init__(self, scores: Tensor, flagged: Tensor, repaired: Tensor, y: Tensor, correct: Tensor) -> None:
        self.scores, self.flagged, self.repaired, self.y, self.correct = scores, flagged, repaired, y, correct

    def summary(self) -> dict[str, float]:
        acc = float(self.correct.float().mean())
        defended = float((self.repaired == self.y).float().mean())
        return {"clean_fpr": float(self.flagged.float().mean()), "clean_accuracy_defended": defended, "clean_accuracy_cost": acc - defended}


def clean_view(detector: Detector, x: Tensor, y: Tensor, correct: Tensor) -> CleanView:
    scores, repaired = detector.outputs(x)
    return CleanView(scores, scores > detector.threshold, repaired, y, correct)


def attack_metrics(detector: Detector, clean: CleanView, x_adv: Tensor, ok: Tensor, y: Tensor, *, bootstrap: int = 200) -> dict[str, Any]:
    """Metrics of one detector on one attack's images; ``ok`` marks the successful adversarials."""
    n_ok = int(ok.sum())
    if n_ok == 0:
        return {"n_successful": 0, "auroc": float("nan"), "auroc_ci95": [float("nan")] * 2, "tpr": float("nan"), "caught_or_correct": float("nan"), "_scores": x_adv.new_zeros(0)}
    xs = x_adv[ok]
    scores, repaired = detector.outputs(xs)
    flagged = scores > detector.threshold
    repaired_ok = repaired == y[ok]
    a, lo, hi = auroc(clean.scores, scores, bootstrap=bootstrap)
    return {
        "n_successful": n_ok,
        "auroc": a,
        "auroc_ci95": [lo, hi],
        "tpr": float(flagged.float().mean()),
        "caught_or_correct": float((flagged | repaired_ok).float().mean()),
        "repaired": float(repaired_ok.float().mean()),
        "_scores": scores,
    }
