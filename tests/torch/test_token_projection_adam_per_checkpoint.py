"""With preconditioner="adam" and several checkpoints, each checkpoint's rows are preconditioned by that
checkpoint's own optimizer state: the Kronecker segments' rank-one scales and the plain segments' exact
g / (sqrt(v_hat) + eps), against float64 NumPy on autograd's per-example gradients."""

from __future__ import annotations

import copy

import numpy as np
import torch
from test_token_projection import (
    assert_rows_close,
    autograd_grads,
    model_and_checkpoints,
    projected_reference,
    sequences,
    token_loss,
)

import tracin
from tracin.torch import export_gradients


def _two_adam_checkpoints(model, ids, labels):
    """Two checkpoints of one Adam run (3 steps, then 4 more): different weights and moments."""
    opt = torch.optim.Adam(model.parameters(), lr=0.02, betas=(0.8, 0.99), eps=1e-6)
    out = []
    for steps in (3, 4):
        for _ in range(steps):
            opt.zero_grad()
            token_loss(model(ids), labels).mean().backward()
            opt.step()
        out.append((copy.deepcopy(model.state_dict()), 0.02, copy.deepcopy(opt.state_dict())))
    return out


def _scaled_reference(model, checkpoint, ids, labels, lengths):
    """Per example the float64 gradients preconditioned as the module documents, by `checkpoint`'s state."""
    state, _, opt_state = checkpoint
    names = [n for n, _ in model.named_parameters()]
    group = opt_state["param_groups"][0]
    b2, eps = group["betas"][1], group["eps"]
    v = {
        n: opt_state["state"][i]["exp_avg_sq"].double().numpy() / (1 - b2 ** float(opt_state["state"][i]["step"]))
        for i, n in enumerate(names)
    }
    out = []
    for grads in autograd_grads(model, state, ids, labels, lengths):
        scaled = dict(grads)
        for w, b in (("fc.weight", "fc.bias"), ("head.weight", "head.bias")):
            vw = np.hstack([v[w], v[b][:, None]]) + eps**2
            r, c = vw.sum(1), vw.sum(0)
            scale = np.sqrt(r.sum() / r)[:, None] / np.sqrt(c)[None, :]
            scaled[w] = grads[w] * scale[:, :-1]
            scaled[b] = grads[b] * scale[:, -1]
        for p in ("ln.weight", "ln.bias"):
            scaled[p] = grads[p] / (np.sqrt(v[p]) + eps)
        out.append(scaled)
    return out


def test_each_checkpoints_rows_are_preconditioned_by_its_own_adam_state():
    model, _ = model_and_checkpoints(seed=3)
    ids, labels, lengths = sequences(6, 5, seed=4)
    checkpoints = _two_adam_checkpoints(model, ids, labels)
    proj = tracin.Projection(4 * 9, 7, per_layer=True, kronecker=True)
    g = export_gradients(
        model,
        checkpoints,
        (ids, labels),
        token_loss,
        layers=["fc", "ln", "head"],
        projection=proj,
        preconditioner="adam",
        batch_size=4,
        progress=False,
    )
    chosen = ["fc.weight", "fc.bias", "ln.weight", "ln.bias", "head.weight", "head.bias"]
    layout = g.metadata["projection"]["segments"]
    assert [isinstance(s, dict) for s in layout] == [True, False, False, True]
    for c, checkpoint in enumerate(checkpoints):
        want = projected_reference(proj, layout, _scaled_reference(model, checkpoint, ids, labels, lengths), chosen)
        assert_rows_close(np.asarray(g.matrices[c]), want)
