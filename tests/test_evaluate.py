import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from hfguard.evaluate import auroc


def test_auroc_matches_sklearn_and_takes_the_infinite_scores_a_guard_gives():
    """Review: auroc raised on the inf scores a nonfinite="flag" guard gives NaN/Inf images."""
    gen = torch.Generator().manual_seed(0)
    neg, pos = torch.randn(200, generator=gen), torch.randn(150, generator=gen) + 1
    labels = np.r_[np.zeros(200), np.ones(150)]
    assert auroc(neg, pos, bootstrap=0)[0] == pytest.approx(roc_auc_score(labels, np.r_[neg.numpy(), pos.numpy()]))
    with_inf = pos.clone()
    with_inf[:10] = float("inf")  # above everything: as a score larger than every finite one
    as_large = pos.clone()
    as_large[:10] = 1e6
    assert auroc(neg, with_inf, bootstrap=20)[0] == pytest.approx(auroc(neg, as_large, bootstrap=0)[0])
    neg_inf = neg.clone()
    neg_inf[0] = float("-inf")
    assert np.isfinite(auroc(neg_inf, with_inf, bootstrap=0)[0])
    with pytest.raises(ValueError, match="NaN"):
        auroc(neg, torch.tensor([float("nan"), 1.0]))


def test_infinite_scores_rank_above_huge_finite_ones():
    """Review: inf was mapped to max + 1, which is lost for scores >= 2**53."""
    assert auroc(torch.tensor([1e17, 0.0]), torch.tensor([float("inf"), float("inf")]), bootstrap=0)[0] == 1.0
