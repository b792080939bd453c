"""The guard: learns clean class expectations, flags drifting inputs, filters them.

Method, in the words of the paper's three claims:

1. Per-class activations have stable expectations at every layer: at each
   watched layer (and at the logits) the guard fits K Gaussians with one shared
   covariance to pooled activations of clean data (:mod:`hfguard.stats`).
2. An adversarial example follows a trajectory from its origin class to the
   target: per layer, the evidence is the distance to the *predicted* class's
   expectation and how much closer another class is (:mod:`hfguard.evidence`).
3. The perturbation is mostly HF patterns of the target class: the same model
   is fitted to the log-power of the input's HF DCT blocks, giving class-wise HF
   signatures (:mod:`hfguard.spectrum`).

The evidence is standardised per predicted class on held-out clean data and
combined into one score (:mod:`hfguard.combiner`): by default with logistic
heads that the guard learns against attacks it generates on its own clean data
(:mod:`hfguard.selfattack`), so the weight of each layer and source fits the
model; the threshold is set at the requested clean false-positive rate on clean
data that took no part in those fits (:mod:`hfguard.fitting`).  Under ``policy="filter"`` flagged inputs are
low-pass filtered (:mod:`hfguard.filters`) and classified again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hfguard.errors import InputError, ModelError, SettingsError
from hfguard.fitting import fit_guard
from hfguard.modelpass import ModelPass
from hfguard.neighbours import BANK_ROWS
from hfguard.results import Inspection, Verdict
from hfguard.selfattack import resolve_families
from hfguard.settings import POLICIES, validate_settings

__all__ = ["Guard", "Verdict", "Inspection", "protect", "POLICIES"]

logger = logging.getLogger("hfguard")



class Guard(ModelPass):
    """Wraps a classifier; learns from clean data what its activations and spectra look like.

    Use :func:`hfguard.protect` to build one.  ``__init__`` only stores settings;
    :meth:`fit` learns and returns ``self``.

    Args:
        model: a classifier returning logits (N, K).
        layers: ``"auto"`` or a list of module names (as in ``model.named_modules()``).
        policy: ``"flag"`` (logits unchanged) or ``"filter"`` (flagged inputs are
            low-pass filtered and classified again).
        fpr: target false-positive rate on clean data for the threshold.
        normalize: ``(mean, std)`` per channel when the model expects normalised
            inputs; the guard's spectra and filter act on ``x * std + mean``.
        max_features: largest pooled feature dimension per layer.
        calibration_size: clean samples held out (reservoir-sampled) for the
            combination and the threshold; at most 30 % of the data (at least 40).
        filter_sigma: ``"auto"`` (choose from clean data) or a Gaussian sigma in pixels.
        max_filter_flip: with ``filter_sigma="auto"``, the largest fraction of
            clean predictions the filter may change.
        score_features: evidence combined into the score: ``"auto"`` (under
            ``calibration="self-attack"`` every source's three features, the kept
            linear probes' (``"<layer>->logits"``, :mod:`hfguard.probe`) and the
            margin; under ``"clean"`` the first watched layer's three features and
            the margin, the best clean-only set measured on Fashion-MNIST),
            ``"all"``, or a list of names from ``guard.fit_report["feature_names"]``
            such as ``"spectrum:gap"`` or ``"layer1->logits:distance"`` (a probe named
            here is kept even when near-linear).
        calibration: how the evidence is combined. ``"self-attack"`` (default):
            ``fit`` attacks a sample of the clean data (``attack_families``: FGSM,
            PGD L-inf/L2 and minimal PGD at random budgets, CW-L2, and a
            gradient-free random search) and learns one logistic head per attack
            family over the evidence;
            the score is their smooth maximum. ``"clean"``: no attack
            is generated; the score is the smooth maximum of the standardised
            evidence. Clean data only from the user either way.
        attack_size: clean images kept for the self-attacks (at most 256 MB of them).
        neighbour_bank: clean training rows kept for the first watched layer and for the logits, over all classes
            (``neighbour_bank // K`` per class, clipped to 2..50), whose nearest-neighbour class distances are the
            evidence sources ``"<layer>~knn"`` and ``"logits~knn"`` (:mod:`hfguard.neighbours`); 0 leaves them out.
            Costs ``K * per_class * D`` multiply-adds per image and source of dimension D at ``check``.
        attack_families: ``"auto"`` (:data:`hfguard.selfattack.DEFAULT_FAMILIES`:
            FGSM, PGD L-inf and L2, minimal PGD L-inf, CW-L2 and a gradient-free
            random search), ``"all"`` (those and minimal PGD L2) or a list of
            names from :data:`hfguard.selfattack.FAMILIES` to generate during
            ``fit`` (e.g. to measure how the guard does on families it never generated).
        batch_size: batch size used when ``fit`` gets tensors.
        seed: seed of the held-out sampling.
        progress: show progress bars during ``fit`` (the statistics pass, the ``calibration_data`` pass, the
            self-attacks and the filter choice, the last two by image).
        input_range: declared pixel range; pixels outside it (after undoing
            ``normalize``) warn, or raise under ``strict``.  ``None`` disables the check.
        strict: raise :class:`InputError` instead of warning for out-of-range pixels.
        checker: an optional second classifier over the same inputs and classes, ideally adversarially trained
            (:func:`hfguard.checker.adversarial_training`): the score becomes the larger of the guard's own and the
            checker's cross-entropy on the model's answer, each in units of its clean tail (:mod:`hfguard.checker`).
            Harder to evade for an attacker who knows the defence, for one more forward pass of the checker per
            ``check``. Its weights are not saved: pass it again to :func:`hfguard.load`.
        nonfinite: ``"raise"`` (default) for NaN/Inf inputs, or ``"flag"``: such
            rows get score ``inf`` and are flagged by ``check``/``detect`` (their
            values are zeroed first; under ``policy="filter"`` their logits are
            filtered only if the zeroed image is flagged by its own score).
    """

    #: a class default, so guards pickled before 0.7 (no banks) can be fitted again and saved
    neighbour_bank: int = 0

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: str | Sequence[str] = "auto",
        policy: str = "flag",
        fpr: float = 0.05,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
        max_features: int = 512,
        calibration_size: int = 4000,
        filter_sigma: str | float = "auto",
        max_filter_flip: float = 0.02,
        score_features: str | Sequence[str] = "auto",
        calibration: str = "self-attack",
        attack_size: int = 2000,
        attack_families: str | Sequence[str] = "auto",
        neighbour_bank: int = BANK_ROWS,
        batch_size: int = 256,
        seed: int = 0,
        progress: bool = True,
        input_range: tuple[float, float] | None = (0.0, 1.0),
        strict: bool = False,
        nonfinite: str = "raise",
        checker: nn.Module | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ModelError(f"protect() expects a torch.nn.Module, got {type(model).__name__}")
        if checker is not None and not isinstance(checker, nn.Module):
            raise ModelError(f"checker= expects a torch.nn.Module returning (N, K) logits, got {type(checker).__name__}")
        if checker is not None and checker is model:
            raise ModelError("checker= is the wrapped model itself; a checker must be a separate network (ideally adversarially trained)")
        if isinstance(model, torch.jit.ScriptModule):
            raise ModelError(
                f"protect() got a TorchScript module ({type(model).__name__}): TorchScript runs no forward hooks, so the guard cannot "
                "see its layers. Wrap the eager model (torch.compile'd models work)"
            )
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            raise ModelError(
                f"protect() got a {type(model).__name__}: its replicas run in other threads, where the guard cannot see their activations. "
                "Wrap the inner model (protect(model.module)); for several GPUs run one guard per process (see 'Distributed fit' in the README)"
            )
        if normalize is None:
            mean, std = torch.zeros(1), torch.ones(1)
        else:
            mean, std = (torch.as_tensor(v, dtype=torch.float32).flatten() for v in normalize)
            if mean.shape != std.shape or (std <= 0).any():
                raise SettingsError(f"normalize must be (mean, std) with equal lengths and std > 0, got {normalize!r}")
        with torch.inference_mode(False):  # buffers made under a caller's inference_mode would be inference tensors for good
            super().__init__(mean.clone(), std.clone())
        validate_settings(
            policy=policy, fpr=fpr, layers=layers, filter_sigma=filter_sigma, calibration_size=calibration_size, score_features=score_features,
            calibration=calibration, attack_size=attack_size, attack_families=attack_families, nonfinite=nonfinite, input_range=input_range,
            max_features=max_features, neighbour_bank=neighbour_bank, max_filter_flip=max_filter_flip, batch_size=batch_size, seed=seed,
        )
        self.input_range = None if input_range is None else (float(input_range[0]), float(input_range[1]))
        self.strict = bool(strict)
        self.nonfinite = nonfinite
        self.model = model
        self.register_module("checker", checker)
        self.score_features_setting = score_features if isinstance(score_features, str) else list(score_features)
        self.calibration = calibration
        self.attack_size = int(attack_size)
        self.attack_families = resolve_families(attack_families)  # FAMILIES order: the heads' order
        self.neighbour_bank = int(neighbour_bank)
        self.layers_setting = layers if layers == "auto" else list(layers)
        self.policy = policy
        self.fpr = float(fpr)
        self.max_features = int(max_features)
        self.calibration_size = int(calibration_size)
        self.filter_sigma_setting = filter_sigma
        self.max_filter_flip = float(max_filter_flip)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.progress = progress
        self.fit_report: dict[str, Any] = {}
        self._warned_train = False
        self.normalize = None if normalize is None else (mean.tolist(), std.tolist())

    def guard_state(self) -> dict[str, Tensor]:
        """The guard's own learned tensors (``state_dict`` without the wrapped model's or the checker's weights)."""
        return {k: v for k, v in self.state_dict().items() if k.split(".")[0] not in ("model", "checker")}

    # ------------------------------------------------------------------- fit
    def fit(self, data: Any, *, calibration_data: Any = None) -> "Guard":
        """Learns the clean expectations, HF signatures, score combination and threshold.

        One streaming pass over ``data``: per-class sums are accumulated (memory
        does not grow with the dataset), while a sample of clean images, chosen
        by a seeded hash of their content (so independent of the data's order),
        is held out for calibration and, under ``calibration="self-attack"``,
        a bounded sample (``attack_size``) is attacked with the model's own
        gradients to learn how to weigh the evidence. Fitting again replaces
        everything learned before; a failed fit leaves the guard as it was.

        Args:
            data: a DataLoader or iterable yielding ``(x, y)`` pairs, ``x``
                batches, or dicts with an image key; or an ``(x, y)`` pair of
                tensors; or a tensor of images.  Labels are optional: without
                them the model's own predictions on the clean data are used
                as classes.  Data must be clean (no adversarial examples).
            calibration_data: optional clean images the model was NOT trained
                on (a validation split), in any form ``data`` accepts; labels
                are optional and only reported. The threshold and the per-class
                evidence standardiser are then set on them, so the false-positive
                rate holds on new data even when the model has memorised ``data``
                (``fit_report["standardiser"]`` says which rows set it). Strongly
                recommended when ``data`` is the model's training set.

        Returns:
            ``self``.

        Raises:
            DataError: empty data, inconsistent shapes, labels out of range,
                a class with too few samples, or (self-attack) too few
                successful self-generated adversarials.
            ModelError: the model does not return (N, K) logits.
        """
        return fit_guard(self, data, calibration_data)

    # ------------------------------------------------------------- inference
    def score(self, x: Tensor) -> Tensor:
        """Adversarial score (N,), higher = more suspicious; differentiable w.r.t. ``x``.

        Shape:
            x: (N, C, H, W) -> (N,)

        Raises:
            NotFittedError: before ``fit``.
            InputError, ShapeError: wrong dtype, rank, size or non-finite values.
        """
        self._require_fitted()
        x, bad = self._check_input(x)
        if x.shape[0] == 0:
            return x.new_zeros(0)
        with self._eval_model():
            score = self._evaluate(x)[1]
        return score if bad is None else score.masked_fill(bad, float("inf"))

    def detect(self, x: Tensor) -> Tensor:
        """(N,) bool: ``score(x) > threshold`` (threshold calibrated at ``fpr`` on held-out clean data)."""
        with torch.no_grad():
            return self.score(x) > self.calibrated_threshold

    def check(self, x: Tensor) -> Verdict:
        """Everything about a batch in one model pass (plus one pass over the flagged rows under ``policy="filter"``, and
        one pass of the checker network when the guard has one).

        Raises:
            NotFittedError: before ``fit``.
            InputError, ShapeError: wrong dtype, rank, size or non-finite values.
        """
        self._require_fitted()
        x, bad = self._check_input(x)
        if x.shape[0] == 0:
            return self._empty_verdict(x)
        with self._eval_model(), torch.no_grad():
            logits, score, origin = self._evaluate(x)
            # the filter policy acts on the images' own scores; a row holding NaN/Inf (zeroed) is flagged on top, and
            # its logits are the zeroed image's, filtered only if that image is flagged itself (as the ONNX graph does)
            to_filter = score > self.calibrated_threshold
            if bad is not None:
                score = score.masked_fill(bad, float("inf"))
            flagged = to_filter if bad is None else to_filter | bad
            filtered = torch.zeros_like(flagged)
            if self.policy == "filter" and bool(to_filter.any()):
                logits = logits.clone()
                logits[to_filter] = self._filtered_logits(x[to_filter]).to(logits.dtype)
                filtered = to_filter.clone()
            return Verdict(logits, score, flagged, filtered, logits.argmax(1), origin)

    def forward(self, x: Tensor) -> Tensor:
        """Logits like ``model(x)``; under ``policy="filter"`` flagged rows are filtered and classified again.

        Differentiable: gradients flow through the model and, for flagged rows,
        through the (differentiable) low-pass filter, so attacks see the true defence.
        """
        self._require_fitted()
        x, bad = self._check_input(x)
        if bad is not None:
            raise InputError("guard(x) cannot return logits for images holding NaN or Inf; use guard.check(x), which flags them")
        with self._eval_model():
            if self.policy == "flag" or x.shape[0] == 0:
                return self._forward_model(x)
            logits, score, _ = self._evaluate(x)
            flagged = (score > self.calibrated_threshold).detach()
            if not bool(flagged.any()):
                return logits
            out = logits.clone()
            out[flagged] = self._filtered_logits(x[flagged]).to(out.dtype)
            return out

    def logits_and_score(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, score)`` from ONE model pass, both differentiable w.r.t. ``x`` (for detector-aware attacks).

        The logits are the bare model's (no filter policy); see :meth:`forward` for the defended logits.
        """
        self._require_fitted()
        x, bad = self._check_input(x)
        if bad is not None:
            raise InputError("logits_and_score() needs finite images; the batch holds NaN or Inf")
        with self._eval_model():
            logits, score, _ = self._evaluate(x)
        return logits, score

    def inspect(self, x: Tensor, *, differentiable: bool = False) -> Inspection:
        """Per-source class distances and affinities: the trajectory from origin to prediction.

        With ``differentiable=True`` the distances keep their graph to ``x``
        (an attack can push every layer toward a chosen class).
        """
        self._require_fitted()
        x, bad = self._check_input(x)
        if bad is not None:
            raise InputError("inspect() needs finite images; the batch holds NaN or Inf")
        with self._eval_model(), torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            logits, feats = self._features(x)
            dists = self._distances(feats)
        d = torch.stack(dists, 1)
        dims = torch.tensor([f.shape[1] for f in feats], dtype=d.dtype, device=d.device)
        affinity = torch.softmax(-0.5 * d * dims[None, :, None], dim=2)
        return Inspection(self.sources, d, affinity, d.argmin(2), logits.argmax(1), d[:, 0].argmin(1))

    # -------------------------------------------------------------------- io
    def save(self, path: str) -> None:
        """Writes the learned state to ``path`` (safetensors + JSON header; no pickle)."""
        from hfguard.io import save_guard

        save_guard(self, path)

    def export_onnx(self, path: str, example_input: Tensor, *, opset: int = 17) -> None:
        """Writes this guard's ``check`` as one ONNX file (outputs ``logits``, ``score``,
        ``flagged``, ``origin``; dynamic batch); run it with :class:`hfguard.OnnxGuard`."""
        from hfguard.onnx import export_onnx

        export_onnx(self, path, example_input, opset=opset)

    def extra_repr(self) -> str:
        state = f"layers={self.layers}, threshold={float(self.calibrated_threshold):.4f}" if self.fitted else "not fitted"
        return f"policy={self.policy!r}, fpr={self.fpr}, {state}"


def protect(
    model: nn.Module,
    *,
    layers: str | Sequence[str] = "auto",
    policy: str = "flag",
    fpr: float = 0.05,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    **options: Any,
) -> Guard:
    """Wraps ``model`` in an unfitted :class:`Guard`; call ``.fit(clean_data)`` next.

    Example:
        >>> guard = hfguard.protect(model).fit(train_loader)   # doctest: +SKIP
        >>> verdict = guard.check(images)                        # doctest: +SKIP
    """
    return Guard(model, layers=layers, policy=policy, fpr=fpr, normalize=normalize, **options)
