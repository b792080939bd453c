"""The guard's learned state (buffers) and the maths that turns source features into the score.

:class:`FittedState` holds everything ``fit`` learns, as buffers (so ``state_dict()`` is the file format,
``.to()`` moves it and ONNX export bakes it in), and knows nothing of the wrapped model:
:class:`hfguard.modelpass.ModelPass` adds the model's hooked forward pass, and :class:`hfguard.Guard` the settings and
the public API on top.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hfguard import calibrate, combiner, evidence, spectrum
from hfguard.checker import checker_term, combined_score
from hfguard.errors import NotFittedError
from hfguard.evidence import LOGITS, SPECTRUM
from hfguard.neighbours import NeighbourBank
from hfguard.stats import batched_sq_distances, class_sq_distances, group_indicator, grouped_sq_distances
from hfguard.taps import FLAT, MAP, Pooling

__all__ = ["ClassGaussian", "FittedState"]


class ClassGaussian(nn.Module):
    """Buffers of one source's fitted class Gaussians; ``forward(z)`` gives (N, K) distances."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("whitener", torch.zeros(dim, dim))
        self.register_buffer("white_means", torch.zeros(num_classes, dim))

    def forward(self, z: Tensor) -> Tensor:
        # centring first keeps the float32 expansion ||u||^2 - 2 u.m + ||m||^2 free of cancellation
        return class_sq_distances(z.to(self.whitener.dtype) - self.center, self.whitener, self.white_means)


class LinearProbe(nn.Module):
    """Buffers of one layer's linear probe to the logits (:mod:`hfguard.probe`); ``forward(z, logits)`` gives the
    (N, K) class distances of the residual ``(logits - logit_center) @ proj - (z - layer_center) @ weight.T``."""

    def __init__(self, num_classes: int, dim: int, probe_dim: int) -> None:
        super().__init__()
        self.register_buffer("proj", torch.zeros(num_classes, probe_dim))
        self.register_buffer("weight", torch.zeros(probe_dim, dim))
        self.register_buffer("logit_center", torch.zeros(num_classes))
        self.register_buffer("layer_center", torch.zeros(dim))
        self.residual = ClassGaussian(num_classes, probe_dim)

    def forward(self, z: Tensor, logits: Tensor) -> Tensor:
        dtype = self.weight.dtype
        return self.residual((logits.to(dtype) - self.logit_center) @ self.proj - (z.to(dtype) - self.layer_center) @ self.weight.T)


def gaussian_distances(gaussians: Sequence[ClassGaussian], feats: Sequence[Tensor], indicator: Tensor, dims: Tensor) -> Tensor:
    """(N, S, K): what each ``gaussians[s](feats[s])`` gives, for all S sources in a fixed handful of kernels
    (:func:`hfguard.stats.grouped_sq_distances`); ``indicator`` is :func:`hfguard.stats.group_indicator` of their
    dimensions ``dims`` (an integer tensor)."""
    dtype = gaussians[0].whitener.dtype
    z = torch.cat([f.to(dtype) for f in feats], 1) - torch.cat([g.center for g in gaussians])
    return grouped_sq_distances(z, [g.whitener for g in gaussians], [g.white_means for g in gaussians], indicator, dims)


def probe_distances(probes: Sequence[LinearProbe], feats: Sequence[Tensor], logits: Tensor) -> Tensor:
    """(N, S, K): what each ``probes[s](feats[s], logits)`` gives, for all S probes at once (they share K and the
    probe dimension, so the logits' side and the residuals' Gaussians are batched products)."""
    dtype = probes[0].weight.dtype
    proj = torch.stack([p.proj for p in probes])  # (S, K, P)
    target = (logits.to(dtype)[None] - torch.stack([p.logit_center for p in probes])[:, None]) @ proj  # (S, N, P)
    fitted = torch.stack([(f.to(dtype) - p.layer_center) @ p.weight.T for p, f in zip(probes, feats)])  # (S, N, P)
    res = [p.residual for p in probes]
    r = target - fitted - torch.stack([g.center for g in res])[:, None]
    return batched_sq_distances(r, torch.stack([g.whitener for g in res]), torch.stack([g.white_means for g in res]))


