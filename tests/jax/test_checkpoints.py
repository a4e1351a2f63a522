"""Checkpoint entries: in-memory pytrees, orbax directories, Flax msgpack files, and bad lists."""

from __future__ import annotations

import functools
import pickle
import re
import warnings
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization
from flax.core import freeze

import tracin
from tracin.jax import export_gradients
from tracin.jax.checkpoints import parse_checkpoints


def test_saved_checkpoints_give_the_in_memory_gradients(mlp, data, tmp_path):
    x, y = data
    saver = ocp.StandardCheckpointer()
    saver.save(tmp_path / "ckpt0", mlp.params[0])
    saver.wait_until_finished()
    (tmp_path / "ckpt1.msgpack").write_bytes(serialization.msgpack_serialize(mlp.params[1]))
    in_memory = export_gradients(mlp.loss_fn, list(zip(mlp.params, mlp.lrs, strict=True)), (x, y), progress=False)
    on_disk = export_gradients(
        mlp.loss_fn,
        [(tmp_path / "ckpt0", mlp.lrs[0]), (str(tmp_path / "ckpt1.msgpack"), mlp.lrs[1])],
        (x, y),
        progress=False,
    )
    for a, b in zip(in_memory.matrices, on_disk.matrices, strict=True):
        np.testing.assert_array_equal(a, b)
    digests = on_disk.metadata["fingerprints"]["checkpoints"]
    assert len(set(digests)) == 2 and digests != in_memory.metadata["fingerprints"]["checkpoints"]
    with pytest.raises(FileNotFoundError, match=r"checkpoints\[0\]: no checkpoint at .*missing"):
        export_gradients(mlp.loss_fn, [(tmp_path / "missing", 1.0)], (x, y), progress=False)


@pytest.mark.parametrize(
    "checkpoints, error, message",
    [
        ("ckpt", TypeError, "sequence of \\(params pytree or path, learning_rate\\) pairs"),
        ([], ValueError, "at least one"),
        ([{"w": 1}], TypeError, r"checkpoints\[0\] must be a \(params pytree or path, learning_rate\) pair"),
        ([({"w": 1}, "fast")], TypeError, r"checkpoints\[0\]\[1\] \(learning rate\) must be a real number"),
        ([({"w": 1}, "0.1")], TypeError, r"checkpoints\[0\]\[1\] \(learning rate\) must be a real number"),
        ([({"w": 1}, True)], TypeError, r"checkpoints\[0\]\[1\] \(learning rate\) must be a real number"),
        (
            [({"w": 1}, 0.1), ({"w": 1}, float("nan"))],
            ValueError,
            r"checkpoints\[1\]\[1\] \(learning rate\) must be finite",
        ),
    ],
)
def test_bad_checkpoint_lists(checkpoints, error, message):
    with pytest.raises(error, match=message):
        parse_checkpoints(checkpoints)


def test_checkpoints_must_share_the_first_structure(mlp, data):
    x, y = data
    other = {**mlp.params[1], "l3": {"kernel": mlp.params[1]["l2"]["kernel"]}}
    with pytest.raises(ValueError, match=r"checkpoints\[1\]: the params pytree differs.*l3/kernel"):
        export_gradients(mlp.loss_fn, [(mlp.params[0], 1.0), (other, 1.0)], (x, y), progress=False)
    fewer = {"l1": mlp.params[1]["l1"], "l2": {"bias": mlp.params[1]["l2"]["bias"]}}
    with pytest.raises(ValueError, match=r"checkpoints\[1\]: the params pytree differs.*l2/kernel"):
        export_gradients(mlp.loss_fn, [(mlp.params[0], 1.0), (fewer, 1.0)], (x, y), progress=False)
    wrong = {
        "l1": mlp.params[1]["l1"],
        "l2": {"kernel": mlp.params[1]["l2"]["kernel"][:, :2], "bias": mlp.params[1]["l2"]["bias"][:2]},
    }
    with pytest.raises(ValueError, match=r"checkpoints\[1\]: parameter 'l2/bias' has shape \(2,\)"):
        export_gradients(mlp.loss_fn, [(mlp.params[0], 1.0), (wrong, 1.0)], (x, y), progress=False)


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("empty", [None, {}])
def test_a_checkpoint_with_no_leaves_is_named(mlp, data, index, empty):
    """params None or {} said 'params has no leaves' without naming the checkpoint."""
    x, y = data
    ckpts = [(mlp.params[0], 1.0), (mlp.params[1], 1.0)]
    ckpts[index] = (empty, 1.0)
    with pytest.raises(ValueError, match=rf"checkpoints\[{index}\]: params {empty!r} has no leaves"):
        export_gradients(mlp.loss_fn, ckpts, (x, y), progress=False)


_W = np.ones((5, 3), np.float32)


@pytest.mark.parametrize(
    "first, later, message",
    [
        (np.float32(2.0), 2, r"'t' is a static \(non-array\) value \(int\), the first checkpoint's is a floating "),
        (np.ones(2, np.float32), np.ones(2, np.int32), r"'t' is a non-floating array \(int32 array\), the first.*"),
        (np.int32(2), np.float32(2.0), r"'t' is a floating array or scalar \(NumPy float32 scalar\), the first "),
        (np.ones(2, np.int32), np.ones(2, np.float32), r"'t' is a floating .*the first checkpoint's is a non-float"),
        (jnp.tanh, np.ones(2, np.float32), r"'t' is a floating .*\(float32 array\), .* static .*\(PjitFunction\)"),
    ],
)
def test_a_leaf_changing_kind_between_checkpoints_is_named(data, first, later, message):
    """A leaf that is an array in one checkpoint and a static value in another (the zip() of the static leaves
    raised a bare 'zip() argument 2 is longer'), or floating in one and integer in the other (a bare jax.grad
    TypeError, or silently not differentiated): a ValueError naming the leaf and the checkpoint."""
    x, y = data

    def loss(p, inputs, targets):
        logits = inputs @ p["w"]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=1)[:, 0]

    ckpts = [({"w": _W, "t": first}, 1.0), ({"w": _W, "t": later}, 1.0)]
    with pytest.raises(ValueError, match=r"checkpoints\[1\]: leaf " + message):
        export_gradients(loss, ckpts, (x, y), progress=False)


def test_a_float_leaf_may_be_an_array_in_one_checkpoint_and_a_python_float_in_another(data):
    x, y = data

    def loss(p, inputs, targets):
        logits = inputs @ p["w"] / p["t"]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=1)[:, 0]

    mixed = export_gradients(
        loss, [({"w": _W, "t": jnp.float32(2)}, 1.0), ({"w": _W, "t": 2.0}, 1.0)], (x, y), progress=False
    )
    np.testing.assert_array_equal(mixed.matrices[0], mixed.matrices[1])


class _Tagged(eqx.Module):
    w: jax.Array
    tag: str = eqx.field(static=True)


def _container_cases(tmp_path):
    frozen = freeze({"params": {"w": _W}})
    saved = tmp_path / "c1.msgpack"
    saved.write_bytes(serialization.to_bytes(frozen))  # restored as plain dicts
    held = "the node holding "
    dict_then_frozen = (
        held + r"'params/w' is a flax.core.frozen_dict.FrozenDict here and a dict in the first checkpoint"
    )
    return [
        ([frozen, saved], lambda p: p["params"]["w"], held + r"'params/w' is a dict here and a flax.core.frozen_dict"),
        ([{"params": {"w": _W}}, frozen], lambda p: p["params"]["w"], dict_then_frozen),
        ([{"w": [_W]}, {"w": (_W,)}], lambda p: p["w"][0], held + r"'w/0' is a tuple here and a list in the first"),
        # nodes without leaves: named by the next leaf (it said 'the node holding' the next leaf)
        (
            [{"s": {}, "w": _W}, {"s": [], "w": _W}],
            lambda p: p["w"],
            r"an empty node before 'w' is a list here and a dict in the first",
        ),
        (
            [{"w": _W, "z": None}, {"w": _W, "z": ()}],
            lambda p: p["w"],
            r"an empty node after the last leaf is a tuple here and a NoneType in the first",
        ),
    ]


@pytest.mark.parametrize("case", range(5))
def test_checkpoints_differing_only_in_containers_name_the_first_differing_node(data, tmp_path, case):
    """Same leaf paths, other container types (a FrozenDict first checkpoint, its msgpack save restored as
    dicts; a list vs a tuple): the node and both types are named (the message was 'same paths, different
    structure')."""
    x, y = data
    params, kernel, message = _container_cases(tmp_path)[case]

    def loss(p, inputs, targets):
        logits = inputs @ kernel(p)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=1)[:, 0]

    with pytest.raises(
        ValueError,
        match=r"checkpoints\[1\]: the params pytree has the first checkpoint's leaf "
        r"paths but other containers: " + message + ".*flax.core.unfreeze",
    ):
        export_gradients(loss, [(p, 1.0) for p in params], (x, y), progress=False)


