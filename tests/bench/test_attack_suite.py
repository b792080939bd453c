"""The bench's attack suite: torchattacks rows must not depend on what ran before them."""

from __future__ import annotations

import pytest
import torch

from hfguard.bench import preset
from hfguard.bench.attack_suite import torchattacks_attacks

pytest.importorskip("torchattacks")


def test_torchattacks_pgd_is_seeded_per_call_and_leaves_the_global_generator_alone(digits_model, digits):
    cfg = preset("digits")
    pgd = torchattacks_attacks(cfg)[f"torchattacks PGD eps={cfg.eps_lo}"]
    x, y = digits.x_test[:64], digits.y_test[:64]
    torch.manual_seed(123)
    first = pgd(digits_model, x, y)
    after_first = torch.rand(3)
    torch.manual_seed(7)  # another global state: the row must not change
    torch.rand(11)
    second = pgd(digits_model, x, y)
    assert torch.equal(first, second)
    assert (first - x).abs().amax() <= cfg.eps_lo + 1e-6
    assert not torch.equal(first, x)
    # the caller's generator continues as if the attack had drawn nothing
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_first)
