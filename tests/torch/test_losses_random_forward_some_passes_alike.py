"""losses.random_forward on a forward whose randomness is a coin flip per pass (LayerDrop: a whole block skipped for
the batch with probability 1/2): two of its three passes may agree and the third not, and that is still a random
forward (r363 mutation testing: `not all(...)` turned into `not any(...)` went unseen, every other random forward
tested drawing continuous noise, whose three passes never agree)."""

from __future__ import annotations

import torch
from torch import nn

from tracin.torch.losses import random_forward


class _LayerDrop(nn.Module):
    """A residual block skipped for the whole batch when one uniform draw (one a forward) is below 1/2."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        if torch.rand(()) >= 0.5:
            x = x + torch.tanh(self.inner(x))
        return self.head(x)


def _three_draws(seed: int) -> list[bool]:
    torch.manual_seed(seed)
    return [bool(torch.rand(()) >= 0.5) for _ in range(3)]


def test_a_forward_whose_three_passes_are_not_all_alike_is_random_even_when_two_agree():
    torch.manual_seed(0)
    model = _LayerDrop()
    state = dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)
    loss = nn.CrossEntropyLoss(reduction="none")
    # seeds whose three passes run the block as (kept, skipped, kept) and (kept, kept, skipped): the first pass agrees
    # with one of the others, not with both
    patterns = {(True, False, True): None, (True, True, False): None}
    for seed in range(200):
        drawn = tuple(_three_draws(seed))
        if drawn in patterns and patterns[drawn] is None:
            patterns[drawn] = seed
    assert None not in patterns.values()
    for drawn, seed in patterns.items():
        torch.manual_seed(seed)
        assert random_forward(model, state, loss, x, y), drawn
    # three passes alike (the block kept each time) are not random
    torch.manual_seed(next(s for s in range(200) if _three_draws(s) == [True, True, True]))
    assert not random_forward(model, state, loss, x, y)
