"""Linear heads over standardised evidence, combined by a smooth maximum: the guard's score.

The score of a row with class-standardised evidence ``z`` (F,) is

    score = t * logsumexp((W @ z + b) / t)

with one row of ``W`` per *head*.  Two ways of fitting the heads:

* ``calibration="clean"`` (no adversarial example seen): ``W`` is the identity over the
  chosen features and ``b = 0``, i.e. the smooth maximum of the standardised evidence
  (a differentiable min-p-value rule, :func:`identity_heads`);
* ``calibration="self-attack"``: one L2-regularised logistic regression per self-attack family
  (:mod:`hfguard.selfattack`: FGSM, PGD L-inf and L2, a random search: strong attacks; minimal PGD and CW-L2:
  "boundary" attacks)
  separates clean evidence from the evidence of attacks the guard generated on its own clean
  data (:func:`fit_logistic_head`); each head is rescaled so that its clean upper tails line
  up (:func:`standardised_head`) and the maximum gives each family a like share of the false
  alarms. One head cannot serve both regimes (trained on strong attacks it unlearns the
  margin that exposes CW), and one head per family beat one per regime on the ResNet's
  validation attacks but CW (``benchmarks/combiner_validation.py``).

Everything is one matmul and a logsumexp: differentiable, stored in two buffers, exportable.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["identity_heads", "fit_logistic_head", "standardised_head", "head_score", "TAIL_QUANTILE", "SHARPNESS"]

#: clean quantile of each head aligned by :func:`standardised_head`
TAIL_QUANTILE = 0.99
#: head units per (tail quantile - median) on clean data: how close the smooth maximum over heads is to a hard one
SHARPNESS = 8.0


def identity_heads(num_features: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """``(W, b)`` that make every evidence feature its own head: the clean-only smooth maximum."""
    return torch.eye(num_features, dtype=dtype, device=device), torch.zeros(num_features, dtype=dtype, device=device)


def fit_logistic_head(z_clean: Tensor, z_attack: Tensor, *, l2: float = 1e-3, max_iter: int = 200) -> tuple[Tensor, float]:
    """Class-balanced, L2-regularised logistic regression: clean (label 0) vs attacked (label 1).

    Args:
        z_clean: (Nc, F) standardised evidence of clean images.
        z_attack: (Na, F) standardised evidence of successful adversarial images.
        l2: penalty on ``||w||^2`` (the evidence is standardised, so one value fits all models).
        max_iter: L-BFGS iterations.

    Returns:
        ``(w, b)``: weights (F,) and bias; ``z @ w + b`` is the log-odds of "attacked".

    Raises:
        ValueError: either set is empty or the feature counts differ.
    """
    if z_clean.dim() != 2 or z_attack.dim() != 2 or z_clean.shape[1] != z_attack.shape[1]:
        raise ValueError(f"expected (N, F) clean and attacked evidence with the same F, got {tuple(z_clean.shape)} and {tuple(z_attack.shape)}")
    if len(z_clean) == 0 or len(z_attack) == 0:
        raise ValueError(f"need clean and attacked rows to fit a head, got {len(z_clean)} and {len(z_attack)}")
    x = torch.cat([z_clean, z_attack]).double()
    y = torch.cat([z_clean.new_zeros(len(z_clean)), z_clean.new_ones(len(z_attack))]).double()
    weight = torch.where(y > 0, 0.5 / len(z_attack), 0.5 / len(z_clean))
    w = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none")).sum() + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().to(z_clean.dtype), float(b.detach())


def standardised_head(w: Tensor, b: float, z_clean: Tensor) -> tuple[Tensor, float]:
    """Rescales a head so that its clean upper tail sits at a common place: 0 at the ``TAIL_QUANTILE`` of its
    output on ``z_clean`` and one unit = ``(tail quantile - median) / SHARPNESS``.

    Heads of different regimes have clean outputs of different shapes (the boundary head's, driven by the
    decision margin, has a heavy upper tail); aligning the tails rather than the means and spreads gives each
    head a like share of the false alarms, and the sharp units make the smooth maximum over heads nearly a
    hard one (a soft one lifts clean rows on which both heads are middling). Measured on validation attacks
    (``benchmarks/combiner_validation.py``).
    """
    h = (z_clean @ w + b).double()
    if h.numel() == 0 or not bool(torch.isfinite(h).all()):
        raise ValueError(f"a head's clean outputs must be finite and non-empty; got {h.numel()} rows, {int((~torch.isfinite(h)).sum())} not finite")
    med, tail = (float(v) for v in torch.quantile(h, torch.tensor([0.5, TAIL_QUANTILE], dtype=h.dtype, device=h.device)))
    sd = float(h.std()) if h.numel() > 1 else 0.0
    spread = tail - med
    if not spread > 1e-3 * sd:  # a tail tied to the median (a point mass): a Gaussian's distance between the two instead
        spread = 2.33 * sd if sd > 0 else 1.0
    unit = spread / SHARPNESS
    return w / unit, (b - tail) / unit


def head_score(z: Tensor, weight: Tensor, bias: Tensor, temperature: float = 1.0) -> Tensor:
    """``t * logsumexp((z @ W.T + b) / t)``: the score (N,) from standardised evidence ``z`` (N, F).

    Args:
        z: (N, F) class-standardised evidence.
        weight: (H, F) heads.
        bias: (H,) biases.
        temperature: softness of the maximum over heads.
    """
    return temperature * torch.logsumexp((z @ weight.T + bias) / temperature, dim=1)
