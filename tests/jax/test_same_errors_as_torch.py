"""The same mistake is the same error in both adapters (decided once, in tracin._export.driver):
each case runs through tracin.torch and tracin.jax and must raise the same type with the same words."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tracin.jax
import tracin.torch

X = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
Y = np.random.default_rng(1).integers(0, 3, 12)


def _torch_export(checkpoints, data, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    state = model.state_dict()
    ckpts = [(state if c == "params" else c, lr) for c, lr in checkpoints]
    loss = kw.pop("loss", nn.CrossEntropyLoss(reduction="none"))
    if "on_first_loss" in kw:
        loss = _once_first(kw.pop("on_first_loss"), loss)
    return tracin.torch.export_gradients(model, ckpts, data, loss, progress=False, **kw)


def _jax_export(checkpoints, data, **kw):
    import jax
    import jax.numpy as jnp

    r = np.random.default_rng(2)
    params = {
        "w1": jnp.asarray(r.normal(size=(5, 4)), jnp.float32),
        "w2": jnp.asarray(r.normal(size=(4, 3)), jnp.float32),
    }
    ckpts = [(params if c == "params" else c, lr) for c, lr in checkpoints]

    def cross_entropy(p, x, y):
        logits = jnp.tanh(x @ p["w1"]) @ p["w2"]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]

    loss = kw.pop("loss", cross_entropy)
    if "on_first_loss" in kw:
        loss = _once_first(kw.pop("on_first_loss"), loss)
    return tracin.jax.export_gradients(loss, ckpts, data, progress=False, **kw)


EXPORTS = {"torch": _torch_export, "jax": _jax_export}
TWO = [("params", 1.0), ("params", 0.5)]


def _once_first(hook, fn):
    """fn, calling hook() before its first call."""
    calls = []

    def wrapped(*args):
        if not calls:
            calls.append(hook())
        return fn(*args)

    return wrapped


def _empty_file(path):
    path.write_bytes(b"")
    return str(path)


def _batches():
    return [(X[i : i + 4], Y[i : i + 4]) for i in range(0, 12, 4)]


CASES = {
    "one-shot iterator": (
        dict(checkpoints=TWO, data=lambda: iter(_batches())),
        ValueError,
        r"data is a one-shot iterator, but it is read once per checkpoint \(2 checkpoints\)",
    ),
    "missing checkpoint": (
        dict(checkpoints=lambda tmp: [("params", 1.0), (str(tmp / "gone"), 1.0)], data=None),
        FileNotFoundError,
        r"checkpoints\[1\]: no checkpoint at .*gone",
    ),
    # a failed copy or a full disk: the file is there but holds nothing
    "empty checkpoint file": (
        dict(checkpoints=lambda tmp: [("params", 1.0), (_empty_file(tmp / "empty.ckpt"), 1.0)], data=None),
        ValueError,
        r"checkpoints\[1\] \(.*empty\.ckpt\) cannot be read: a file of 0 bytes, empty or cut short",
    ),
    "no rows (arrays)": (dict(checkpoints=TWO[:1], data=lambda: (X[:0], Y[:0])), ValueError, "data has no rows"),
    "no rows (list)": (dict(checkpoints=TWO[:1], data=lambda: []), ValueError, "data has no rows"),
    "no rows (iterator)": (dict(checkpoints=TWO[:1], data=lambda: iter([])), ValueError, "data has no rows"),
    # the list of batches loses its last batch while checkpoint 0 is being computed
    "rows lost during the export": (
        dict(checkpoints=TWO, data=_batches, shrink=True),
        ValueError,
        r"data gave 8 rows at checkpoint 0, but its length \(len\) was 12: .* must not change during the export",
    ),
    # a setting shared by every example put in the data: named by its path, not read as two batches (f824587)
    "a setting in the inputs": (
        dict(checkpoints=TWO[:1], data=lambda: ({"x": X, "temperature": 2.0}, Y)),
        ValueError,
        r"^data inputs\['temperature'\]: expected an array.* with a leading batch dimension \(one row per example\), "
        r"got a float; a setting shared by every example belongs with .*functools\.partial\(loss_fn, temperature=",
    ),
    "a setting in the targets": (
        dict(checkpoints=TWO[:1], data=lambda: (X, {"y": Y, "smoothing": 0.1})),
        ValueError,
        r"^data targets\['smoothing'\]: expected an array.* with a leading batch dimension \(one row per example\), "
        r"got a float; a setting shared by every example belongs with loss_fn, not in the data: "
        r"functools\.partial\(loss_fn, smoothing=\.\.\.\)$",
    ),
    # review102 F1: a scalar among positional inputs is a setting (not told to make an array of it, again and again);
    # numbers in a Python list of values are told to make one of the list
    "a setting among the positional inputs": (
        dict(checkpoints=TWO[:1], data=lambda: ((X, 2.0), Y)),
        ValueError,
        r"^data inputs\[1\]: expected an array.* with a leading batch dimension \(one row per example\), "
        r"got a float; a setting shared by every example belongs with .*functools\.partial\(loss_fn, setting=\.\.\.\)$",
    ),
    "numbers in a Python list of values": (
        dict(checkpoints=TWO[:1], data=lambda: (X, [int(v) for v in Y])),
        ValueError,
        r"^data targets\[0\]: expected an array.* with a leading batch dimension \(one row per example\), "
        r"got an int in the Python list targets, which .* reads as a .*, not an? (array|tensor): "
        r"pass (torch\.tensor|np\.asarray)\(\.\.\.\) of the list$",
    ),
    "store not a path": (dict(checkpoints=TWO, data=None, store=3), TypeError, "store must be a directory path"),
    "store without a row count": (
        dict(checkpoints=TWO[:1], data=lambda: iter(_batches()), store="s"),
        ValueError,
        "store= needs the number of examples up front",
    ),
    "loss not callable": (dict(checkpoints=TWO, data=None, loss="ce"), TypeError, "loss_fn must be callable"),
    "empty checkpoint list": (dict(checkpoints=[], data=None), ValueError, "checkpoints is empty"),
    "bad learning rate": (
        dict(checkpoints=[("params", "fast")], data=None),
        TypeError,
        r"checkpoints\[0\]\[1\] \(learning rate\) must be a real number",
    ),
}


@pytest.mark.parametrize("framework", EXPORTS)
@pytest.mark.parametrize("case", CASES)
def test_the_same_mistake_is_the_same_error(framework, case, tmp_path):
    kwargs, error, message = CASES[case]
    kwargs = dict(kwargs)
    checkpoints, data = kwargs.pop("checkpoints"), kwargs.pop("data")
    checkpoints = checkpoints(tmp_path) if callable(checkpoints) else checkpoints
    data = data() if data is not None else (X, Y)
    if kwargs.pop("shrink", False):
        kwargs["on_first_loss"] = data.pop
    if "store" in kwargs and isinstance(kwargs["store"], str):
        kwargs["store"] = tmp_path / kwargs["store"]
    with pytest.raises(error, match=message) as caught:
        EXPORTS[framework](checkpoints, data, **kwargs)
    assert type(caught.value) is error
