"""mode="factored" with a chosen nn.Linear that the forward never runs (a head left unused beside one that is): the
factors need exactly one call per layer, so the export is refused with a ValueError naming that layer and its
0 calls and pointing at mode='full', not an IndexError from inside tracin (r363 mutation testing: the check
`len(calls) != 1` weakened to `> 1` went unseen)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tracin.torch import export_gradients


class _UnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head, self.spare = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))  # self.spare never runs


def test_a_chosen_layer_that_never_runs_is_refused_naming_it_and_its_zero_calls():
    torch.manual_seed(0)
    model = _UnusedHead()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    with pytest.raises(
        ValueError,
        match=r"mode='factored': layer 'spare' ran 0 times in one forward pass; .*"
        r"Use mode='full' with layers=\['head', 'spare'\]",
    ):
        export_gradients(
            model,
            [(model.state_dict(), 1.0)],
            (x, y),
            nn.CrossEntropyLoss(reduction="none"),
            mode="factored",
            layers=["head", "spare"],
            progress=False,
        )
