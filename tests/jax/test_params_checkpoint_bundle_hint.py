"""bundle_hint: params that are a whole training checkpoint (a pickled {"variables": ..., "opt_state": ...,
"step": ...}) are recognised by their top-level entries, and the hint names the entry to pass as the params
(and the optimizer state's, for preconditioner="adam"); params of a model alone get no hint."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tracin.jax.params import bundle_hint, layout_of

PARAMS = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}


def _hint(params) -> str:
    return bundle_hint(layout_of(params, None))


def test_a_variables_and_opt_state_bundle_names_variables_and_the_optimizer_state():
    bundle = {"variables": {"params": PARAMS}, "opt_state": optax.adam(1e-3).init(PARAMS), "step": 3}
    assert _hint(bundle) == (
        "; params look like a whole training checkpoint (entries 'opt_state', 'step', 'variables'), while loss_fn "
        "gets each checkpoint as given: pass ckpt['variables'] as the checkpoint's params, with ckpt['opt_state'] "
        "as the third item for preconditioner='adam'"
    )


def test_a_train_state_dict_names_params_and_the_linen_form():
    bundle = {"params": PARAMS, "opt_state": optax.sgd(0.1).init(PARAMS), "step": np.asarray(3)}
    hint = _hint(bundle)
    assert "pass ckpt['params'] (or {'params': ckpt['params']} where loss_fn calls a Flax linen model's apply)" in hint
    assert "ckpt['opt_state'] as the third item" in hint


@pytest.mark.parametrize("state", ["optimizer", "optimizer_state", "opt"])
def test_a_bundle_names_its_optimizer_state_by_the_key_it_has(state):
    hint = _hint({"model": PARAMS, state: {"mu": jnp.ones(2)}, "epoch": np.asarray(2)})
    assert f"pass ckpt['model'] as the checkpoint's params, with ckpt[{state!r}] as the third item" in hint, hint


@pytest.mark.parametrize(
    "params",
    [
        PARAMS,
        {"params": PARAMS},  # linen variables
        {"params": PARAMS, "batch_stats": {"mean": jnp.zeros(2)}},
        {"variables": PARAMS},  # a model entry alone
        {"step": np.asarray(1), "w": jnp.ones(2)},  # a training entry alone
        # a model entry and a step or epoch, no optimizer state: a dict a loss may read (p["model"], p["step"])
        {"model": PARAMS, "step": jnp.float32(1.0)},
        {"params": PARAMS, "step": np.asarray(3)},
        {"weights": PARAMS, "epoch": np.asarray(2)},
        [PARAMS, {"opt_state": jnp.ones(2)}],
    ],
)
def test_params_of_a_model_alone_get_no_hint(params):
    assert _hint(params) == ""


def test_a_loss_reading_a_model_and_step_dict_failing_otherwise_is_not_told_it_got_a_checkpoint():
    from tracin.jax import export_gradients

    params = {"model": {"w": jnp.ones((3, 2))}, "step": jnp.float32(1.0)}

    def loss(p, x, y):
        return ((x @ p["model"]["w"] * p["step"] - y) ** 2).sum(-1)

    inputs = np.ones((4, 5), np.float32)  # 5 features where w has 3 rows: the loss fails on its inputs
    with pytest.raises(ValueError, match=r"loss_fn\(params, inputs, targets\) failed") as caught:
        export_gradients(loss, [(params, 0.1)], (inputs, np.zeros((4, 2), np.float32)), progress=False)
    assert "whole training checkpoint" not in str(caught.value), caught.value