def _eqx_loss(model, inputs, targets):
    return -jnp.take_along_axis(jax.nn.log_softmax(jax.vmap(model)(inputs)), targets[:, None], axis=1)[:, 0]


@pytest.mark.parametrize(
    "first, later, message",
    [
        (
            eqx.nn.MLP(5, 3, 4, 1, key=jax.random.PRNGKey(0)),
            eqx.nn.MLP(5, 3, 6, 1, key=jax.random.PRNGKey(0)),
            r"'layers/0/weight' has shape \(6, 5\), the first checkpoint has \(4, 5\)",
        ),
        (
            eqx.nn.Linear(5, 3, key=jax.random.PRNGKey(0)),
            eqx.nn.Linear(5, 4, key=jax.random.PRNGKey(0)),
            r"'weight' has shape \(4, 5\), the first checkpoint has \(3, 5\)",
        ),
    ],
)
def test_equinox_checkpoints_of_other_layer_sizes_name_the_shape(data, first, later, message):
    """Equinox keeps a layer's sizes (in_features, width_size) as static fields: a checkpoint of another width
    was told to give every checkpoint the same container types, unfreezing a FrozenDict (review63 F2). The
    shapes are compared first, as for dicts."""
    x, y = data
    with pytest.raises(ValueError, match=r"^checkpoints\[1\]: parameter " + message + "$"):
        export_gradients(_eqx_loss, [(first, 1.0), (later, 1.0)], (x, y), progress=False)


def test_equinox_checkpoints_of_other_static_settings_name_the_fields_and_their_values(data):
    """Same leaves and shapes, another value of a static field: the field and both values are named, without
    the FrozenDict / list-or-tuple advice (nothing of the kind is involved)."""
    x, y = data

    def loss(p, inputs, targets):
        logits = inputs @ p.w
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=1)[:, 0]

    with pytest.raises(ValueError) as raised:
        export_gradients(loss, [(_Tagged(_W, "a"), 1.0), (_Tagged(_W, "b"), 1.0)], (x, y), progress=False)
    text = str(raised.value)
    assert re.fullmatch(
        r"checkpoints\[1\]: the params pytree has the first checkpoint's leaf paths and shapes, but the node "
        r"holding 'w' \(a [\w.]*_Tagged\) has other static data: tag='b' here, 'a' in the first checkpoint; every "
        r"checkpoint must hold the same settings in its static fields",
        text,
    ), text
    assert "FrozenDict" not in text and "tuple" not in text


def _dict_loss(p, inputs, targets):
    return -jnp.take_along_axis(jax.nn.log_softmax(inputs @ p["w"]), targets[:, None], axis=1)[:, 0]


@pytest.mark.parametrize(
    "first, later, message",
    [
        ({"w": _W, "b": None}, {"w": _W, "c": None}, r"other keys: 'c' here, 'b' in the first checkpoint \(their "),
        ({"w": _W, "s": {}}, {"w": _W, "s": {}, "t": {}}, r"a key the first checkpoint lacks: 't' \(its "),
        ({"w": _W, "s": {}, "t": None}, {"w": _W}, r"no keys 's', 't', as the first checkpoint has \(their "),
    ],
)
def test_dict_keys_holding_no_parameters_are_named_as_keys(data, first, later, message):
    """Plain dicts whose keys differ only where they hold None or {} (the same leaf paths) were said to hold
    other settings in their static fields (review66 N2): a dict's keys are named as keys."""
    x, y = data
    with pytest.raises(ValueError) as raised:
        export_gradients(_dict_loss, [(first, 1.0), (later, 1.0)], (x, y), progress=False)
    text = str(raised.value)
    assert re.fullmatch(
        r"checkpoints\[1\]: the params pytree has the first checkpoint's leaf paths and shapes, but the node "
        r"holding 'w' \(a dict\) has "
        + message
        + r"values? holds? no parameters: None or empty\); every checkpoint must "
        r"have the same keys",
        text,
    ), text
    assert "static" not in text and "FrozenDict" not in text


class _Activated(eqx.Module):
    w: jax.Array
    fn: object = eqx.field(static=True)


def _eqx_fn_loss(p, inputs, targets):
    return -jnp.take_along_axis(jax.nn.log_softmax(p.fn(inputs @ p.w)), targets[:, None], axis=1)[:, 0]


@pytest.mark.parametrize(
    "first, later, message",
    [
        (
            _Activated(_W, jnp.sin),
            _Activated(_W, jnp.cos),
            r"the node holding 'w' \(a [\w.]*_Activated\) has other static data: fn=jax\.numpy\.cos here, "
            r"jax\.numpy\.sin in the first checkpoint; every checkpoint must hold the same settings in its static "
            r"fields",
        ),
        (
            _Activated(_W, lambda v: v),
            _Activated(_W, lambda v: v),
            r"the node holding 'w' \(a [\w.]*_Activated\) has other static data: fn=[\w.]*<lambda> here, "
            r"[\w.]*<lambda> in the first checkpoint \(other functions of the same name or text; pass the same "
            r"object to every checkpoint\); every checkpoint must hold the same settings in its static fields",
        ),
        (
            eqx.nn.MLP(5, 3, 4, 1, activation=jax.nn.relu, key=jax.random.PRNGKey(0)),
            eqx.nn.MLP(5, 3, 4, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0)),
            r"non-array leaf 'activation' differs from the first checkpoint's: jax\.numpy\.tanh here, "
            r"[\w.]*\.relu in the first checkpoint",
        ),
    ],
)
def test_functions_in_static_fields_are_named_by_their_qualified_names(data, first, later, message):
    """A function in a static field (or a non-array leaf) was shown as a repr cut in the middle,
    "<PjitFunction of <...at 0x7f...>>", which hid which function (review66 N3): module and qualified name,
    and a note when two function objects have one name (two lambdas)."""
    x, y = data
    loss = _eqx_loss if isinstance(first, eqx.nn.MLP) else _eqx_fn_loss
    with pytest.raises(ValueError) as raised:
        export_gradients(loss, [(first, 1.0), (later, 1.0)], (x, y), progress=False)
    text = str(raised.value)
    assert re.fullmatch(
        r"checkpoints\[1\]: (the params pytree has the first checkpoint's leaf paths and shapes, "
        r"but )?" + message,
        text,
    ), text


class _Offset(eqx.Module):
    w: jax.Array
    offset: Any = eqx.field(static=True)  # an array: Equinox advises against it, yet users do it


def _offset_loss(p, inputs, targets):
    return -jnp.take_along_axis(jax.nn.log_softmax(inputs @ p.w + p.offset), targets[:, None], axis=1)[:, 0]


@pytest.mark.filterwarnings("ignore:A JAX array is being set as static")
@pytest.mark.parametrize("array", [np.asarray, jnp.asarray])
def test_equal_arrays_in_static_fields_are_accepted_and_different_ones_named(data, array):
    """An array in an Equinox static field, even the same object in both checkpoints, ended the export with
    JAX's raw "Exception raised while checking equality of metadata fields" naming no checkpoint (review66,
    pre-existing): equal arrays (same dtype, shape and values) are accepted, across exports too (the compiled
    function's cache compares layouts), with the float64 NumPy rows; different ones name the field and both."""
    x, y = data
    w1 = np.random.default_rng(5).normal(0, 0.5, (5, 3)).astype(np.float32)
    offset = [0.25, -0.5, 1.0]
    ckpts = [(_Offset(_W, array(offset, np.float32)), 1.0), (_Offset(w1, array(offset, np.float32)), 0.5)]
    out = export_gradients(_offset_loss, ckpts, (x, y), progress=False)
    for (params, _), rows in zip(ckpts, out.matrices, strict=True):
        logits = x.astype(np.float64) @ np.asarray(params.w, np.float64) + np.asarray(offset)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        probs[np.arange(len(y)), y] -= 1.0  # d loss / d logits
        ref = (x[:, :, None] * probs[:, None, :]).reshape(len(y), -1)  # d loss / d w, row-major (5, 3)
        np.testing.assert_allclose(np.asarray(rows, np.float64), ref, rtol=2e-5, atol=1e-6)
    same = array(offset, np.float32)  # the same object twice, after an export of other (equal) objects
    again = export_gradients(_offset_loss, [(_Offset(_W, same), 1.0), (_Offset(w1, same), 0.5)], (x, y), progress=False)
    for a, b in zip(out.matrices, again.matrices, strict=True):
        np.testing.assert_array_equal(a, b)
    other = _Offset(w1, array([0.25, -0.75, 1.0], np.float32))
    with pytest.raises(ValueError) as raised:
        export_gradients(_offset_loss, [ckpts[0], (other, 0.5)], (x, y), progress=False)
    text = str(raised.value)
    assert re.fullmatch(
        r"checkpoints\[1\]: the params pytree has the first checkpoint's leaf paths and shapes, but the node "
        r"holding 'w' \(a [\w.]*_Offset\) has other static data: offset=a float32 array of shape \(3,\) "
        r"\[0\.25, -0\.75, 1\.0\] here, a float32 array of shape \(3,\) \[0\.25, -0\.5, 1\.0\] in the first "
        r"checkpoint \(first differing at index \(1,\): -0\.75 here, -0\.5 in the first checkpoint\); every "
        r"checkpoint must hold the same settings in its static fields",
        text,
    ), text


