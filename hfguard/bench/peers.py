"""The detectors the benchmark compares, behind one contract.

Every detector has:

* ``fit(x, y)`` on clean images (SpectralDefense also takes adversarial training images) -> self;
* ``score(x)``: the *real* implementation's score (pytorch-ood where the method lives there), no gradient;
* ``diff_score(x)``: a differentiable twin built from the same fitted state, used by adaptive attacks
  (pytorch-ood runs its scores under ``no_grad`` and detaches features, so attacking its own call would
  get no gradient and the detector would look unbreakable); the benchmark checks twin == real;
* ``deployed(x) -> (logits, score)``: what a deployment runs per batch, timed for the latency ratio;
* ``outputs(x)``: scores and the defended pipeline's predictions in one pass per batch (the model's own
  predictions for flag-only detectors; hfguard's filter policy for hfguard).

Higher scores mean "more adversarial" for every detector.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hfguard.bench.taps import last_linear, tapped_features, tapped_forward
from hfguard.calibrate import threshold_at_fpr
from hfguard.errors import MissingDependencyError
from hfguard.evaluate import with_policy

__all__ = [
    "Detector",
    "HFGuardDetector",
    "MaxSoftmaxPeer",
    "EnergyPeer",
    "MahalanobisPeer",
    "MultiMahalanobisPeer",
    "FeatureSqueezingPeer",
    "SpectralDefensePeer",
    "require",
    "twin_gap",
    "median_filter",
    "fgsm_training_set",
]


def require(module: str) -> Any:
    """Imports an optional dependency of the ``bench`` extra, or says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"the benchmark needs {module!r} (torchattacks and pytorch-ood run the peers for real); install them with: pip install 'hfguard[bench]'"
        ) from exc


class Detector(ABC):
    """Base class: a detector over a fixed eval-mode ``model`` (pixels in [0, 1])."""

    name = ""
    implementation = ""
    trained_on = "clean images"

    def __init__(self, model: nn.Module, batch_size: int = 512) -> None:
        self.model = model
        self.batch_size = batch_size
        self.threshold = float("nan")

    def fit(self, x: Tensor, y: Tensor) -> "Detector":
        return self

    @abstractmethod
    def score(self, x: Tensor) -> Tensor:
        """The real implementation's score (N,), without gradient; higher = more adversarial."""

    @abstractmethod
    def diff_score(self, x: Tensor) -> Tensor:
        """A differentiable twin of :meth:`score` built from the same fitted state."""

    def diff_both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Differentiable ``(logits, twin score)``; subclasses share one forward pass where they can."""
        return self.model(x), self.diff_score(x)

    def deployed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, score)`` of one batch as a deployment computes them."""
        with torch.no_grad():
            return self.model(x), self.score(x)

    def defended(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, score)`` of the defended pipeline; flag-only detectors leave the logits alone."""
        return self.deployed(x)

    def outputs(self, x: Tensor, *, defended: bool = True) -> tuple[Tensor, Tensor]:
        """``(scores, predicted classes)`` over ``x`` in batches, one pass per batch."""
        fn = self.defended if defended else self.deployed
        scores, preds = [x.new_zeros(0)], [torch.zeros(0, dtype=torch.long, device=x.device)]
        with torch.no_grad():
            for i in range(0, len(x), self.batch_size):
                logits, s = fn(x[i : i + self.batch_size])
                scores.append(s)
                preds.append(logits.argmax(1))
        return torch.cat(scores), torch.cat(preds)

    def score_all(self, x: Tensor) -> Tensor:
        return self._batched(self.score, x)

    def calibrate(self, x_clean: Tensor, fpr: float) -> float:
        """Threshold at the ``1 - fpr`` quantile of held-out clean scores."""
        self.threshold = threshold_at_fpr(self.score_all(x_clean), fpr)
        return self.threshold

    def _batched(self, fn: Any, x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([fn(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)]) if len(x) else x.new_zeros(0)


class HFGuardDetector(Detector):
    """hfguard itself: ``guard.check`` (score and flag) and the filter policy's predictions."""

    name = "hfguard"
    implementation = "hfguard"

    def __init__(self, model: nn.Module, fpr: float = 0.05, batch_size: int = 512, **options: Any) -> None:
        super().__init__(model, batch_size)
        self.fpr, self.options = fpr, options
        if options:
            self.implementation = "hfguard (" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")"
        if options.get("calibration", "self-attack") == "self-attack":
            self.trained_on = "clean images (+ attacks it generates on them in fit)"
        self.guard: Any = None

    def fit(self, x: Tensor, y: Tensor, x_cal: Tensor | None = None) -> "HFGuardDetector":
        """Fits on clean ``(x, y)``; with ``x_cal`` (clean images the model never trained on) the threshold
        is set on them, as the peers' is (``calibration_data``)."""
        import hfguard

        self.guard = hfguard.protect(self.model, fpr=self.fpr, progress=False, **self.options).fit((x, y), calibration_data=x_cal)
        self.threshold = self.guard.threshold
        return self

    def calibrate(self, x_clean: Tensor, fpr: float) -> float:
        """hfguard sets its threshold inside ``fit`` (on ``x_cal`` when given); this keeps it."""
        return self.threshold

    def score(self, x: Tensor) -> Tensor:
        return self.guard.check(x).score

    def diff_score(self, x: Tensor) -> Tensor:
        return self.guard.score(x)

    def diff_both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.guard.logits_and_score(x)

    def deployed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        v = self.guard.check(x)
        return v.logits, v.score

    def defended(self, x: Tensor) -> tuple[Tensor, Tensor]:
        v = self.filter_policy().check(x)  # same score; flagged rows filtered and classified again
        return v.logits, v.score

    def filter_policy(self) -> Any:
        """The same fitted guard under ``policy="filter"`` (shares its state)."""
        return with_policy(self.guard, "filter")


