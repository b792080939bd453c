"""An optional second opinion: a *checker* network whose disagreement with the wrapped model is one more term of the score.

Every evidence source of hfguard reads the wrapped model's own activations, which a detector-aware attacker moves at
will. A checker is a separate classifier over the same inputs and classes, ideally adversarially trained
(:func:`adversarial_training`), so that the perturbation that moves the model does not move it as easily. Its term is
its cross-entropy on the class the *model* predicts: low when the checker backs the model's answer, high when it does
not. Robust detection at radius eps is about as hard as robust classification at eps / 2 (Tramer, ICML 2022), and
adversarial training is the one classifier defence that has held up under adaptive attacks, so this is where a
detector's robustness can come from; hfguard's own evidence then catches what the checker misses (standard attacks
that leave a robust checker's answer near the model's, minimal attacks on the decision boundary).

Combination (measured on a validation split of Fashion-MNIST, ``benchmarks/robust_checker.py``): each term is put in
units of its clean upper tail, ``(s - median) / (q - median)`` with ``q`` the :data:`GUARD_QUANTILE` quantile of the
guard's score and, per class the model predicts, the :data:`CHECKER_QUANTILE` quantile of the checker's term (a class
with fewer than :data:`MIN_CLASS_ROWS` clean rows takes the pooled tail); the score is the larger of the two, and the
threshold its ``1 - fpr`` quantile on the same clean rows. Both terms are differentiable, so attacks see the whole
defence. Cost: one more forward pass of the checker per ``check``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["checker_term", "tail_units", "class_tail_units", "combined_score", "adversarial_training", "GUARD_QUANTILE", "CHECKER_QUANTILE",
           "MIN_CLASS_ROWS"]

#: the guard score's clean quantile that is one unit of its term
GUARD_QUANTILE = 0.99
#: the checker term's clean quantile (per predicted class) that is one unit of its term
CHECKER_QUANTILE = 0.99
#: clean rows a predicted class needs for tail units of its own (else the pooled ones)
MIN_CLASS_ROWS = 50
#: smallest unit (keeps a tail tied to its median from dividing by zero)
_MIN_UNIT = 1e-6


def checker_term(checker_logits: Tensor, pred: Tensor) -> Tensor:
    """(N,) the checker's cross-entropy on the classes ``pred`` the wrapped model predicts."""
    return F.cross_entropy(checker_logits.float(), pred, reduction="none")


def tail_units(values: Tensor, quantile: float) -> tuple[float, float]:
    """``(median, q - median)`` of clean ``values``: the origin and the unit of a term (the unit floored at 1e-6)."""
    med, q = (float(v) for v in torch.quantile(values.double(), torch.tensor([0.5, quantile], dtype=torch.float64, device=values.device)))
    return med, max(q - med, _MIN_UNIT)


def class_tail_units(values: Tensor, pred: Tensor, num_classes: int, quantile: float = CHECKER_QUANTILE,
                     min_rows: int = MIN_CLASS_ROWS) -> tuple[Tensor, Tensor, int]:
    """Per predicted class, ``(median (K,), unit (K,), classes on the pooled tail)`` of clean ``values``; a class with
    fewer than ``min_rows`` rows takes the pooled median and unit."""
    med0, unit0 = tail_units(values, quantile)
    med = torch.full((num_classes,), med0, dtype=torch.float64)
    unit = torch.full((num_classes,), unit0, dtype=torch.float64)
    pooled = 0
    for c in range(num_classes):  # K small quantiles at fit time, never at check
        rows = values[pred == c]
        if len(rows) >= min_rows:
            med[c], unit[c] = tail_units(rows, quantile)
        else:
            pooled += 1
    return med, unit, pooled


def combined_score(guard_score: Tensor, term: Tensor, pred: Tensor, guard_median: Tensor, guard_unit: Tensor, checker_median: Tensor,
                   checker_unit: Tensor) -> Tensor:
    """(N,) the larger of the guard's score and the checker's term, each in units of its clean tail (in the dtype of
    ``guard_score``)."""
    dtype = checker_median.dtype
    g = (guard_score.to(dtype) - guard_median) / guard_unit
    c = (term.to(dtype) - checker_median[pred]) / checker_unit[pred]
    return torch.maximum(g, c).to(guard_score.dtype)