def _doubled_loss(p, inputs, targets):
    """Cross-entropy of (inputs @ w) * ((offset + offset) / 400), the sum taken at trace time in the static
    field's own dtype: 0.36 for uint8 200 (400 wraps to 144), 1.0 for a float 200."""
    z = (inputs @ p.w) * ((p.offset + p.offset) / 400)
    return -jnp.take_along_axis(jax.nn.log_softmax(z), targets[:, None], axis=1)[:, 0]


def _doubled_rows(x, y, w, factor):
    """float64 NumPy rows of _doubled_loss: d/dw of cross-entropy(factor * x @ w) = factor * x (p - onehot)."""
    logits = factor * (x.astype(np.float64) @ np.asarray(w, np.float64))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    probs[np.arange(len(y)), y] -= 1.0
    return factor * (x[:, :, None] * probs[:, None, :]).reshape(len(y), -1)


_BYTE_OR_FLOAT = [  # (uint8 200, float32 200.0) of one size: one element, 0-d, NumPy scalars, JAX arrays
    (np.array([200], np.uint8), np.array([200.0], np.float32)),
    (np.array(200, np.uint8), np.array(200.0, np.float32)),
    (np.uint8(200), np.float32(200.0)),
    (jnp.array([200], jnp.uint8), jnp.array([200.0], jnp.float32)),
]


@pytest.mark.filterwarnings("ignore:A JAX array is being set as static", "ignore:overflow encountered")
@pytest.mark.parametrize("byte, real", _BYTE_OR_FLOAT, ids=["1-element", "0-d", "numpy-scalar", "jax"])
def test_one_element_static_arrays_of_other_dtypes_are_refused_and_named(data, byte, real):
    """review70 F1: a one-element or 0-d array in a static field compared equal to one of another dtype (JAX's
    treedef == reduces NumPy's elementwise == by bool()), so checkpoint 1 (uint8 200, doubling to 144) was
    differentiated by checkpoint 0's compiled function (float 200, doubling to 400) and silently got its
    rows. It is refused like other differing static settings, naming the field and both dtypes."""
    x, y = data
    from tracin.jax.params import layout_of

    first, later = layout_of(_Offset(_W, real), None), layout_of(_Offset(_W, byte), None)
    assert first != later and later != first
    with pytest.raises(ValueError) as raised:
        export_gradients(_doubled_loss, [(_Offset(_W, real), 1.0), (_Offset(_W, byte), 1.0)], (x, y), progress=False)
    text = str(raised.value)
    assert re.fullmatch(
        r"checkpoints\[1\]: the params pytree has the first checkpoint's leaf paths and shapes, but the node "
        r"holding 'w' \(a [\w.]*_Offset\) has other static data: offset=.*uint8.* here, .*float32.* in the "
        r"first checkpoint.*; every checkpoint must hold the same settings in its static fields",
        text,
    ), text


@pytest.mark.filterwarnings("ignore:A JAX array is being set as static", "ignore:overflow encountered")
@pytest.mark.parametrize("byte, real", _BYTE_OR_FLOAT, ids=["1-element", "0-d", "numpy-scalar", "jax"])
@pytest.mark.parametrize("byte_first", [True, False])
def test_exports_of_static_arrays_of_other_dtypes_compile_their_own_functions(data, byte, real, byte_first):
    """review70 F1: two exports with the same loss_fn, one model holding uint8 200 in a static field and one
    float 200, shared one compiled function (its cache key compared the layouts as equal), so the second
    export returned the first model's rows (error 1.6). Each gets its own: float64 NumPy references."""
    x, y = data
    w = np.random.default_rng(11).normal(0, 0.5, (5, 3)).astype(np.float32)
    cases = [(byte, 0.36), (real, 1.0)] if byte_first else [(real, 1.0), (byte, 0.36)]
    for offset, factor in cases:
        rows = export_gradients(_doubled_loss, [(_Offset(w, offset), 1.0)], (x, y), progress=False).matrices[0]
        np.testing.assert_allclose(np.asarray(rows, np.float64), _doubled_rows(x, y, w, factor), rtol=2e-5, atol=1e-6)


class _NanSetting(eqx.Module):
    w: jax.Array
    scale: Any  # a float field: static for tracin (Equinox takes floats as settings, not parameters)
    note: Any = eqx.field(static=True)


def _plain_loss(p, inputs, targets):  # scale and note unused: a NaN setting must not make the rows NaN
    return -jnp.take_along_axis(jax.nn.log_softmax(inputs @ p.w), targets[:, None], axis=1)[:, 0]


@pytest.mark.filterwarnings("ignore:A JAX array is being set as static")  # Equinox's word for a NumPy scalar
@pytest.mark.parametrize(
    "nan",
    [lambda: float("nan"), lambda: np.float32("nan"), lambda: np.float64("nan")],
    ids=["float", "np.float32", "np.float64"],
)
def test_nan_in_float_settings_equals_nan_as_in_static_arrays(data, nan):
    """review70 N1: a float setting holding NaN in both checkpoints (two NaN objects, as loading gives) was
    refused ("nan here, nan in the first checkpoint") while arrays holding NaN are accepted: NaN equals NaN
    for float scalars too, in a float field and in a static field; equal layouts hash alike; another value
    is still refused. Rows: float64 NumPy references."""
    x, y = data
    from tracin.jax.params import layout_of

    ws = [_W, np.random.default_rng(12).normal(0, 0.5, (5, 3)).astype(np.float32)]
    ckpts = [(_NanSetting(w, nan(), nan()), 1.0) for w in ws]
    assert ckpts[0][0].scale is not ckpts[1][0].scale and ckpts[0][0].note is not ckpts[1][0].note
    layouts = [layout_of(p, None) for p, _ in ckpts]
    assert layouts[0] == layouts[1] and hash(layouts[0]) == hash(layouts[1])
    out = export_gradients(_plain_loss, ckpts, (x, y), progress=False)
    for w, rows in zip(ws, out.matrices, strict=True):
        ref = _doubled_rows(x, y, w, 1.0)
        np.testing.assert_allclose(np.asarray(rows, np.float64), ref, rtol=2e-5, atol=1e-6)
    for other in (_NanSetting(ws[1], 0.5, nan()), _NanSetting(ws[1], nan(), 0.5)):
        with pytest.raises(ValueError, match=r"checkpoints\[1\]: .*(scale|note).*0\.5 here.*nan.* in the first"):
            export_gradients(_plain_loss, [ckpts[0], (other, 1.0)], (x, y), progress=False)


def test_a_list_of_eleven_layers_and_its_msgpack_save_name_the_list_and_the_dict(data, tmp_path):
    """Flax msgpack saves a list as a dict keyed '0', '1', ..., '10', which flattens in string order: the same
    leaf paths in another order. The error names the list and the dict (it said 'the same paths in another
    order'); a first checkpoint restored from the file too gives the in-memory rows."""
    x, y = data
    r = np.random.default_rng(3)
    layers = {"layers": [{"w": r.normal(0, 0.3, (5, 5)).astype(np.float32)} for _ in range(11)]}
    saved = tmp_path / "layers.msgpack"
    saved.write_bytes(serialization.to_bytes(layers))

    def loss(p, inputs, targets):
        h = inputs
        for layer in sorted(p["layers"], key=int) if isinstance(p["layers"], dict) else range(11):
            h = jnp.tanh(h @ p["layers"][layer]["w"])
        return -jnp.take_along_axis(jax.nn.log_softmax(h[:, :3]), targets[:, None], axis=1)[:, 0]

    with pytest.raises(
        ValueError,
        match=r"checkpoints\[1\]: the params pytree has the first checkpoint's leaf paths in another order, in "
        r"other containers: the node holding 'layers/0/w' is a dict here and a list in the first checkpoint; .*"
        r"a list saved by Flax msgpack is restored as a dict with keys '0', '1'",
    ):
        export_gradients(loss, [(layers, 1.0), (saved, 1.0)], (x, y), progress=False)
    both_saved = export_gradients(loss, [(saved, 1.0), (saved, 1.0)], (x, y), progress=False)
    in_memory = export_gradients(loss, [(layers, 1.0)], (x, y), progress=False)
    order = [int(entry["name"].split("/")[1]) for entry in both_saved.metadata["params"]]
    assert order == [0, 1, 10, 2, 3, 4, 5, 6, 7, 8, 9]  # string order of the restored dict's keys
    np.testing.assert_array_equal(
        np.asarray(both_saved.matrices[0]).reshape(len(x), 11, 25)[:, np.argsort(order)],
        np.asarray(in_memory.matrices[0]).reshape(len(x), 11, 25),
    )


