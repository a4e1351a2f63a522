"""The compiled per-example functions' guards: reduced losses and wrong layer inputs are refused."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from tracin.jax import export_gradients


@pytest.mark.parametrize(
    "reduce, message",
    [
        (jnp.mean, r"per-example losses of shape \(64,\) for a batch of 64, got \(\) \(a mean or sum"),
        (lambda losses: losses[:, None], r"shape \(64,\) for a batch of 64, got \(64, 1\)"),
        (lambda losses: (losses > 1).astype(jnp.int32), "floating-point losses, got dtype int32"),
    ],
)
def test_reduced_or_misshaped_losses_are_refused(mlp, data, reduce, message):
    x, y = data
    with pytest.raises(ValueError, match=message):
        export_gradients(lambda p, a, b: reduce(mlp.loss_fn(p, a, b)), [(mlp.params[0], 1.0)], (x, y), progress=False)


def test_a_failing_loss_is_reported_with_its_argument(mlp, data):
    x, y = data
    with pytest.raises(ValueError, match=r"loss_fn\(params, inputs, targets\) failed on a batch of 64: .*missing"):
        export_gradients(
            lambda p, a, b: mlp.loss_fn(p["missing"], a, b), [(mlp.params[0], 1.0)], (x, y), progress=False
        )


@pytest.mark.parametrize(
    "layer_input, message",
    [
        (lambda p, x: x, r"must return the \(batch, 8\) input of l2/kernel, got shape \(64, 5\)"),
        (lambda p, x: jnp.maximum(x @ p["l1"]["kernel"], 0), "does not return the input of l2/kernel"),
        (lambda p, x: p["nope"], r"layer_input\(params, inputs\) failed"),
    ],
)
def test_wrong_layer_inputs_are_refused(mlp, data, layer_input, message):
    x, y = data
    with pytest.raises(ValueError, match=message):
        export_gradients(
            mlp.loss_fn,
            [(mlp.params[0], 1.0)],
            (x, y),
            mode="last_layer",
            layers=["l2"],
            layer_input=layer_input,
            progress=False,
        )


@pytest.mark.parametrize("layers", [["l1", "l2"], ["l2/kernel"], ["l2/bias"]])
def test_last_layer_needs_one_kernel_and_one_bias(mlp, data, layers):
    x, y = data
    with pytest.raises(ValueError, match="must name one dense layer"):
        export_gradients(
            mlp.loss_fn,
            [(mlp.params[0], 1.0)],
            (x, y),
            mode="last_layer",
            layers=layers,
            layer_input=mlp.hidden,
            progress=False,
        )
