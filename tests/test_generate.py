"""pick_next: top-p keeps the smallest set whose mass reaches top_p; top_k=1 is greedy."""

import math

import pytest
import torch

from charlm.generate import pick_next

PROBS = [0.5, 0.25, 0.25]


def _draws(top_p: float, n: int = 20_000) -> torch.Tensor:
    logits = torch.tensor([math.log(p) for p in PROBS]).repeat(n, 1)  # (n, 3)
    g = torch.Generator().manual_seed(0)
    return pick_next(logits, 1.0, top_p=top_p, generator=g)


def test_top_p_reaching_the_mass_exactly_keeps_only_that_prefix():
    assert torch.softmax(torch.tensor([math.log(p) for p in PROBS]), -1).tolist() == PROBS  # exact in float32
    assert set(_draws(0.5).tolist()) == {0}  # .5 alone reaches top_p=.5: the second token is never drawn
    counts = torch.bincount(_draws(0.75), minlength=3)
    assert counts[2] == 0 and counts[0] > 0 and counts[1] > 0  # .5 + .25 reaches .75: exactly the first two
    assert abs(counts[0].item() / counts.sum().item() - 2 / 3) < 0.03  # renormalised over the kept tokens


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9, 1.0])
def test_top_p_never_drops_everything_and_keeps_a_prefix(top_p):
    kept = set(_draws(top_p, 5_000).tolist())
    expected = {0} if top_p <= 0.5 else {0, 1} if top_p <= 0.75 else {0, 1, 2}
    assert kept == expected


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_top_k_1_is_greedy(temperature):
    logits = torch.randn(2_000, 65, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    picked = pick_next(logits, temperature, top_k=1, generator=g)
    assert torch.equal(picked, pick_next(logits, 0.0))
    assert torch.equal(picked, logits.argmax(-1))