def adversarial_training(net: nn.Module, x: Tensor, y: Tensor, *, eps: float, epochs: int = 6, steps: int = 5, batch_size: int = 128,
                         lr: float = 1e-3, schedule: str = "constant", seed: int = 0, normalize: tuple[Any, Any] | None = None,
                         progress: bool = False) -> nn.Module:
    """Trains ``net`` (in place) as a checker: PGD adversarial training at L-inf radius ``eps`` in pixel space.

    Each batch: ``steps`` signed-gradient steps of ``2.5 eps / steps`` on the cross-entropy from a uniform random
    start in the eps-ball (``steps=1``: one step of ``1.25 eps``, fast adversarial training, Wong et al. 2020),
    then one Adam step on half the clean and half the adversarial cross-entropy. The measured recipe
    (``benchmarks/robust_checker.py``, Fashion-MNIST): ``steps=5``; the bench's checker, a copy of the model, trains
    12 epochs at half the largest attack radius (on the validation split 12 epochs were evaded less than 6 at both
    budgets; half the radius less than the full one at the small budget, more at the large one).
    ``schedule="cosine"`` decays the learning rate from ``lr`` to 0 over the batches (cosine); ``"constant"`` keeps it.
    ``net`` may be a fresh network or a copy of the wrapped model (``copy.deepcopy(model).requires_grad_(True)``):
    adversarial fine-tuning from the model's weights. On Fashion-MNIST that together with the cosine schedule left
    the checker a little closer to the model (``benchmarks/robust_checker.py --init model --schedule cosine``; the two
    changes were measured together). Parameters with ``requires_grad`` off keep their values (all are frozen on
    return); ``net`` runs in train mode, so its BatchNorm running statistics follow the clean and adversarial batches.

    Args:
        net: the checker, taking the model's inputs (``normalize`` applied) and returning (N, K) logits.
        x: (N, C, H, W) clean pixel images in [0, 1]; y: (N,) labels, or (N, K) class probabilities (e.g. the wrapped
            model's softmax: robust distillation of the model; the cross-entropy takes them as soft targets).
        normalize: ``(mean, std)`` per channel, as given to :func:`hfguard.protect`: the net gets ``(x - mean) / std``.

    Returns:
        ``net`` in eval mode with ``requires_grad`` off and no ``.grad`` (a checker is only attacked, never trained, by the guard).
    """
    if x.dim() != 4 or y.dim() not in (1, 2) or len(x) != len(y):
        raise ValueError(f"expected images (N, C, H, W) and labels (N,) or probabilities (N, K), got {tuple(x.shape)} and {tuple(y.shape)}")
    y = y.detach().to(x.device)  # a softmax computed with gradients must not tie each step to the model's graph
    if y.dtype.is_floating_point != (y.dim() == 2):
        raise ValueError(f"expected integer labels (N,) or floating-point probabilities (N, K), got a {y.dim()}-d {y.dtype} tensor")
    if y.dim() == 2 and len(y) and (bool((y < 0).any()) or float((y.sum(1) - 1).abs().max()) > 1e-3):
        raise ValueError("probability targets (N, K) must be non-negative with rows summing to 1 (pass softmax outputs, not logits)")
    if steps < 1 or epochs < 1 or not eps > 0:
        raise ValueError(f"need steps >= 1, epochs >= 1 and eps > 0; got steps={steps}, epochs={epochs}, eps={eps}")
    if not any(p.requires_grad for p in net.parameters()):
        raise ValueError("the checker has no trainable parameters (requires_grad is off for all of them); for a copy of a frozen model "
                         "call copy.deepcopy(model).requires_grad_(True)")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if normalize is None:
        mean = std = None
    else:
        mean, std = (torch.as_tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) for v in normalize)

    def forward(pixels: Tensor) -> Tensor:
        return net(pixels if mean is None else (pixels - mean) / std)

    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    step = 1.25 * eps if steps == 1 else 2.5 * eps / steps
    batches, done = epochs * -(-len(x) // batch_size), 0
    for _ in tqdm(range(epochs), desc="checker adversarial training (epochs)", disable=not progress, leave=False):
        net.train()
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        for i in range(0, len(x), batch_size):
            xb, yb = x[perm[i : i + batch_size]], y[perm[i : i + batch_size]]
            delta = ((torch.rand(xb.shape, generator=gen) * 2 - 1) * eps).to(xb.device)  # drawn on the CPU: the same start on any device
            xa = sign_steps(lambda xr: F.cross_entropy(forward(xr), yb), xb, (xb + delta).clamp(0, 1), eps, step, steps)  # noqa: B023
            if schedule == "cosine":
                for g in opt.param_groups:
                    g["lr"] = 0.5 * lr * (1 + math.cos(math.pi * done / batches))
            opt.zero_grad()
            (0.5 * F.cross_entropy(forward(xb), yb) + 0.5 * F.cross_entropy(forward(xa), yb)).backward()
            opt.step()
            done += 1
    for p in net.parameters():
        p.requires_grad_(False)
        p.grad = None
    return net.eval()


def sign_steps(loss_of: Any, xb: Tensor, xa: Tensor, eps: float, step: float, steps: int) -> Tensor:
    """``steps`` signed-gradient ascent steps on ``loss_of`` from ``xa``, each projected to the eps-ball around ``xb`` and [0, 1]."""
    for _ in range(steps):
        xr = xa.requires_grad_(True)
        g = torch.autograd.grad(loss_of(xr), xr)[0]
        xa = (xb + (xr.detach() - xb + step * g.sign()).clamp(-eps, eps)).clamp(0, 1)
    return xa
