"""The per-example gradient warnings a CNN user meets on every export (its Conv2d / BatchNorm2d left to
torch.func.vmap; a BatchNorm without running statistics) point at the user's export_gradients line, as
tracin's other warnings do, not at a line inside tracin: `warnings.filterwarnings(..., module=...)` and
the shown source line are the caller's."""

import warnings

import torch
import torch.nn as nn

import tracin.torch


def _caught(model: nn.Module) -> list[warnings.WarningMessage]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 1, 6, 6, generator=g), torch.randint(0, 3, (6,), generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracin.torch.export_gradients(
            model, [(model.state_dict(), 0.1)], (x, y), nn.CrossEntropyLoss(reduction="none"), progress=False
        )
    return list(caught)


def test_layers_left_to_vmap_are_warned_at_the_callers_line() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    ours = [w for w in _caught(model) if "computed with torch.func.vmap instead" in str(w.message)]
    assert len(ours) == 1
    assert ours[0].filename == __file__


def test_batch_norm_without_running_statistics_is_warned_at_the_callers_line() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    )
    ours = [w for w in _caught(model) if "mix the examples of a batch even in eval mode" in str(w.message)]
    assert len(ours) == 1
    assert ours[0].filename == __file__
