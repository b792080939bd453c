"""Small, tested attacks used by the demo, the benchmarks and the tests.

All attacks work on images in ``[lo, hi]`` (default ``[0, 1]``), take any
callable ``model`` returning logits, are batched (no per-sample loops), use
``torch.autograd.grad`` (parameters' ``.grad`` is never touched) or, for
:func:`random_search` and :func:`square_linf`, no gradient at all, and return
the adversarial images detached.  Random starts use a private generator.  A
``model`` that is an ``nn.Module`` is attacked in eval mode and handed back with
every submodule's own mode (a model in training mode would otherwise update its
BatchNorm statistics on every step, and be attacked through batch statistics).
Labels may be any integer tensor, list or array (float (N, K) soft targets, and any target of a custom
``loss_fn``, are passed as they are); budgets must be non-negative.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hfguard.modelmode import eval_mode

__all__ = ["fgsm", "pgd", "boundary_pgd", "cw_l2", "margin_loss", "evasion_loss", "detector_pgd", "weighted_pgd", "orthogonal_pgd", "random_search", "square_linf"]

Model = Callable[[Tensor], Tensor]


def _attack(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Checks an attack's labels and budget and runs it with an ``nn.Module`` model in eval mode (see the module note)."""
    sig = inspect.signature(fn)
    first = next(iter(sig.parameters))

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Tensor:
        bound = sig.bind(*args, **kwargs)
        x = bound.arguments["x"]
        y = bound.arguments.get("y")
        soft = isinstance(y, Tensor) and y.is_floating_point() and (y.dim() == 2 or bound.arguments.get("loss_fn") is not None)
        if y is not None and not soft:  # soft (N, K) targets, or any target of a custom loss_fn, pass as they are
            y = torch.as_tensor(y.tolist() if type(y).__module__ == "numpy" else y, device=x.device)
            if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1 or len(y) != len(x):
                raise ValueError(f"y must hold one integer class per image ({len(x)},), got dtype {y.dtype} and shape {tuple(y.shape)}")
            bound.arguments["y"] = y.long()
        if "eps" in bound.arguments:
            eps = torch.as_tensor(bound.arguments["eps"])
            if bool((eps < 0).any()) or not bool(torch.isfinite(eps).all()):
                raise ValueError(f"eps must be finite and non-negative, got {bound.arguments['eps']!r}")
        model = bound.arguments[first]  # "model", or weighted_pgd's "model_and_score"
        if isinstance(model, nn.Module):
            with eval_mode(model):
                return fn(*bound.args, **bound.kwargs)
        return fn(*bound.args, **bound.kwargs)

    return run


def _grad(loss: Tensor, x: Tensor) -> Tensor:
    return torch.autograd.grad(loss, x)[0]


def _normalize_l2(g: Tensor) -> Tensor:
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))


Budget = float | Tensor


def _per_image(eps: Budget, x: Tensor) -> Tensor:
    """``eps`` (a number, or one budget per image (N,)) as a tensor broadcastable against ``x``."""
    e = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if e.dim() == 0 or e.shape == (1,):  # one budget for all
        return e.reshape(())
    if e.shape != (x.shape[0],):
        raise ValueError(f"eps must be a number or one budget per image ({x.shape[0]},), got shape {tuple(e.shape)}")
    return e.view(-1, *([1] * (x.dim() - 1)))


