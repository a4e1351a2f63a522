"""A float16 model's factors are judged by the first-rows check in float32 (LinearFactors._check's _upcast look),
not only by its float64 look: where there is no memory for a float64 copy of the state (float64_room gives why),
a deep float16 MLP, whose own float16 autograd reference is off (subnormal per-row gradients), is still exported,
its rows those of float64 autograd within float16 rounding (r363 mutation testing: the float32 look skipped went
unseen, the float64 look hiding it)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tracin.torch import export_gradients, last_layer


def _deep_half_mlp() -> nn.Sequential:
    """Depth 8, width 128, float16: per-row weight gradients of its first layer are subnormal or zero in float16."""
    torch.manual_seed(8)
    mods: list[nn.Module] = []
    for k in range(8):
        mods += [nn.Linear(64 if k == 0 else 128, 128), nn.GELU()]
    return nn.Sequential(*mods, nn.Linear(128, 1000)).half()


def _loss(outputs, targets):
    return nn.functional.cross_entropy(outputs.float(), targets, reduction="none")


def _float64_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str) -> np.ndarray:
    """Per-example float64 autograd gradients of [weight | bias] of `layer`, each example alone."""
    m = copy.deepcopy(model).double()
    params = dict(m.named_parameters())
    rows = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(m(x[i : i + 1].double()), y[i : i + 1], reduction="none").sum()
        dw, db = torch.autograd.grad(loss, [params[f"{layer}.weight"], params[f"{layer}.bias"]])
        rows.append(torch.cat([dw, db[:, None]], dim=1).reshape(-1))
    return torch.stack(rows).numpy()


@pytest.mark.parametrize(("mode", "layers"), [("last_layer", ["0"]), ("factored", ["0", "16"])])
def test_a_float16_mlp_passes_the_check_in_float32_without_room_for_float64(mode, layers, monkeypatch):
    monkeypatch.setattr(last_layer, "float64_room", lambda state: "the float64 check was skipped for lack of memory")
    model = _deep_half_mlp()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 64, generator=g).half(), torch.randint(0, 1000, (8,), generator=g)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got = export_gradients(model, [(state, 1.0)], (x, y), _loss, mode=mode, layers=layers, progress=False)
    for c, layer in enumerate(layers):
        left, right = got.left[c].astype(np.float64), got.right[c].astype(np.float64)
        rows = np.einsum("no,ni->noi", left, right).reshape(len(y), -1)
        want = _float64_rows(model, x, y, layer)
        err = np.linalg.norm(rows - want, axis=1) / np.linalg.norm(want, axis=1)
        assert err.max() < 8 * np.finfo(np.float16).eps, (layer, err.max())