class _LogitPeer(Detector):
    cls_name = ""

    def __init__(self, model: nn.Module, batch_size: int = 512) -> None:
        super().__init__(model, batch_size)
        self.detector = getattr(require("pytorch_ood.detector"), self.cls_name)(None)

    def score(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.detector.predict_logits(self.model(x))

    def diff_score(self, x: Tensor) -> Tensor:
        return self.diff_both(x)[1]

    def diff_both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(x)
        return logits, type(self.detector).score(logits)

    def deployed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            logits = self.model(x)
            return logits, self.detector.predict_logits(logits)


class MaxSoftmaxPeer(_LogitPeer):
    """Hendrycks & Gimpel (2017): negative maximum softmax probability (pytorch-ood ``MaxSoftmax``)."""

    name = "max-softmax"
    implementation = "pytorch-ood MaxSoftmax"
    cls_name = "MaxSoftmax"


class EnergyPeer(_LogitPeer):
    """Liu et al. (2020): negative log-sum-exp of the logits (pytorch-ood ``EnergyBased``)."""

    name = "energy"
    implementation = "pytorch-ood EnergyBased"
    cls_name = "EnergyBased"


def _half_min_mahalanobis(z: Tensor, mu: Tensor, precision: Tensor) -> Tensor:
    """pytorch-ood's score: half the squared Mahalanobis distance to the closest class centre (differentiable)."""
    d = z[:, None, :] - mu[None]
    return 0.5 * torch.einsum("nkd,de,nke->nk", d, precision, d).min(1).values


class MahalanobisPeer(Detector):
    """Lee et al. (2018) on the penultimate features (the input of the last ``nn.Linear``), pytorch-ood ``Mahalanobis``."""

    name = "Mahalanobis"
    implementation = "pytorch-ood Mahalanobis (penultimate)"

    def __init__(self, model: nn.Module, batch_size: int = 512) -> None:
        super().__init__(model, batch_size)
        self.detector = require("pytorch_ood.detector").Mahalanobis(None)
        self.layer = last_linear(model)

    def fit(self, x: Tensor, y: Tensor) -> "MahalanobisPeer":
        _, (z,) = tapped_features(self.model, x, inputs=[self.layer], batch_size=self.batch_size)
        self.detector.fit_features(z, y)
        return self

    def deployed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            logits, (z,) = tapped_forward(self.model, x, inputs=[self.layer])
            return logits, self.detector.predict_features(z)

    def score(self, x: Tensor) -> Tensor:
        return self.deployed(x)[1]

    def diff_score(self, x: Tensor) -> Tensor:
        return self.diff_both(x)[1]

    def diff_both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, (z,) = tapped_forward(self.model, x, inputs=[self.layer])
        return logits, _half_min_mahalanobis(z, self.detector.mu, self.detector.precision)


class MultiMahalanobisPeer(Detector):
    """Lee et al. (2018) over several layers plus the logits (pytorch-ood ``MultiMahalanobis``, unweighted sum).

    Features come from ONE forward pass with hooks (each layer's spatial mean, as
    in the paper), fed to ``fit_structured`` / ``predict_structured``; pytorch-ood's
    own ``predict`` would rerun one model prefix per layer.
    """

    name = "MultiMahalanobis"
    implementation = "pytorch-ood MultiMahalanobis"

    def __init__(self, model: nn.Module, layers: Sequence[str], batch_size: int = 512) -> None:
        super().__init__(model, batch_size)
        self.layers = list(layers)
        mods = [model.get_submodule(n) for n in self.layers] + [nn.Identity()]
        self.detector = require("pytorch_ood.detector").MultiMahalanobis(mods)

    def fit(self, x: Tensor, y: Tensor) -> "MultiMahalanobisPeer":
        logits, zs = tapped_features(self.model, x, outputs=self.layers, batch_size=self.batch_size)
        self.detector.fit_structured([*zs, logits], y)
        return self

    def deployed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            logits, zs = tapped_forward(self.model, x, outputs=self.layers)
            return logits, self.detector.predict_structured([*zs, logits])

    def score(self, x: Tensor) -> Tensor:
        return self.deployed(x)[1]

    def diff_score(self, x: Tensor) -> Tensor:
        return self.diff_both(x)[1]

    def diff_both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, zs = tapped_forward(self.model, x, outputs=self.layers)
        d = self.detector
        return logits, sum(a * _half_min_mahalanobis(z, m, p) for a, z, m, p in zip(d.alpha, [*zs, logits], d.mu, d.precision))


def median_filter(x: Tensor, k: int) -> Tensor:
    """Median over k x k windows (reflect border), any k >= 1; for even k the window reaches one pixel further right/down
    and the lower of the two middle values is taken (Xu et al. use 2x2 on MNIST). Differentiable through the selected pixels."""
    if k <= 1:
        return x
    n, c, h, w = x.shape
    xp = F.pad(x, ((k - 1) // 2, k // 2, (k - 1) // 2, k // 2), mode="reflect")
    patches = F.unfold(xp, k).view(n, c, k * k, h * w)
    return patches.median(2).values.view(n, c, h, w)


class FeatureSqueezingPeer(Detector):
    """Xu et al. (2018): the largest L1 change of the softmax under bit-depth reduction or a median filter.

    Our implementation (no maintained PyTorch one exists); the twin passes
    gradients straight through the rounding of the bit-depth squeezer (BPDA)
    and through the median filter's selected pixels.
    """

    name = "feature squeezing"
    implementation = "hfguard (Xu et al. 2018)"

    def __init__(self, model: nn.Module, bits: int = 4, median: int = 3, batch_size: int = 512) -> None:
        super().__init__(model, batch_size)
        self.bits, self.median = bits, median
        self.name = f"feature squeezing ({bits}-bit" + (f", median {median}x{median})" if median > 1 else ")")

    def _squeezed(self, x: Tensor, straight_through: bool) -> list[Tensor]:
        levels = 2**self.bits - 1
        q = torch.round(x * levels) / levels
        if straight_through:
            q = x + (q - x).detach()
        return [q, median_filter(x, self.median)] if self.median > 1 else [q]

    def _both(self, x: Tensor, straight_through: bool) -> tuple[Tensor, Tensor]:
        logits = self.model(x)
        p = logits.softmax(1)
        return logits, torch.stack([(p - self.model(s).softmax(1)).abs().sum(1) for s in self._squeezed(x, straight_through)]).max(0).values

    def score(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self._both(x, False)[1]

    def deployed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return self._both(x, False)

    def diff_score(self, x: Tensor) -> Tensor:
        return self._both(x, True)[1]

    def diff_both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._both(x, True)


class SpectralDefensePeer(Detector):
    """Harder et al. (2021), SpectralDefense: logistic regression on the input's log Fourier magnitude.

    It is *not* clean-fitted: it learns from adversarial examples, here FGSM
    on training images (``x_adv`` in :meth:`fit`), and is tested on the other attacks.
    """

    name = "SpectralDefense (trained on FGSM)"
    implementation = "hfguard (scikit-learn LogisticRegression)"
    trained_on = "clean + FGSM training images"

    def __init__(self, model: nn.Module, batch_size: int = 512) -> None:
        super().__init__(model, batch_size)
        self.clf: Any = None

    @staticmethod
    def features(x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C*H*W) log(1 + |FFT2|)."""
        return torch.log1p(torch.fft.fft2(x).abs()).flatten(1)

    def fit(self, x: Tensor, y: Tensor, x_adv: Tensor | None = None) -> "SpectralDefensePeer":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if x_adv is None:
            raise ValueError("SpectralDefense learns from adversarial examples: pass x_adv (e.g. FGSM on training images)")
        feats = torch.cat([self.features(x), self.features(x_adv)]).double().numpy()
        labels = np.r_[np.zeros(len(x)), np.ones(len(x_adv))]
        self.clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1)).fit(feats, labels)
        scaler, lr = self.clf[0], self.clf[1]
        scale = torch.tensor(scaler.scale_, dtype=torch.float32)
        self._w = torch.tensor(lr.coef_[0], dtype=torch.float32) / scale
        self._b = float(lr.intercept_[0]) - float((torch.tensor(scaler.mean_, dtype=torch.float32) * self._w).sum())
        return self

    def score(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.tensor(self.clf.decision_function(self.features(x).double().numpy()), dtype=torch.float32)

    def diff_score(self, x: Tensor) -> Tensor:
        return self.features(x) @ self._w.to(x) + self._b


def twin_gap(detector: Detector, x: Tensor) -> float:
    """Largest |twin - real| score difference on ``x``, relative to the clean scores' spread (should be ~1e-5)."""
    with torch.no_grad():
        real, twin = detector.score(x).double(), detector.diff_score(x).double()
    return float((real - twin).abs().max() / real.std().clamp_min(1e-12))


def fgsm_training_set(model: nn.Module, x: Tensor, y: Tensor, eps: float, batch_size: int = 512) -> Tensor:
    """FGSM images of ``x`` (the training set SpectralDefense needs)."""
    from hfguard.attacks import fgsm

    return torch.cat([fgsm(model, x[i : i + batch_size], y[i : i + batch_size], eps) for i in range(0, len(x), batch_size)])