@pytest.mark.parametrize("kind, package", [("directory", "orbax-checkpoint"), ("file", "flax")])
def test_a_missing_reader_package_is_named(tmp_path, monkeypatch, kind, package):
    import importlib

    from tracin.jax import checkpoints

    path = tmp_path / "ckpt"
    path.mkdir() if kind == "directory" else path.write_bytes(b"")

    def absent(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", absent)
    with pytest.raises(
        ImportError,
        match=rf"checkpoints\[2\]: .*ckpt is a {kind} .*needs {package} \(pip install "
        rf"{package}\)",
    ):
        checkpoints.restore(path, "checkpoints[2]")


class _Tempered(eqx.Module):
    lin: eqx.nn.Linear
    temperature: float  # a float field: a setting for Equinox, not a parameter
    shift: float = eqx.field(static=True, default=0.0)

    def __call__(self, x):
        return jax.vmap(self.lin)(x) / self.temperature + self.shift


class _Interrupted(Sequence):
    """Three batches (a Sequence: its length is known up front); the second pass (the first
    checkpoint's, after the store's read-through) stops with KeyboardInterrupt before its last batch
    when `die`."""

    def __init__(self, x, y, die):
        self.batches, self.die, self.passes = [(x[i : i + 3], y[i : i + 3]) for i in (0, 3, 6)], die, 0

    def __iter__(self):
        self.passes += 1
        for i, batch in enumerate(self.batches):
            if self.die and self.passes == 2 and i == 2:
                raise KeyboardInterrupt
            yield batch

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return self.batches[i]


def test_non_array_leaves_and_static_fields_are_in_the_checkpoint_digest(tmp_path):
    """A resume whose params differ only in a non-array leaf (an int in a dict, an Equinox float field)
    or an Equinox static field is refused; a pytree of arrays alone digests as before they counted."""
    from tracin._export.fingerprint import digest_arrays
    from tracin.jax.checkpoints import state_digest

    r = np.random.default_rng(3)
    x, y = r.standard_normal((9, 4)).astype(np.float32), r.standard_normal(9).astype(np.float32)
    w = jnp.asarray(r.standard_normal(4), jnp.float32)
    assert state_digest({"w": w}) == digest_arrays([np.frombuffer(b"w", np.uint8), np.asarray(w)])
    assert state_digest({"w": w, "power": 2}) != state_digest({"w": w, "power": 4})
    model = _Tempered(eqx.nn.Linear(4, 3, key=jax.random.PRNGKey(0)), 1.0)
    digests = {state_digest(m) for m in (model, eqx.tree_at(lambda m: m.temperature, model, 0.05))}
    digests.add(state_digest(_Tempered(model.lin, 1.0, 2.0)))
    assert len(digests) == 3

    def loss(p, inputs, targets):
        return (inputs @ p["w"] - targets) ** p["power"]

    store = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        export_gradients(loss, [({"w": w, "power": 2}, 1.0)], _Interrupted(x, y, True), store=store, progress=False)
    with pytest.raises(ValueError, match=r"checkpoints\[0\] differs"):
        export_gradients(loss, [({"w": w, "power": 4}, 1.0)], _Interrupted(x, y, False), store=store, progress=False)
    done = export_gradients(loss, [({"w": w, "power": 2}, 1.0)], _Interrupted(x, y, False), store=store, progress=False)
    ref = 2 * (x @ np.asarray(w, np.float64) - y)[:, None] * x
    np.testing.assert_allclose(tracin.self_influence(done), (ref**2).sum(1), rtol=1e-5)


def test_a_store_recording_the_arrays_alone_of_params_with_static_leaves_is_not_resumed(tmp_path, monkeypatch):
    """A store written when the digest covered the arrays alone cannot tell a changed static leaf: its
    resume is refused, saying why, while params without static parts still resume."""
    import tracin.jax.export as jax_export
    from tracin.jax.checkpoints import state_digest

    r = np.random.default_rng(4)
    x, y = r.standard_normal((9, 4)).astype(np.float32), r.standard_normal(9).astype(np.float32)
    w = jnp.asarray(r.standard_normal(4), jnp.float32)

    def loss(p, inputs, targets):
        return (inputs @ p["w"] - targets) ** 2 * p.get("scale", 1)

    for params, resumes in (({"w": w, "scale": 2}, False), ({"w": w}, True)):
        store = tmp_path / str(len(params))
        with monkeypatch.context() as m:  # the digest as tracin made it before
            m.setattr(jax_export, "state_digest", lambda p, static=True: state_digest(p, static=False))
            with pytest.raises(KeyboardInterrupt):
                export_gradients(loss, [(params, 1.0)], _Interrupted(x, y, True), store=store, progress=False)
        if resumes:
            assert export_gradients(loss, [(params, 1.0)], _Interrupted(x, y, False), store=store).complete
        else:
            with pytest.raises(ValueError, match=r"records checkpoints \[0\] by their arrays alone.*static fields"):
                export_gradients(loss, [(params, 1.0)], _Interrupted(x, y, False), store=store, progress=False)


def test_scoring_against_a_side_digested_by_its_arrays_alone_explains_the_digest_change(monkeypatch):
    """A train side of an Equinox model exported when in-memory params were digested by their arrays
    alone, scored against test gradients of the same model exported now: the checkpoint mismatch says
    the digest changed, not only that the checkpoints differ."""
    import tracin.jax.export as jax_export
    from tracin.jax.checkpoints import state_digest
    from tracin.scoring import CheckpointMismatchError

    model = eqx.nn.Linear(4, 1, key=jax.random.PRNGKey(0))
    r = np.random.default_rng(0)
    x, y = r.standard_normal((10, 4)).astype(np.float32), r.standard_normal(10).astype(np.float32)

    def loss(m, inputs, targets):
        return (jax.vmap(m)(inputs)[:, 0] - targets) ** 2

    with monkeypatch.context() as m:  # the digest as tracin made it before
        m.setattr(jax_export, "state_digest", lambda p, static=True: state_digest(p, static=False))
        train = export_gradients(loss, [(model, 1.0)], (x, y), progress=False)
    test = export_gradients(loss, [(model, 1.0)], (x[:3], y[:3]), progress=False)
    with pytest.raises(CheckpointMismatchError, match="digested in-memory JAX params by their arrays alone"):
        tracin.scores(test, train)
    train.metadata.pop("checkpoint_sources")
    assert tracin.scores(test, train).shape == (3, 10)


def _damaged_checkpoints(tmp_path, params):
    """(name, path, what the error must say) of checkpoints that cannot be read."""
    whole = serialization.msgpack_serialize(params)
    cases = [
        ("empty file", b"", "a file of 0 bytes, empty or cut short"),
        ("cut msgpack", whole[: len(whole) // 2], r"as a Flax msgpack checkpoint \(\d+ bytes\): .*cut short"),
        ("not msgpack", b"\x00\x01hello", r"as a Flax msgpack checkpoint \(7 bytes\): .*extra data"),
    ]
    out = []
    for name, content, message in cases:
        (tmp_path / name).write_bytes(content)
        out.append((tmp_path / name, message))
    (tmp_path / "empty dir").mkdir()
    out.append((tmp_path / "empty dir", "an empty directory, not an orbax checkpoint"))
    saver = ocp.StandardCheckpointer()
    for name in ("no metadata", "cut data"):
        saver.save(tmp_path / name, params)
        saver.wait_until_finished()
    (tmp_path / "no metadata" / "_METADATA").unlink()
    out.append((tmp_path / "no metadata", "as an orbax checkpoint: .*_METADATA"))
    data = max((f for f in (tmp_path / "cut data").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    data.write_bytes(data.read_bytes()[:10])
    out.append((tmp_path / "cut data", "as an orbax checkpoint: "))
    return out


@pytest.mark.parametrize("position", [0, 1])
def test_a_damaged_checkpoint_file_or_directory_is_named(mlp, data, tmp_path, position):
    """Each damaged checkpoint, first or second, is a ValueError naming checkpoints[i] and its path (as in
    tracin.torch), not the reader's bare error."""
    x, y = data
    for path, message in _damaged_checkpoints(tmp_path, jax.tree_util.tree_map(np.asarray, mlp.params[0])):
        checkpoints = [(mlp.params[0], 1.0), (path, 1.0)][1 - position :]
        where = rf"checkpoints\[{position}\] \({re.escape(str(path))}\) cannot be read"
        with pytest.raises(ValueError, match=f"{where}.*{message}"):
            export_gradients(mlp.loss_fn, checkpoints, (x, y), progress=False)


def test_checkpoint_warnings_point_at_the_users_call(mlp, data):
    """The zero learning rate's and the unused optimizer state's warnings name this file's line (review32
    F3: the zero rate's pointed into tracin/jax/export.py)."""
    x, y = data
    with pytest.warns(UserWarning, match=r"\(learning rate\) is 0") as caught:
        export_gradients(mlp.loss_fn, [(mlp.params[0], 0.0), (mlp.params[1], 0.5)], (x, y), progress=False)
    assert [w.filename for w in caught] == [__file__]


@pytest.mark.parametrize("kind", ["pickle", "npz"])
def test_a_pickle_or_npz_checkpoint_file_says_which_formats_are_read(mlp, data, tmp_path, kind):
    """A pickled pytree or an np.savez archive given as a path (review126 F5): the error names the format,
    the formats tracin.jax reads and how to load the file, not msgpack's 'extra data'."""
    x, y = data
    params = jax.tree_util.tree_map(np.asarray, mlp.params[0])
    path = tmp_path / f"ckpt.{'pkl' if kind == 'pickle' else 'npz'}"
    if kind == "pickle":
        path.write_bytes(pickle.dumps(params))
        how = r"pickle\.load"
    else:
        np.savez(path, w1=params["l1"]["kernel"])
        how = r"np\.load"
    with pytest.raises(ValueError) as caught:
        export_gradients(mlp.loss_fn, [(mlp.params[0], 1.0), (path, 1.0)], (x, y), progress=False)
    message = str(caught.value)
    what = "a pickle" if kind == "pickle" else "a zip archive"
    assert re.search(rf"checkpoints\[1\] \({re.escape(str(path))}\) cannot be read: it is {what}", message)
    assert "reads orbax checkpoint directories and Flax msgpack files" in message
    assert re.search(how + r".*pass the params pytree", message)
    assert "extra data" not in message


@pytest.mark.parametrize("saver", ["msgpack", "orbax"])
def test_a_train_state_file_exports_its_params_alone_and_warns(mlp, data, tmp_path, saver):
    """A Flax TrainState saved whole restores as {"step", "params", "opt_state"} (review143 F1): by default
    only "params" is exported (the Adam moments' all-zero columns tripled the width), with a UserWarning
    naming the keys left out and layers=; rows against the float64 NumPy reference."""
    optax = pytest.importorskip("optax")
    from flax.training import train_state

    x, y = data
    state = train_state.TrainState.create(apply_fn=None, params=mlp.params[0], tx=optax.adam(1e-2))
    state = state.apply_gradients(grads=jax.grad(lambda p: mlp.loss_fn(p, x, y).mean())(state.params))
    state = state.replace(params=mlp.params[0])  # the reference's weights, the moments of one step
    if saver == "msgpack":
        path = tmp_path / "state.msgpack"
        path.write_bytes(serialization.to_bytes(state))
    else:
        path = tmp_path / "state"
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(path, state)
        checkpointer.wait_until_finished()
    left_out = r"leaving out \['opt_state'\]; to export other leaves, name them in layers= \(layers=\['\*'\]"
    with pytest.warns(UserWarning, match=r"Flax TrainState \(a 'params' and an 'opt_state' entry\).*" + left_out):
        g = export_gradients(lambda p, a, b: mlp.loss_fn(p["params"], a, b), [(path, 1.0)], (x, y), progress=False)
    names = [q["name"] for q in g.metadata["params"]]
    assert names == ["params/l1/bias", "params/l1/kernel", "params/l2/bias", "params/l2/kernel"]
    ref = mlp.reference_rows(mlp.reference_grads(mlp.weights[0], x, y), ["b1", "w1", "b2", "w2"], {"w1", "w2"})
    np.testing.assert_allclose(np.asarray(g.matrices[0], np.float64), ref, rtol=1e-4, atol=1e-6)
    everything = export_gradients(
        lambda p, a, b: mlp.loss_fn(p["params"], a, b), [(path, 1.0)], (x, y), layers=["*"], progress=False
    )
    assert np.asarray(everything.matrices[0]).shape[1] == 3 * ref.shape[1]  # params, mu and nu


class _Hostile:
    """A pickled object whose loading would create `path` (a folder): restore must never unpickle."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        import os

        return os.mkdir, (self.path,)


@pytest.mark.parametrize("trailing", [b"", b"\n", b" \r\n"])
@pytest.mark.parametrize("protocol", [0, 1, 2, 5])
def test_a_hostile_pickle_checkpoint_is_named_and_never_unpickled(mlp, data, tmp_path, protocol, trailing):
    """review143 F2 / the test gap at test_a_pickle_or_npz...: a pickle of any protocol is told by its bytes
    (protocols 0 and 1 got msgpack's 'extra data'; review155 F6: they still did with a trailing newline)
    and its __reduce__ never runs."""
    x, y = data
    pwned = tmp_path / "pwned"
    path = tmp_path / "ckpt.pkl"
    path.write_bytes(pickle.dumps({"l1": _Hostile(str(pwned))}, protocol=protocol) + trailing)
    with pytest.raises(ValueError, match=r"cannot be read: it is a pickle, .*load it yourself \(pickle\.load"):
        export_gradients(mlp.loss_fn, [(path, 1.0)], (x, y), progress=False)
    assert not pwned.exists()
    pickle.loads(path.read_bytes())  # the check above could fail: loading it does run __reduce__
    assert pwned.is_dir()


@pytest.mark.parametrize("kind", ["npy", "safetensors", "pickle0", "pickle1"])
def test_npy_safetensors_and_old_pickle_files_name_their_format(mlp, data, tmp_path, kind):
    """review143 F2: these got "cannot be read as a Flax msgpack checkpoint ... extra data"."""
    x, y = data
    kernel = np.asarray(mlp.params[0]["l1"]["kernel"])
    path = tmp_path / f"ckpt.{kind}"
    if kind == "npy":
        np.save(path, kernel)
        what, how = r"a NumPy \.npy array", r"np\.load"
    elif kind == "safetensors":
        header = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}  '
        path.write_bytes(len(header).to_bytes(8, "little") + header + np.ones(2, np.float32).tobytes())
        what, how = "a safetensors file", r"safetensors\.flax\.load_file"
    else:
        params = jax.tree_util.tree_map(np.asarray, mlp.params[0])
        path.write_bytes(pickle.dumps(params if kind == "pickle0" else [params], protocol=int(kind[-1])))
        what, how = "a pickle", r"pickle\.load"
    with pytest.raises(ValueError) as caught:
        export_gradients(mlp.loss_fn, [(path, 1.0)], (x, y), progress=False)
    message = str(caught.value)
    assert re.search(rf"checkpoints\[0\] \({re.escape(str(path))}\) cannot be read: it is {what}", message)
    assert re.search(rf"load it yourself \({how}.*pass the params pytree", message)
    assert "extra data" not in message


def test_a_checkpoint_manager_step_folder_or_root_names_the_item_folder_to_pass(mlp, data, tmp_path):
    """review143 F5: CheckpointManager writes root/<step>/default; root/<step> was refused without a hint."""
    x, y = data
    manager = ocp.CheckpointManager(tmp_path / "run")
    for step in (2, 10):
        manager.save(step, args=ocp.args.StandardSave(mlp.params[0]))
    manager.wait_until_finished()
    step = tmp_path / "run" / "2"
    with pytest.raises(
        ValueError, match=r"_METADATA.*; pass the orbax checkpoint item folder it holds: 'default', e\.g\. "
    ) as caught:
        export_gradients(mlp.loss_fn, [(step, 1.0)], (x, y), progress=False)
    assert str(caught.value).endswith(str(step / "default"))
    with pytest.raises(ValueError, match=r"CheckpointManager's root\?\): '2/default', '10/default', e\.g\. ") as caught:
        export_gradients(mlp.loss_fn, [(tmp_path / "run", 1.0)], (x, y), progress=False)
    assert str(caught.value).endswith(str(step / "default"))
    g = export_gradients(mlp.loss_fn, [(step / "default", 1.0)], (x, y), progress=False)
    ref = mlp.reference_rows(mlp.reference_grads(mlp.weights[0], x, y), ["b1", "w1", "b2", "w2"], {"w1", "w2"})
    np.testing.assert_allclose(np.asarray(g.matrices[0], np.float64), ref, rtol=1e-4, atol=1e-6)


def test_a_train_state_in_memory_exports_its_params_alone_and_a_dict_with_a_step_is_not_one(mlp, data):
    """The TrainState object itself (not restored as a dict) exports "params" alone too, with the warning
    (its mu and nu were exported as columns); a plain dict with "params", an int "step" and a trainable
    float scalar is no TrainState (no "opt_state"): every floating leaf is exported, without a warning."""
    optax = pytest.importorskip("optax")
    from flax.training import train_state

    x, y = data
    state = train_state.TrainState.create(apply_fn=None, params=mlp.params[0], tx=optax.adam(1e-2))
    state = state.apply_gradients(grads=jax.grad(lambda p: mlp.loss_fn(p, x, y).mean())(state.params))
    state = state.replace(params=mlp.params[0])
    with pytest.warns(UserWarning, match=r"Flax TrainState .*leaving out \['opt_state'\]"):
        g = export_gradients(lambda s, a, b: mlp.loss_fn(s.params, a, b), [(state, 1.0)], (x, y), progress=False)
    names = [q["name"] for q in g.metadata["params"]]
    assert names == ["params/l1/bias", "params/l1/kernel", "params/l2/bias", "params/l2/kernel"]
    ref = mlp.reference_rows(mlp.reference_grads(mlp.weights[0], x, y), ["b1", "w1", "b2", "w2"], {"w1", "w2"})
    np.testing.assert_allclose(np.asarray(g.matrices[0], np.float64), ref, rtol=1e-4, atol=1e-6)
    plain = {"params": mlp.params[0], "step": np.int32(3), "scale": np.float32(2.0)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = export_gradients(
            lambda p, a, b: mlp.loss_fn(p["params"], a, b) * p["scale"], [(plain, 1.0)], (x, y), progress=False
        )
    assert "scale" in [q["name"] for q in g.metadata["params"]]


def test_an_orbax_folder_saved_again_is_another_checkpoint_to_scoring_as_the_readme_says(mlp, data, tmp_path):
    """review155 F4 (documented, not changed): a path's checkpoint digest is its bytes, which orbax writes
    anew on every save (timestamps, random file names); the README's workarounds are checked here: a byte
    copy, the restored pytrees on both sides, or the record dropped from one side."""
    import shutil

    import tracin
    from tracin.scoring import CheckpointMismatchError

    x, y = data
    saver = ocp.StandardCheckpointer()
    for name in ("a", "b"):
        saver.save(tmp_path / name, mlp.params[0])
        saver.wait_until_finished()
    shutil.copytree(tmp_path / "a", tmp_path / "copy")

    def sides(train_ckpt, test_ckpt):
        train = export_gradients(mlp.loss_fn, [(train_ckpt, 1.0)], (x, y), progress=False)
        return export_gradients(mlp.loss_fn, [(test_ckpt, 1.0)], (x[:4], y[:4]), progress=False), train

    with pytest.raises(CheckpointMismatchError, match="saved again"):
        tracin.scores(*sides(tmp_path / "a", tmp_path / "b"))
    expected = tracin.scores(*sides(tmp_path / "a", tmp_path / "copy"))
    restored = [saver.restore(tmp_path / name) for name in ("a", "b")]
    np.testing.assert_array_equal(tracin.scores(*sides(*restored)), expected)
    test, train = sides(tmp_path / "a", tmp_path / "b")
    test.metadata.pop("checkpoint_sources")
    np.testing.assert_array_equal(tracin.scores(test, train), expected)


def _saved_batchnorm_net(tmp_path: Any) -> tuple[Any, Any, Any, tuple[np.ndarray, np.ndarray]]:
    """An NNX Net (BatchNorm then Linear) whose nnx.split State orbax saved at tmp_path / "state": the
    checkpointer, the State, a loss_fn over its leaves and 4 rows of data."""
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs: Any):
            self.bn = nnx.BatchNorm(3, use_running_average=True, rngs=rngs)
            self.out = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            return self.out(self.bn(x))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    saver = ocp.StandardCheckpointer()
    saver.save(tmp_path / "state", state)
    saver.wait_until_finished()

    def loss_fn(params: Any, x: Any, y: Any) -> Any:
        restored = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state), jax.tree_util.tree_leaves(params))
        return jnp.sum((nnx.merge(graphdef, restored)(x) - y) ** 2, axis=1)

    rng = np.random.default_rng(0)
    data = (rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32))
    return saver, state, loss_fn, data


def test_an_nnx_state_saved_whole_and_given_as_a_path_warns_that_its_batch_statistics_are_exported(tmp_path):
    """nnx.split(model)'s State saved with orbax restores as dicts with 'value' leaves, its Variable types lost: every
    floating leaf is exported (BatchNorm's mean and var too, which the in-memory State leaves out), with a warning
    saying how to restore the State instead."""
    _, _, loss_fn, data = _saved_batchnorm_net(tmp_path)
    with pytest.warns(UserWarning, match=r"looks like a Flax NNX State saved to a file .*running statistics"):
        got = export_gradients(loss_fn, [(str(tmp_path / "state"), 1.0)], data)
    assert "bn/mean/value" in [p["name"] for p in got.metadata["params"]]


def _nnx_training(saves: int = 2) -> SimpleNamespace:
    """A tiny nnx.Linear trained with nnx.Optimizer(adam) for 2 steps per save: the live State, Module and opt_state
    as a training loop would append them at each save, with copies, and NumPy snapshots of the weights."""
    nnx = pytest.importorskip("flax.nnx")
    optax = pytest.importorskip("optax")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 3)).astype(np.float32), rng.integers(0, 2, 8)
    graphdef = nnx.graphdef(model)

    def loss_fn(params: Any, inputs: Any, targets: Any) -> Any:
        net = params if isinstance(params, nnx.Module) else nnx.merge(graphdef, params)
        return -jax.nn.log_softmax(net(inputs))[jnp.arange(targets.shape[0]), targets]

    live, modules, copies, live_opt, opt_copies, snapshots, second_moments = [], [], [], [], [], [], []
    for _ in range(saves):
        for _ in range(2):
            opt.update(model, nnx.grad(lambda m: loss_fn(m, x, y).mean())(model))
        state = nnx.state(model, nnx.Param)
        live.append(state)
        modules.append(model)
        copies.append(jax.tree.map(lambda a: a, state))
        live_opt.append(opt.opt_state)
        opt_copies.append(jax.tree.map(lambda a: a, opt.opt_state))
        snapshots.append(jax.tree.map(np.array, state))
        adam = opt.opt_state[0]
        v_hat = [
            np.array(v, np.float64).ravel() / (1 - 0.999 ** int(adam.count[...])) for v in jax.tree.leaves(adam.nu)
        ]
        second_moments.append(np.concatenate(v_hat))  # bias-corrected, in the params' leaf order
    return SimpleNamespace(
        loss_fn=loss_fn,
        data=(x, y),
        live=live,
        modules=modules,
        copies=copies,
        live_opt=live_opt,
        opt_copies=opt_copies,
        snapshots=snapshots,
        v_hats=second_moments,
    )


def test_nnx_states_of_the_live_model_at_two_checkpoints_are_refused():
    """review255 F1: nnx.state(model) / nnx.split(model) hold the model's live Variables, so States appended per
    save all held the final weights, and TracIn silently used the last checkpoint's rows for every checkpoint."""
    run = _nnx_training()
    copy = r"save a copy with each checkpoint, jax\.tree\.map\(lambda a: a, nnx\.state\(model, nnx\.Param\)\)"
    with pytest.raises(
        ValueError, match=rf"checkpoints\[0\] and checkpoints\[1\] hold the very same Flax NNX .*{copy}"
    ):
        parse_checkpoints([(run.live[0], 0.1), (run.live[1], 0.1)])
    # the optimizer states of the same saves are live too: named in the same error
    with pytest.raises(ValueError, match=r"checkpoints\[0\]\[2\] and checkpoints\[1\]\[2\] share their optimizer"):
        parse_checkpoints([(s, 0.1, o) for s, o in zip(run.live, run.live_opt, strict=True)])
    # the live State as the last checkpoint alone (the current weights) is taken
    assert len(parse_checkpoints([(run.copies[0], 0.1), (run.live[1], 0.1)])) == 2


def test_one_nnx_module_at_two_checkpoints_is_refused():
    """A Module appended at each save is the live model itself (its Variables updated in place): refused, unlike
    one State object listed twice (a copy, deliberately given twice, as one torch state_dict object is taken)."""
    run = _nnx_training()
    with pytest.raises(
        ValueError,  # a Module again for a loss_fn that calls it (r267 F2: a State copy is not callable)
        match=r"checkpoints\[0\] and checkpoints\[1\] hold the same nnx\.Module object.*save a copy with each "
        r"checkpoint, nnx\.clone\(model\) \(a Module again, for a loss_fn that calls it\), or jax\.tree\.map",
    ):
        export_gradients(run.loss_fn, [(m, 0.1) for m in run.modules], run.data, progress=False)
    twice = export_gradients(run.loss_fn, [(run.copies[0], 0.5), (run.copies[0], 0.25)], run.data, progress=False)
    np.testing.assert_array_equal(twice.matrices[0], twice.matrices[1])


def test_a_live_nnx_optimizer_state_at_two_checkpoints_is_refused():
    """nnx.Optimizer.opt_state is one object whose Variables every step updates in place: appended per save with
    copied weights, every checkpoint carried the last step's moments and count (review255 F1)."""
    run = _nnx_training()
    entries = [(s, 0.1, o) for s, o in zip(run.copies, run.live_opt, strict=True)]
    with pytest.raises(
        ValueError,
        match=r"checkpoints\[0\]\[2\] and checkpoints\[1\]\[2\] \(optimizer states\) hold the very same Flax NNX "
        r"Variables.*jax\.tree\.map\(lambda a: a, optimizer\.opt_state\)",
    ):
        export_gradients(run.loss_fn, entries, run.data, preconditioner="adam", progress=False)
    # one params object listed twice with its one state: the same checkpoint on purpose, taken
    assert len(parse_checkpoints([(run.copies[0], 0.1, run.live_opt[0]), (run.copies[0], 0.2, run.live_opt[1])])) == 2


def test_copied_nnx_states_keep_each_checkpoints_weights_and_moments(per_example_jax_grad):
    """The copies the errors ask for: each checkpoint's rows are jax.grad at the weights it was saved with (NumPy
    snapshots), and its "adam" rows g / (sqrt(v_hat) + eps) with the moments of its own step (snapshots)."""
    run = _nnx_training(saves=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = export_gradients(run.loss_fn, [(c, 1.0) for c in run.copies], run.data, progress=False)
        adam = export_gradients(
            run.loss_fn,
            [(c, 1.0, o) for c, o in zip(run.copies, run.opt_copies, strict=True)],
            run.data,
            preconditioner="adam",
            progress=False,
        )
    for rows, adam_rows, snapshot, v_hat in zip(grads.matrices, adam.matrices, run.snapshots, run.v_hats, strict=True):
        expected = per_example_jax_grad(run.loss_fn, snapshot, *run.data)
        np.testing.assert_allclose(np.asarray(rows), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(adam_rows), expected / (np.sqrt(v_hat) + 1e-8), rtol=1e-4, atol=1e-6)
    assert not np.allclose(grads.matrices[0], grads.matrices[2])
    assert not np.allclose(run.v_hats[0], run.v_hats[2])


def test_a_saved_nnx_param_state_is_told_that_layers_star_is_right(tmp_path, per_example_jax_grad):
    """review255 F3: a file holding the State of nnx.split(model, nnx.Param) was warned that BatchStat would be
    exported and told to save that very State. The warning now says such a file is meant whole, and layers=['*']
    (rows: jax.grad of the Params) silences it."""
    nnx = pytest.importorskip("flax.nnx")
    graphdef, params, _ = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.Param, ...)
    path = tmp_path / "params.msgpack"
    # saved as orbax / flax.serialization save a State: its state dict, each Variable's array at 'value'
    path.write_bytes(serialization.msgpack_serialize({k: {"value": np.asarray(v[...])} for k, v in params.items()}))

    def loss_fn(p: Any, x: Any, y: Any) -> Any:
        restored = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), jax.tree_util.tree_leaves(p))
        return jnp.sum((nnx.merge(graphdef, restored)(x) - y) ** 2, axis=1)

    rng = np.random.default_rng(0)
    data = (rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32))
    with pytest.warns(UserWarning, match=r"If it holds nnx\.Param variables alone .*pass layers=\['\*'\]") as caught:
        export_gradients(loss_fn, [(str(path), 1.0)], data, progress=False)
    assert "save the State of nnx.split" not in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = export_gradients(loss_fn, [(str(path), 1.0)], data, layers=["*"], progress=False)
    assert [p["name"] for p in got.metadata["params"]] == ["bias/value", "kernel/value"]
    np.testing.assert_allclose(got.matrices[0], per_example_jax_grad(loss_fn, params, *data), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("as_file", [False, True])
def test_train_states_stepped_outside_jit_export_despite_their_int_steps(mlp, data, tmp_path, as_file):
    """apply_gradients outside jax.jit leaves a TrainState's step a Python int, one per checkpoint (review274
    F1): two such checkpoints (objects or msgpack files) export, rows those of their params alone."""
    optax = pytest.importorskip("optax")
    from flax.training import train_state

    x, y = data
    state = train_state.TrainState.create(apply_fn=None, params=mlp.params[0], tx=optax.adam(1e-2))
    checkpoints = []
    for i, params in enumerate(mlp.params[:2]):
        state = state.apply_gradients(grads=jax.tree_util.tree_map(jnp.zeros_like, state.params))
        state = state.replace(params=params)
        assert type(state.step) is int
        if as_file:
            path = tmp_path / f"state{i}.msgpack"
            path.write_bytes(serialization.to_bytes(state))
            checkpoints.append((path, 0.5))
        else:
            checkpoints.append((state, 0.5))

    def state_loss(s, a, b):
        return mlp.loss_fn(s.params if hasattr(s, "params") else s["params"], a, b)

    with pytest.warns(UserWarning, match="Flax TrainState"):
        g = export_gradients(state_loss, checkpoints, (x, y), progress=False)
    for matrix, weights in zip(g.matrices, mlp.weights[:2], strict=True):
        ref = mlp.reference_rows(mlp.reference_grads(weights, x, y), ["b1", "w1", "b2", "w2"], {"w1", "w2"})
        np.testing.assert_allclose(np.asarray(matrix, np.float64), ref, rtol=1e-4, atol=1e-6)


def test_one_train_state_keeps_its_int_step_for_a_loss_reading_it_in_python(mlp, data):
    """review283 F2: a loss branching in Python on a single TrainState's int step exports (the step is read
    as an array only where several checkpoints' steps differ)."""
    optax = pytest.importorskip("optax")
    from flax.training import train_state

    x, y = data
    state = train_state.TrainState.create(apply_fn=None, params=mlp.params[0], tx=optax.sgd(1e-2)).replace(step=3)

    def state_loss(s, a, b):
        return mlp.loss_fn(s.params, a, b) * (2.0 if s.step > 1 else 0.0)

    g = export_gradients(state_loss, [(state, 0.5)], (x, y), progress=False)
    ref = mlp.reference_rows(mlp.reference_grads(mlp.weights[0], x, y), ["b1", "w1", "b2", "w2"], {"w1", "w2"})
    np.testing.assert_allclose(np.asarray(g.matrices[0], np.float64), 2.0 * ref, rtol=1e-4, atol=1e-6)


def test_plain_dicts_with_an_int_step_keep_it_for_a_loss_reading_it_in_python(mlp, data):
    """r288: a dict with "params" and a Python-int "step" but no "opt_state" is no TrainState: over several
    checkpoints its step stays the int it is (equal on both), for a loss branching on it in Python."""
    x, y = data
    checkpoints = [({"params": p, "step": 3}, 0.5) for p in mlp.params[:2]]

    def loss(p, a, b):
        return mlp.loss_fn(p["params"], a, b) * (2.0 if p["step"] > 1 else 0.0)

    g = export_gradients(loss, checkpoints, (x, y), progress=False)
    for matrix, weights in zip(g.matrices, mlp.weights[:2], strict=True):
        ref = mlp.reference_rows(mlp.reference_grads(weights, x, y), ["b1", "w1", "b2", "w2"], {"w1", "w2"})
        np.testing.assert_allclose(np.asarray(matrix, np.float64), 2.0 * ref, rtol=1e-4, atol=1e-6)


def test_a_checkpoint_manager_root_of_many_steps_names_four_item_folders_and_the_count(tmp_path):
    """A CheckpointManager root of 7 steps: the hint names the first four item folders (steps in numeric order)
    and how many there are, not all of them (r291 M49: every folder was listed)."""
    from tracin.jax.checkpoints import restore

    root = tmp_path / "run"
    for step in (1, 2, 3, 10, 20, 30, 100):
        (root / str(step) / "default").mkdir(parents=True)
        (root / str(step) / "default" / "_METADATA").write_text("{}")
    with pytest.raises(
        ValueError, match=r"\): '1/default', '2/default', '3/default', '10/default', \.\.\. \(7 in all\)"
    ):
        restore(root, "checkpoints[0]")


def _decay_split() -> Any:
    """optax.partition of a decay / no-decay split (adamw on kernels, adam on biases), as the README recommends."""
    optax = pytest.importorskip("optax")

    def label(params: Any) -> Any:
        kind = lambda path, _: "nd" if "bias" in jax.tree_util.keystr(path) else "d"  # noqa: E731
        return jax.tree_util.tree_map_with_path(kind, params)

    return optax.partition({"d": optax.adamw(0.1, weight_decay=0.1), "nd": optax.adam(0.1)}, label)


def _partitioned_training(saves: int = 2) -> SimpleNamespace:
    """_nnx_training with _decay_split's optimizer: per save the copied State, the live opt_state, a copy of it, the
    live nnx.Optimizer, and float64 snapshots of the weights and the bias-corrected second moments (bias, kernel)."""
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, _decay_split(), wrt=nnx.Param)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((8, 3)).astype(np.float32), rng.integers(0, 2, 8)
    graphdef = nnx.graphdef(model)

    def loss_fn(params: Any, inputs: Any, targets: Any) -> Any:
        return -jax.nn.log_softmax(nnx.merge(graphdef, params)(inputs))[jnp.arange(targets.shape[0]), targets]

    run = SimpleNamespace(loss_fn=loss_fn, data=(x, y), copies=[], live_opt=[], opt_copies=[], snapshots=[], v_hats=[])
    for _ in range(saves):
        for _ in range(2):
            opt.update(model, nnx.grad(lambda m: loss_fn(nnx.state(m), x, y).mean())(model))
        state = nnx.state(model, nnx.Param)
        run.copies.append(jax.tree.map(lambda a: a, state))
        run.live_opt.append(opt.opt_state)
        run.opt_copies.append(jax.tree.map(lambda a: a, opt.opt_state))
        run.snapshots.append(jax.tree.map(np.array, state))
        decay, no_decay = (opt.opt_state.inner_states[k].inner_state[0] for k in ("d", "nd"))
        nu = [np.array(no_decay.nu["bias"][...], np.float64), np.array(decay.nu["kernel"][...], np.float64)]
        correction = 1 - 0.999 ** int(decay.count[...])
        run.v_hats.append(np.concatenate([v.ravel() for v in nu]) / correction)
    run.optimizer = opt
    return run


@pytest.mark.parametrize("live", ["opt_state", "optimizer"])
def test_a_live_partitioned_optimizer_state_at_two_checkpoints_is_refused(live):
    """review315 F1: for an optax.partition the moments are merged into a new ScaleByAdamState holding none of the
    live Variables, so a live opt_state (or the nnx.Optimizer itself) at every save was taken: each checkpoint got
    the last step's moments. The state as given is now compared."""
    run = _partitioned_training()
    states = run.live_opt if live == "opt_state" else [run.optimizer] * 2
    with pytest.raises(
        ValueError,
        match=r"checkpoints\[0\]\[2\] and checkpoints\[1\]\[2\] \(optimizer states\) hold the very same Flax NNX "
        r"Variables.*jax\.tree\.map\(lambda a: a, optimizer\.opt_state\)",
    ):
        parse_checkpoints([(c, 0.1, s) for c, s in zip(run.copies, states, strict=True)])


def test_a_live_adamw_optimizer_state_at_two_checkpoints_is_still_refused():
    """The one-Adam-state case (optax.adamw's chain) the F1 fix must keep refusing."""
    nnx, optax = pytest.importorskip("flax.nnx"), pytest.importorskip("optax")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(0.1), wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    entries = []
    for _ in range(2):
        opt.update(model, grads)
        entries.append((jax.tree.map(lambda a: a, nnx.state(model, nnx.Param)), 0.1, opt.opt_state))
    with pytest.raises(ValueError, match=r"checkpoints\[0\]\[2\] and checkpoints\[1\]\[2\] \(optimizer states\)"):
        parse_checkpoints(entries)


def test_copied_partitioned_optimizer_states_keep_each_checkpoints_moments(per_example_jax_grad):
    """A per-checkpoint copy of an optax.partition state is taken, and each checkpoint's "adam" rows are
    g / (sqrt(v_hat) + eps) with the moments of its own step (float64 snapshots of both partitions)."""
    run = _partitioned_training(saves=3)
    entries = [(c, 1.0, o) for c, o in zip(run.copies, run.opt_copies, strict=True)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = export_gradients(run.loss_fn, entries, run.data, preconditioner="adam", progress=False)
    for rows, snapshot, v_hat in zip(got.matrices, run.snapshots, run.v_hats, strict=True):
        expected = per_example_jax_grad(run.loss_fn, snapshot, *run.data) / (np.sqrt(v_hat) + 1e-8)
        np.testing.assert_allclose(np.asarray(rows), expected, rtol=1e-4, atol=1e-6)
    assert not np.allclose(run.v_hats[0], run.v_hats[2])


def test_an_orbax_restored_partitioned_nnx_optimizer_state_is_told_the_route_that_works(tmp_path):
    """review315 F2: nnx.state(optimizer) saved with orbax and restored with the abstract optimizer's State as
    target has lost optax's types but keeps an optax.partition's MaskedNode NamedTuples, which hid the explanation;
    its .opt_state is dicts too. The error names nnx.update(optimizer, restored) then .opt_state: run here, it gives
    the rows of the optimizer's own opt_state. An optax.sgd state (EmptyState alone) is not told it lost types."""
    nnx, optax = pytest.importorskip("flax.nnx"), pytest.importorskip("optax")
    run = _partitioned_training(saves=1)
    saver = ocp.StandardCheckpointer()
    saver.save(tmp_path / "opt", nnx.state(run.optimizer))
    saver.wait_until_finished()
    fresh = nnx.Optimizer(nnx.Linear(3, 2, rngs=nnx.Rngs(5)), _decay_split(), wrt=nnx.Param)
    restored = saver.restore(tmp_path / "opt", nnx.state(nnx.eval_shape(lambda: fresh)))
    for state in (restored, restored.opt_state):
        with pytest.raises(
            ValueError,
            match=r"found 0 \(its states: MaskedNode\).*lost optax's state types.*nnx\.update\(optimizer, restored\) "
            r"on an nnx\.Optimizer made as the saved one, and pass its \.opt_state",
        ):
            parse_checkpoints([(run.copies[0], 0.1, state)])
    nnx.update(fresh, restored)
    export = functools.partial(export_gradients, run.loss_fn, data=run.data, preconditioner="adam", progress=False)
    got = export([(run.copies[0], 0.1, fresh.opt_state)])
    np.testing.assert_array_equal(got.matrices[0], export([(run.copies[0], 0.1, run.opt_copies[0])]).matrices[0])
    with pytest.raises(ValueError, match=r"its states: EmptyState\)") as sgd:
        parse_checkpoints([(run.copies[0], 0.1, optax.sgd(0.1).init(run.snapshots[0]))])
    assert "lost optax's state types" not in str(sgd.value)


def test_a_genuine_optax_state_of_params_named_mu_and_nu_is_not_told_it_lost_types():
    """A model's own 'mu' / 'nu' params (a Student-t head) put those dict keys in any optax state of it: a momentum
    SGD state, or two Adam states over the same leaves, kept their types and are not told they lost them."""
    optax = pytest.importorskip("optax")
    params = {"mu": {"w": np.ones(3, np.float32)}, "nu": {"w": np.ones(3, np.float32)}}
    for tx, kinds in (
        (optax.sgd(0.1, momentum=0.9), "EmptyState, TraceState"),
        (optax.chain(optax.adam(0.1), optax.adam(0.1)), "EmptyState, ScaleByAdamState"),
    ):
        with pytest.raises(ValueError, match=rf"its states: {kinds}\)") as error:
            parse_checkpoints([(params, 0.1, tx.init(params))])
        assert "lost optax's state types" not in str(error.value)


def test_an_nnx_state_restored_by_orbax_without_a_target_warns_that_its_batch_statistics_are_exported(tmp_path):
    """review315 F3: ocp.StandardCheckpointer().restore(path) without a target gives the dicts tracin makes from the
    path, but only the path warned: in memory, BatchNorm's mean and var were exported silently. The State restored
    with its target exports the Params alone, without that warning."""
    saver, state, loss_fn, data = _saved_batchnorm_net(tmp_path)
    dicts = saver.restore(tmp_path / "state")
    with pytest.warns(UserWarning, match=r"checkpoints\[0\] \(params\) looks like a Flax NNX State saved to a file "):
        got = export_gradients(loss_fn, [(dicts, 1.0)], data, progress=False)
    assert {"bn/mean/value", "bn/var/value"} <= {p["name"] for p in got.metadata["params"]}
    with pytest.warns(UserWarning, match=r"Flax NNX State: only its nnx\.Param variables") as caught:
        got = export_gradients(loss_fn, [(saver.restore(tmp_path / "state", state), 1.0)], data, progress=False)
    assert not any("saved to a file" in str(w.message) for w in caught)
    assert "bn/mean" not in {p["name"] for p in got.metadata["params"]}
