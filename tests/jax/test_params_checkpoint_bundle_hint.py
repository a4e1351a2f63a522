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


def test_a_bundle_with_a_step_and_no_optimizer_state_names_no_third_item():
    hint = _hint({"model": PARAMS, "epoch": np.asarray(2)})
    assert "pass ckpt['model'] as the checkpoint's params" in hint and "third item" not in hint, hint


@pytest.mark.parametrize(
    "params",
    [
        PARAMS,
        {"params": PARAMS},  # linen variables
        {"params": PARAMS, "batch_stats": {"mean": jnp.zeros(2)}},
        {"variables": PARAMS},  # a model entry alone
        {"step": np.asarray(1), "w": jnp.ones(2)},  # a training entry alone
        [PARAMS, {"opt_state": jnp.ones(2)}],
    ],
)
def test_params_of_a_model_alone_get_no_hint(params):
    assert _hint(params) == ""