def _project(x_adv: Tensor, x: Tensor, eps: Budget, norm: str, lo: float, hi: float) -> Tensor:
    eps = _per_image(eps, x)
    delta = x_adv - x
    if norm == "inf":
        delta = torch.maximum(torch.minimum(delta, eps), -eps)
    else:
        n = delta.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
        delta = delta * (eps / n.clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(lo, hi)


@_attack
def fgsm(model: Model, x: Tensor, y: Tensor, eps: Budget, *, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """Fast gradient sign method (Goodfellow et al., 2015), L-inf ``eps`` (a number or one per image)."""
    x = x.detach()
    xr = x.clone().requires_grad_(True)
    g = _grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    return (x + _per_image(eps, x) * g.sign()).clamp(lo, hi).detach()


@_attack
def pgd(
    model: Model,
    x: Tensor,
    y: Tensor,
    eps: Budget,
    *,
    steps: int = 40,
    step_size: float | None = None,
    norm: str = "inf",
    random_start: bool = True,
    seed: int = 0,
    lo: float = 0.0,
    hi: float = 1.0,
    loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    success: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """Projected gradient descent (Madry et al., 2018) under an L-inf or L2 budget.

    Args:
        model: callable returning logits.
        x: (N, ...) clean images in ``[lo, hi]``.
        y: (N,) true labels.
        eps: budget (L-inf or L2 radius): a number, or one per image (N,).
        steps: iterations.
        step_size: default ``2.5 * eps / steps``.
        norm: ``"inf"`` or ``"2"``.
        random_start: start from a uniform point of the ball.
        seed: seed of the random start.
        loss_fn: ``loss_fn(logits, y, x_adv) -> (N,)`` loss to *maximise*;
            default cross-entropy (use it for detector-aware attacks).
        success: ``success(logits, y, x_adv) -> (N,)`` bool, the attacker's goal (e.g. misclassified and not
            flagged by a detector): per image the first iterate that reaches it (the start, a step or the last
            one) is returned, else the last iterate, so an iterate that a later step would lose is kept (one
            more forward pass, without gradient, checks the last iterate).

    Returns:
        Adversarial images (N, ...).
    """
    if norm not in ("inf", "2"):
        raise ValueError(f"norm must be 'inf' or '2', got {norm!r}")
    x = x.detach()
    e = _per_image(eps, x)
    alpha = step_size if step_size is not None else 2.5 * e / steps
    gen = torch.Generator(device=x.device).manual_seed(seed)
    if random_start:
        if norm == "inf":
            noise = (torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1) * e
        else:
            noise = _normalize_l2(torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype))
            r = torch.rand(x.shape[0], generator=gen, device=x.device, dtype=x.dtype) ** (1.0 / x[0].numel())
            noise = noise * e * r.view(-1, *([1] * (x.dim() - 1)))
        x_adv = _project(x + noise, x, eps, norm, lo, hi)
    else:
        x_adv = x.clone()
    first = _FirstSuccess(x_adv) if success is not None else None
    for _ in range(steps):
        xr = x_adv.clone().requires_grad_(True)
        logits = model(xr)
        loss = F.cross_entropy(logits, y, reduction="none") if loss_fn is None else loss_fn(logits, y, xr)
        g = _grad(loss.sum(), xr)
        if first is not None:
            with torch.no_grad():
                first.offer(x_adv, success(logits.detach(), y, x_adv))
        step = g.sign() if norm == "inf" else _normalize_l2(g)
        x_adv = _project(x_adv + alpha * step, x, eps, norm, lo, hi).detach()
    if first is None:
        return x_adv
    with torch.no_grad():
        first.offer(x_adv, success(model(x_adv), y, x_adv))
    return first.result(x_adv)


class _FirstSuccess:
    """Per image, the first iterate offered with a True success (see :func:`pgd`'s ``success``)."""

    def __init__(self, x: Tensor) -> None:
        self.images = x.detach().clone()
        self.done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    def offer(self, x: Tensor, success: Tensor) -> None:
        success = torch.as_tensor(success, device=self.done.device)
        if success.shape != self.done.shape or success.dtype != torch.bool:
            raise ValueError(f"success must give one bool per image ({self.done.shape[0]},), got {success.dtype} of shape {tuple(success.shape)}")
        new = success & ~self.done
        self.images[new] = x.detach()[new]
        self.done |= new

    def result(self, last: Tensor) -> Tensor:
        """The first successful iterate of each image, the ``last`` one for the others."""
        return torch.where(self.done.view(-1, *([1] * (last.dim() - 1))), self.images, last.detach())


@_attack
def boundary_pgd(
    model: Model,
    x: Tensor,
    y: Tensor,
    eps: Budget,
    *,
    steps: int = 20,
    norm: str = "inf",
    lo: float = 0.0,
    hi: float = 1.0,
) -> Tensor:
    """Minimal adversarials: PGD with small steps that freezes each image at its FIRST misclassified iterate.

    The result sits just across the decision boundary (low confidence, like CW), unlike
    :func:`pgd`, which keeps climbing the loss. Images never misclassified within ``eps`` end
    at the last iterate. Step size ``1.5 * eps / steps``; no random start.
    """
    if norm not in ("inf", "2"):
        raise ValueError(f"norm must be 'inf' or '2', got {norm!r}")
    x = x.detach()
    alpha = 1.5 * _per_image(eps, x) / steps
    x_adv = x.clone()
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    view = (-1, *([1] * (x.dim() - 1)))
    for _ in range(steps + 1):
        xr = x_adv.clone().requires_grad_(True)
        logits = model(xr)
        done |= (logits.argmax(1) != y).detach()
        if bool(done.all()):
            break
        g = _grad(F.cross_entropy(logits, y, reduction="sum"), xr)
        step = g.sign() if norm == "inf" else _normalize_l2(g)
        moved = _project(x_adv + alpha * step, x, eps, norm, lo, hi)
        x_adv = torch.where(done.view(view), x_adv, moved).detach()
    return x_adv


@_attack
def cw_l2(
    model: Model,
    x: Tensor,
    y: Tensor,
    *,
    c: float = 1.0,
    kappa: float = 0.0,
    steps: int = 100,
    lr: float = 0.01,
    lo: float = 0.0,
    hi: float = 1.0,
) -> Tensor:
    """Carlini-Wagner L2 attack with a fixed constant ``c`` (tanh box, Adam).

    Returns, per image, the smallest-L2 successful iterate (or the clean image when none succeeded).
    """
    x = x.detach()
    scale = (hi - lo) / 2
    w0 = torch.atanh(((x - lo) / scale - 1).clamp(-1 + 1e-6, 1 - 1e-6))
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    best = x.clone()
    best_l2 = torch.full((x.shape[0],), float("inf"), device=x.device)
    onehot: Tensor | None = None
    for _ in range(steps):
        x_adv = (torch.tanh(w) + 1) * scale + lo
        logits = model(x_adv)
        if onehot is None:
            onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
        real = (logits * onehot).sum(1)
        other = (logits - 1e9 * onehot).max(1).values
        f = (real - other + kappa).clamp_min(0)
        l2 = (x_adv - x).flatten(1).pow(2).sum(1)
        loss = (l2 + c * f).sum()
        w.grad = _grad(loss, w)  # not loss.backward(): that would fill the model parameters' .grad
        opt.step()
        with torch.no_grad():
            ok = (logits.argmax(1) != y) & (l2 < best_l2)
            best_l2 = torch.where(ok, l2, best_l2)
            best[ok] = x_adv.detach()[ok]
    return best.detach()


def margin_loss(logits: Tensor, y: Tensor, kappa: float = float("inf")) -> Tensor:
    """Carlini-Wagner margin ``max_{j != y} z_j - z_y`` clipped at ``kappa`` (N,): to maximise; flat once the
    wrong class leads by ``kappa`` (a high-confidence misclassification)."""
    onehot = F.one_hot(y, logits.shape[1]).bool()
    other = logits.masked_fill(onehot, float("-inf")).max(1).values
    return (other - logits.gather(1, y[:, None]).squeeze(1)).clamp(max=kappa)


def evasion_loss(logits: Tensor, y: Tensor, score: Tensor, threshold: float, scale: float = 1.0, slack: float = 1e-3) -> Tensor:
    """0 exactly when an image is misclassified (by a logit margin of at least ``slack``) and its detector ``score``
    is below ``threshold`` (by at least ``slack * scale``); positive otherwise, the larger the farther (N,): the
    objective of a detector-aware attacker (e.g. :func:`random_search`'s; ``evasion_loss(...) == 0`` is a
    :func:`pgd` ``success``)."""
    return F.relu(slack - margin_loss(logits, y)) + F.relu((score - threshold) / scale + slack)


def _detector_start(x: Tensor, eps: Budget, *, norm: str, steps: int, step_size: float | None, seed: int, lo: float, hi: float) -> tuple[Tensor, Any]:
    """The detector-aware attacks' start and step: a seeded random start within half the L-inf budget (the clean
    image under L2), and a step of ``2.5 * eps / (steps / 4)`` unless ``step_size`` is given."""
    e = _per_image(eps, x)
    alpha = step_size if step_size is not None else 2.5 * e / max(1, steps // 4)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    noise = (torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1) * e * 0.5
    return _project(x + noise if norm == "inf" else x, x, eps, norm, lo, hi), alpha


@_attack
def detector_pgd(
    model: Model,
    score: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: Budget,
    *,
    threshold: float,
    mode: str = "orthogonal",
    loss: str = "ce",
    kappa: float = 5.0,
    steps: int = 200,
    step_size: float | None = None,
    norm: str = "inf",
    seed: int = 0,
    lo: float = 0.0,
    hi: float = 1.0,
) -> Tensor:
    """Detector-aware PGD (Bryniarski et al., 2022) in its two forms, with a CE or a margin classifier loss.

    While an image is classified correctly it steps on the classifier loss (cross-entropy, or the margin
    of :func:`margin_loss` clipped at ``kappa``). Once misclassified it steps to lower the detector
    ``score``: ``mode="orthogonal"`` projects the score's gradient orthogonally to the classifier
    loss's gradient (so the step does not undo the misclassification); ``mode="selective"`` uses the
    score's gradient alone (stronger when the score and the classifier loss share a direction, as with
    margin evidence). Per image it returns the misclassified iterate with the lowest score below
    ``threshold`` seen during the run (the best iterate), else the final iterate. ``eps`` is a number or
    one budget per image (N,).
    """
    if mode not in ("orthogonal", "selective") or loss not in ("ce", "margin"):
        raise ValueError(f"mode must be 'orthogonal' or 'selective' and loss 'ce' or 'margin', got {mode!r}, {loss!r}")
    x = x.detach()
    x_adv, alpha = _detector_start(x, eps, norm=norm, steps=steps, step_size=step_size, seed=seed, lo=lo, hi=hi)
    best = x_adv.clone()
    best_score = torch.full((x.shape[0],), float("inf"), device=x.device)
    view = (-1, *([1] * (x.dim() - 1)))
    for _ in range(steps + 1):
        xr = x_adv.clone().requires_grad_(True)
        logits = model(xr)
        cls = F.cross_entropy(logits, y, reduction="none") if loss == "ce" else margin_loss(logits, y, kappa)
        g_cls = torch.autograd.grad(cls.sum(), xr)[0]
        xs = x_adv.clone().requires_grad_(True)
        s = score(xs)
        g_s = torch.autograd.grad(s.sum(), xs)[0]
        with torch.no_grad():
            wrong = logits.argmax(1) != y
            better = wrong & (s < threshold) & (s < best_score)
            best[better] = x_adv[better]
            best_score = torch.where(better, s.detach(), best_score)
            if mode == "orthogonal":
                u = _normalize_l2(g_cls)
                g_s = g_s - (g_s * u).flatten(1).sum(1).view(view) * u
            direction = torch.where(wrong.view(view), -g_s, g_cls)
            step = direction.sign() if norm == "inf" else _normalize_l2(direction)
            x_adv = _project(x_adv + alpha * step, x, eps, norm, lo, hi)
    found = torch.isfinite(best_score)
    with torch.no_grad():
        best[~found] = x_adv[~found]
    return best.detach()


@_attack
def weighted_pgd(
    model_and_score: Callable[[Tensor], tuple[Tensor, Tensor]],
    x: Tensor,
    y: Tensor,
    eps: Budget,
    *,
    threshold: float,
    scale: float = 1.0,
    lam: float = 1.0,
    factor: float = 2.0,
    loss: str = "ce",
    kappa: float = 5.0,
    steps: int = 100,
    step_size: float | None = None,
    norm: str = "inf",
    seed: int = 0,
    lo: float = 0.0,
    hi: float = 1.0,
) -> Tensor:
    """Weighted-sum detector-aware PGD with one weight per image, searched during the run.

    Each step ascends ``cls - lam_i * (score - threshold) / scale`` (``cls``: cross-entropy, or the margin of
    :func:`margin_loss` clipped at ``kappa``), with each image's weight first updated from the current iterate:
    times ``factor`` while the image is misclassified but flagged (the score needs more weight), divided by
    ``factor`` while it is classified correctly (the classifier loss needs more), unchanged while it evades; weights
    stay within ``[1e-4, 1e4]``. A
    global ``lam`` sweep must pick one weight for every image; this adapts it per image in one run. Returns per
    image the first iterate that evades (:func:`evasion_loss` is 0: misclassified and below the threshold, both
    with a margin), else the last iterate.

    Args:
        model_and_score: ``x -> (logits, score)`` in one differentiable pass (e.g. ``guard.logits_and_score``).
        threshold: the detector's threshold; ``scale``: the score's unit (e.g. its clean standard deviation).
        lam: every image's starting weight; ``factor``: its multiplicative update (> 1).
        eps, steps, step_size, norm, seed, lo, hi: as in :func:`pgd` (step size default ``2.5 * eps / (steps / 4)``;
            L-inf: a random start within half the budget, L2: the clean image).
    """
    if loss not in ("ce", "margin") or norm not in ("inf", "2"):
        raise ValueError(f"loss must be 'ce' or 'margin' and norm 'inf' or '2', got {loss!r}, {norm!r}")
    if not (factor > 1.0 and lam > 0 and scale > 0):
        raise ValueError(f"factor must be > 1, lam and scale > 0; got factor={factor!r}, lam={lam!r}, scale={scale!r}")
    x = x.detach()
    x_adv, alpha = _detector_start(x, eps, norm=norm, steps=steps, step_size=step_size, seed=seed, lo=lo, hi=hi)
    weight = torch.full((x.shape[0],), float(lam), device=x.device)
    first = _FirstSuccess(x_adv)
    for i in range(steps + 1):
        xr = x_adv.clone().requires_grad_(True)
        logits, s = model_and_score(xr)
        z = (s - threshold) / scale
        with torch.no_grad():
            first.offer(x_adv, evasion_loss(logits, y, s, threshold, scale) == 0)
            if i == steps:
                break
            wrong = logits.argmax(1) != y
            weight = torch.where(wrong & (z >= 0), weight * factor, torch.where(wrong, weight, weight / factor)).clamp(1e-4, 1e4)
        cls = F.cross_entropy(logits, y, reduction="none") if loss == "ce" else margin_loss(logits, y, kappa)
        g = _grad((cls - weight.to(z.dtype) * z).sum(), xr)
        step = g.sign() if norm == "inf" else _normalize_l2(g)
        x_adv = _project(x_adv + alpha * step, x, eps, norm, lo, hi).detach()
    return first.result(x_adv)


def orthogonal_pgd(
    model: Model,
    score: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: Budget,
    *,
    threshold: float,
    steps: int = 200,
    step_size: float | None = None,
    norm: str = "inf",
    seed: int = 0,
    lo: float = 0.0,
    hi: float = 1.0,
) -> Tensor:
    """Orthogonal detector-aware PGD on the cross-entropy: :func:`detector_pgd` with ``mode="orthogonal"`` (``eps`` a
    number or one budget per image)."""
    return detector_pgd(model, score, x, y, eps, threshold=threshold, mode="orthogonal", loss="ce", steps=steps,
                        step_size=step_size, norm=norm, seed=seed, lo=lo, hi=hi)


def _square_fraction(i: int, queries: int, p_init: float = 0.05) -> float:
    """Square attack's schedule of the square's area (fraction of the image), rescaled from 10,000 queries."""
    it = int(i / max(queries, 1) * 10000)
    for k, bound in enumerate((10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)):
        if it <= bound:
            return p_init / 2**k
    return p_init / 2**9


def random_search(
    objective: Callable[[Tensor, Tensor], Tensor], x: Tensor, eps: Budget, queries: int, *, lo: float = 0.0, hi: float = 1.0, seed: int = 0
) -> Tensor:
    """Gradient-free L-inf random search with Square attack's proposals (Andriushchenko et al., 2020).

    Starts from vertical stripes of ``x +- eps``; each query proposes, for every image whose objective is still
    positive, one square of side ``sqrt(p * H * W)`` (``p`` shrinking on Square's schedule) set to ``x +- eps``
    per channel, and keeps it when the objective drops. No gradient is used.

    Args:
        objective: ``(candidates, rows) -> (len(rows),)`` non-negative loss of ``candidates``, the images of
            rows ``rows`` of ``x``; an image is done once its loss is 0.
        x: (N, C, H, W) clean images in ``[lo, hi]``.
        eps: L-inf budget, a number or one per image (N,).
        queries: proposals per image (plus one for the start).
        lo, hi: the pixel box.
        seed: seed of the private generator.

    Returns:
        The images with the lowest objective found (detached).
    """
    g = torch.Generator().manual_seed(seed)
    x = x.detach()
    n, c, h, w = x.shape
    e = _per_image(eps, x).expand(n, 1, 1, 1)

    def rand_sign(*shape: int) -> Tensor:
        return (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(x.device, x.dtype)

    everyone = torch.arange(n, device=x.device)
    with torch.no_grad():
        xa = (x + e * rand_sign(n, c, 1, w)).clamp(lo, hi)  # vertical stripes
        best = objective(xa, everyone)
        rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        for i in range(queries):
            idx = (best > 0).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            side = max(1, min(h, w, int(round(math.sqrt(_square_fraction(i, queries) * h * w)))))
            top = torch.randint(0, h - side + 1, (len(idx),), generator=g).to(x.device)
            left = torch.randint(0, w - side + 1, (len(idx),), generator=g).to(x.device)
            inside = ((rows[None] >= top[:, None]) & (rows[None] < top[:, None] + side))[:, None, :, None] & (
                (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + side))[:, None, None, :]
            cand = torch.where(inside, (x[idx] + e[idx] * rand_sign(len(idx), c, 1, 1)).clamp(lo, hi), xa[idx])
            loss = objective(cand, idx)
            better = loss < best[idx]
            xa[idx[better]] = cand[better]
            best[idx[better]] = loss[better]
    return xa.detach()


@_attack
def square_linf(model: Model, x: Tensor, y: Tensor, eps: Budget, *, queries: int = 100, lo: float = 0.0, hi: float = 1.0, seed: int = 0) -> Tensor:
    """Square attack (L-inf, untargeted) on the model's margin: :func:`random_search` until each image is misclassified."""
    y = y.to(x.device)

    def objective(cand: Tensor, rows: Tensor) -> Tensor:
        return F.relu(-margin_loss(model(cand), y[rows]) + 1e-4)

    return random_search(objective, x, eps, queries, lo=lo, hi=hi, seed=seed)