class FittedState(nn.Module):
    """Learned buffers of a guard (created from a layout by :meth:`_allocate`) and the scoring maths on features.

    Args:
        norm_mean, norm_std: per-channel normalisation of the model's input (1 or C values).
    """

    #: the fitted model's fingerprint (hfguard.fingerprint); a class default, so guards pickled before 0.6.2 have one
    _model_fingerprint: list[float] | None = None
    #: the checker network's fingerprint (hfguard.checker); a class default, so guards pickled before 0.8 have none
    _checker_fingerprint: list[float] | None = None
    #: sources with a nearest-neighbour bank; a class default, so guards pickled before 0.7 have none
    neighboured: list[int] = []  # noqa: RUF012 (never mutated: fit and load assign a new list)

    def _apply(self, *args: Any, **kwargs: Any) -> "FittedState":
        """``.to()``, ``.double()``, ``.cuda()``...: outside any caller's ``inference_mode``, so the moved buffers stay
        normal tensors that gradients (``score().backward()``, attacks, ONNX export) can use."""
        low = (torch.float16, torch.bfloat16)
        with torch.inference_mode(False):
            # the guard's own statistics never go below float32 (.half() / .to(torch.float16) is meant for the model:
            # a float16 threshold or whitening overflows or loses digits); the model's features are cast up to them.
            # The originals are kept and moved, not cast back (a round trip through float16 would have rounded them).
            own = [(mod, key, buf) for name, mod in self.named_modules() if name.split(".")[0] not in ("model", "checker")
                   for key, buf in mod._buffers.items() if buf is not None and buf.is_floating_point() and buf.dtype not in low]
            out = super()._apply(*args, **kwargs)
            for mod, key, buf in own:
                new = mod._buffers[key]
                if new is not None and new.dtype in low:
                    mod._buffers[key] = buf.to(new.device)
            return out

    def __init__(self, norm_mean: Tensor, norm_std: Tensor) -> None:
        super().__init__()
        self.temperature = 1.0
        self.score_columns: list[tuple[str, int]] = []
        self.layers: list[str] = []
        self.probed: list[int] = []
        self.neighboured: list[int] = []
        self.poolings: dict[str, Pooling] = {}
        self.layout: dict[str, Any] | None = None
        self.register_buffer("norm_mean", norm_mean.view(-1, 1, 1))
        self.register_buffer("norm_std", norm_std.view(-1, 1, 1))
        self._hf_without_dc = False
        self._grouped: bool | None = None  # see _source_distances
        self._model_fingerprint: list[float] | None = None  # set by fit and load (hfguard.fingerprint)
        self._checker_fingerprint: list[float] | None = None  # the same for a checker network

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` (or :func:`hfguard.load`) has run."""
        return self.layout is not None

    @property
    def threshold(self) -> float:
        """Score threshold: ``score > threshold`` is flagged."""
        self._require_fitted()
        return float(self.calibrated_threshold)

    @property
    def sources(self) -> list[str]:
        """Sources of pooled features, in order: watched layers, ``"logits"``, ``"spectrum"``."""
        return [*self.layers, LOGITS, SPECTRUM]

    @property
    def evidence_sources(self) -> list[str]:
        """Every source of evidence: :attr:`sources`, then the probed layers' ``"<layer>->logits"`` residuals, then the
        nearest-neighbour distances ``"<source>~knn"`` of the sources with a bank (:mod:`hfguard.neighbours`)."""
        return [*self.sources, *(evidence.probe_name(self.layers[i]) for i in self.probed),
                *(evidence.neighbour_name(self.sources[i]) for i in self.neighboured)]

    def __getattr__(self, name: str) -> Any:
        # A property that raises AttributeError (NotFittedError is one) makes Python fall back to __getattr__, where
        # nn.Module would replace its error by a generic "has no attribute": call the property again so that its own
        # error (e.g. NotFittedError for guard.threshold before fit) reaches the caller. Its getter thus runs twice on
        # that path: the properties here check _require_fitted before any side effect (a warning).
        try:
            return super().__getattr__(name)  # buffers, parameters, submodules: the common case, first
        except AttributeError:
            prop = getattr(type(self), name, None)
            if isinstance(prop, property) and prop.fget is not None:
                return prop.fget(self)
            raise

    def _require_fitted(self) -> None:
        if self.layout is None:
            raise NotFittedError("This Guard instance is not fitted yet. Call 'fit' with clean data before using it.")

    def _allocate(self, layout: dict[str, Any]) -> None:
        """Creates every learned buffer from a layout (used by ``fit`` and by ``load``)."""
        k = layout["num_classes"]
        c, h, w = layout["input_shape"]
        gh, gw = layout["spectral_grid"]
        self.layers = list(layout["layers"])
        self.poolings = dict(zip(self.layers, layout_poolings(layout)))
        dims = [*layout["dims"], k, len(layout["hf_index"])]
        self.gaussians = nn.ModuleList(ClassGaussian(k, d) for d in dims)
        self.probed = [int(i) for i in layout.get("probes", [])]  # files before format 5 have no probes
        self.probes = nn.ModuleList(LinearProbe(k, dims[i], int(layout["probe_dim"])) for i in self.probed)
        self.neighboured = [int(i) for i in layout.get("neighboured", [])]  # files before format 7 have no banks
        per, near = int(layout.get("bank_per_class", 1)), int(layout.get("bank_neighbours", 1))
        self.banks = nn.ModuleList(NeighbourBank(k, per, dims[i], near) for i in self.neighboured)
        th, tw = layout.get("spectral_tile", (h, w))  # files of formats 1-2: one tile, the whole image
        self.register_buffer("dct_h", spectrum.dct_matrix(th))
        self.register_buffer("dct_w", spectrum.dct_matrix(tw))
        self.register_buffer("pool_h", spectrum.pool_matrix(th, gh))
        self.register_buffer("pool_w", spectrum.pool_matrix(tw, gw))
        self.register_buffer("hf_index", torch.tensor(layout["hf_index"], dtype=torch.long))
        # always so for hf_block_mask's blocks (see _spectral); checked, not assumed, for whatever a file holds
        self._hf_without_dc = not set(spectrum.dc_blocks(self.pool_h, self.pool_w)) & set(layout["hf_index"])
        names = layout["score_features"]
        self.score_columns = [evidence.parse_feature(n, self.evidence_sources) for n in names]
        # constants of the grouped maths, fixed by the layout: derived, never saved (non-persistent), moved by .to()
        gauss = self._grouped_sources()[0]
        self.register_buffer("group_indicator", group_indicator([dims[i] for i in gauss]), persistent=False)
        self.register_buffer("group_dims", torch.tensor([dims[i] for i in gauss], dtype=torch.long), persistent=False)
        self.register_buffer("evidence_index", evidence.column_index(self.score_columns), persistent=False)
        nf = len(names)
        self.register_buffer("evidence_mean", torch.zeros(k, nf))
        self.register_buffer("evidence_std", torch.ones(k, nf))
        if layout.get("calibration", "clean") == "clean":  # files of format 1 have no heads: the clean-only combiner
            weight, bias = combiner.identity_heads(nf)
        else:
            weight, bias = torch.zeros(layout["heads"], nf), torch.zeros(layout["heads"])
        self.register_buffer("head_weight", weight)
        self.register_buffer("head_bias", bias)
        self.register_buffer("calibrated_threshold", torch.zeros(()))
        self.register_buffer("sigma_", torch.zeros(()))
        if layout.get("checker", False):  # a checker network's term (hfguard.checker): both terms' clean-tail units
            self.register_buffer("guard_median", torch.zeros(()))
            self.register_buffer("guard_unit", torch.ones(()))
            self.register_buffer("checker_median", torch.zeros(k))
            self.register_buffer("checker_unit", torch.ones(k))
        else:
            for name in ("guard_median", "guard_unit", "checker_median", "checker_unit"):  # a refit without a checker drops them
                self._buffers.pop(name, None)
        self.layout = layout

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 (torch's signature)
        old = prefix + "threshold_"  # the buffer's name before file format 3
        if old in state_dict and prefix + "calibrated_threshold" not in state_dict:
            state_dict[prefix + "calibrated_threshold"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def threshold_(self) -> Tensor:
        """Deprecated name of :attr:`calibrated_threshold` (before 0.2)."""
        self._require_fitted()
        warnings.warn("guard.threshold_ is now guard.calibrated_threshold (or float(guard.threshold))", DeprecationWarning, stacklevel=2)
        return self.calibrated_threshold

    def to_pixels(self, x: Tensor) -> Tensor:
        """Model input -> pixel image (undoes ``normalize``)."""
        return x * self.norm_std + self.norm_mean

    def from_pixels(self, pixels: Tensor) -> Tensor:
        """Pixel image -> model input (applies ``normalize``)."""
        return (pixels - self.norm_mean) / self.norm_std

    def _spectral(self, x: Tensor) -> Tensor:
        """HF features of the pixel images behind the model inputs ``x``. The HF blocks never hold a tile's DC
        coefficient, the only one that undoing ``normalize`` shifts, so the batch is not un-normalised: each
        channel's power is weighted by ``std ** 2`` instead (see :func:`hfguard.spectrum.hf_features`)."""
        if getattr(self, "_hf_without_dc", False):
            images, weight = x, self.norm_std.flatten().to(self.dct_h.dtype) ** 2
        else:  # a file whose HF blocks hold the DC coefficient: the pixels themselves
            images, weight = self.to_pixels(x), None
        return spectrum.hf_features(
            images.to(self.dct_h.dtype), self.dct_h, self.dct_w, self.pool_h, self.pool_w, self.hf_index, channel_weight=weight
        )

    def _distances(self, feats: Sequence[Tensor]) -> list[Tensor]:
        return [g(f) for g, f in zip(self.gaussians, feats)]

    def _sources_used(self) -> set[int]:
        """Evidence sources the score and the origin need (0 = first watched layer, for the origin)."""
        return {src for kind, src in self.score_columns if kind != "margin"} | {0}

    def _features_needed(self) -> set[int]:
        """Feature sources (indices into :attr:`sources`) behind :meth:`_sources_used`: a probe needs its layer and the
        logits, a bank its source."""
        gauss, probes, banks = self._grouped_sources()
        return set(gauss) | {self.probed[j] for j in probes} | {self.neighboured[j] for j in banks} | {len(self.layers)}

    def _grouped_sources(self) -> tuple[list[int], list[int], list[int]]:
        """The sources of :meth:`_sources_used`, in order, split into class Gaussians (indices into :attr:`sources`),
        probes (indices into :attr:`probes`) and banks (indices into :attr:`banks`)."""
        n, p = len(self.sources), len(self.probed)
        used = sorted(self._sources_used())
        return [i for i in used if i < n], [i - n for i in used if n <= i < n + p], [i - n - p for i in used if i >= n + p]

    def _source_distances(self, feats: Sequence[Tensor | None]) -> dict[int, Tensor]:
        """(N, K) class distances of the evidence sources the score and the origin need (see :meth:`_sources_used`).

        On a CPU, where arithmetic sets the cost, each source module's own ``forward`` (``gaussians[i](feats[i])``,
        ``probes[j](feats[layer], logits)``). Elsewhere (a GPU), where kernel launches rather than arithmetic set it,
        the same distances up to rounding from one group of kernels for the Gaussians and one for the probes
        (:func:`gaussian_distances`, :func:`probe_distances`: 157 against 248 operations on a resnet50 guard; on a
        CPU they cost 4-8 % more time, their concatenations and small products doing what the loop does not need:
        ``benchmarks/grouped_maths.py``). ``_grouped`` forces either way (None: by device).
        """
        n, logits = len(self.sources), feats[len(self.layers)]
        gauss, probes, banks = self._grouped_sources()
        p = n + len(self.probed)
        near = {p + j: self.banks[j](feats[self.neighboured[j]]) for j in banks}
        forced = getattr(self, "_grouped", None)
        if not (forced if forced is not None else logits.device.type != "cpu"):
            return {i: self.gaussians[i](feats[i]) for i in gauss} | {n + j: self.probes[j](feats[self.probed[j]], logits) for j in probes} | near
        if len(self.group_dims) != len(gauss):  # the derived constants follow _allocate's layout; never silently stale
            raise RuntimeError(f"the guard's grouped maths was built for {len(self.group_dims)} class Gaussians but the score uses {len(gauss)}")
        out: dict[int, Tensor] = {}
        if gauss:
            d = gaussian_distances([self.gaussians[i] for i in gauss], [feats[i] for i in gauss], self.group_indicator, self.group_dims)
            out.update({i: d[:, s] for s, i in enumerate(gauss)})
        if probes:
            d = probe_distances([self.probes[j] for j in probes], [feats[self.probed[j]] for j in probes], logits)
            out.update({n + j: d[:, s] for s, j in enumerate(probes)})
        return out | near

    def _evidence(self, logits: Tensor, dists: dict[int, Tensor]) -> Tensor:
        """The planned evidence columns (N, F) from the logits and the sources' distances."""
        return evidence.evidence_columns(self.score_columns, dists, logits.to(self.evidence_mean.dtype), index=self.evidence_index)

    def _with_checker(self, score: Tensor, checker_logits: Tensor, pred: Tensor) -> Tensor:
        """The guard's score (N,) and the checker's logits -> the combined score (:func:`hfguard.checker.combined_score`)."""
        term = checker_term(checker_logits, pred)
        return combined_score(score, term, pred, self.guard_median, self.guard_unit, self.checker_median, self.checker_unit)

    def _score_evidence(self, ev: Tensor, pred: Tensor) -> Tensor:
        """Evidence (N, F) of inputs predicted ``pred`` -> class-standardised z -> combiner heads -> score (N,)."""
        z = calibrate.standardize(ev, pred, self.evidence_mean, self.evidence_std)
        return combiner.head_score(z, self.head_weight, self.head_bias, self.temperature)


def layout_poolings(layout: dict[str, Any]) -> list[Pooling]:
    """Each watched layer's :class:`~hfguard.taps.Pooling`; files of formats 1-2 stored only a grid side
    (channels-first maps; other outputs flattened)."""
    if "poolings" in layout:  # format 4 adds each layer's token prefix; before it, one class token was assumed
        return [Pooling(str(p[0]), int(p[1]), int(p[2]), int(p[3]) if len(p) > 3 else 1) for p in layout["poolings"]]
    shapes = layout["layer_shapes"]
    return [Pooling(MAP if len(shapes[n]) == 3 else FLAT, int(g)) for n, g in zip(layout["layers"], layout["grids"])]
