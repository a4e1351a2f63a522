"""preconditioner="adam" on 16-bit gradients of a parameter whose gradient is 0 in exact arithmetic (one shift added
to every logit: softmax is shift-invariant) with the tiny second moment v of float32 training: the shift's rows are
its 16-bit rounding noise divided by ~eps, and one RuntimeWarning per export names it. Float32 gradients, or a v
of the gradients' own size, give none. Through tracin.jax and tracin.torch, and rounding_unit on bit patterns."""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest

from tracin._export.preconditioner import rounding_unit

D, C, N = 6, 4, 16  # features, classes, examples
TINY = 1e-18  # v of a gradient that float32 training saw as rounding only
WARNED = re.compile(r"preconditioner='adam': the 16-bit gradients of (.+) are near their rounding")


def _data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((N, D)).astype(np.float32), rng.integers(0, C, N).astype(np.int32)


def _caught(run, pattern: re.Pattern | str = WARNED) -> tuple:
    """run()'s result and the texts of its warnings that `pattern` finds (the rounding one by default)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run()
    return out, [str(w.message) for w in caught if re.search(pattern, str(w.message))]


def _shift_share(rows: np.ndarray) -> float:
    """The mean over rows of the shift's (the last column) share of the row's norm^2, in float64."""
    r = np.asarray(rows, np.float64)
    return float(np.mean(r[:, -1] ** 2 / (r**2).sum(1)))


def test_rounding_unit_tells_16_bit_gradients_by_their_bits():
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    half = x.astype(np.float16).astype(np.float32)
    brain = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # bfloat16 by truncation
    assert rounding_unit(brain) == 2.0**-8
    assert rounding_unit(half) == 2.0**-11
    assert rounding_unit(x) is None
    assert rounding_unit(np.where(np.arange(32).reshape(4, 8) < 7, brain, 0)) is None  # 7 non-zero: too few
    assert rounding_unit(np.zeros((3, 3), np.float32)) is None


# --- jax ---


def _jax_setup(v_shift: float):
    """(loss_fn, [(params, lr, optax state)] x 2, data): optax.adam trained in float32, then the shift's v set."""
    jax = pytest.importorskip("jax")
    jnp, optax = jax.numpy, pytest.importorskip("optax")

    def loss_fn(params, x, y):
        logits = x.astype(params["head"]["kernel"].dtype) @ params["head"]["kernel"] + params["head"]["shift"]
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)

    x, y = _data()
    params = {
        "head": {
            "kernel": jnp.asarray(np.random.default_rng(2).standard_normal((D, C)), jnp.float32),
            "shift": jnp.zeros((1,), jnp.float32),
        }
    }
    opt = optax.adam(0.05)
    state = opt.init(params)
    checkpoints = []
    for _ in range(2):
        for _ in range(3):
            grads = jax.grad(lambda p: loss_fn(p, x, y).mean())(params)
            updates, state = opt.update(grads, state)
            params = optax.apply_updates(params, updates)
        adam, *rest = state
        nu = {"head": {**adam.nu["head"], "shift": jnp.full((1,), v_shift, jnp.float32)}}
        checkpoints.append((params, 0.05, (adam._replace(nu=nu), *rest)))
    return loss_fn, checkpoints, (x, y)


def _jax_export(dtype: str, v_shift: float):
    import jax

    import tracin.jax

    loss_fn, checkpoints, data = _jax_setup(v_shift)
    cast = [(jax.tree_util.tree_map(lambda a: a.astype(dtype), p), lr, s) for p, lr, s in checkpoints]
    return _caught(
        lambda: tracin.jax.export_gradients(loss_fn, cast, data, preconditioner="adam", batch_size=8, progress=False)
    )


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_jax_16_bit_gradients_with_a_tiny_v_warn_once_naming_the_parameter(dtype):
    out, messages = _jax_export(dtype, TINY)
    assert len(messages) == 1, messages  # once per export, not per checkpoint or batch
    assert WARNED.match(messages[0]).group(1).startswith(f"'head/shift' ({dtype}, ")
    assert "layers=" in messages[0] and "float32" in messages[0]
    assert (
        _shift_share(out.matrices[0]) > 0.3
    )  # the noise it names does dominate the rows (a row whose sum came out exact has none)


@pytest.mark.parametrize(("dtype", "v_shift"), [("float32", TINY), ("bfloat16", 1e-2), ("float16", 1e-2)])
def test_jax_float32_gradients_or_a_v_of_their_size_do_not_warn(dtype, v_shift):
    out, messages = _jax_export(dtype, v_shift)
    assert messages == []
    assert _shift_share(out.matrices[0]) < 0.1


# --- torch ---


def _torch_export(dtype: str, v_shift: float, preconditioner: str | None = "adam", pattern: re.Pattern | str = WARNED):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    from tracin.torch import export_gradients

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(D, C))
            self.shift = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return x.to(self.weight.dtype) @ self.weight + self.shift

    def loss(logits, y):
        return nn.functional.cross_entropy(logits.float(), y, reduction="none")

    torch.manual_seed(0)
    model = nn.Sequential(Head())
    x, y = (torch.from_numpy(a) for a in _data())
    y = y.long()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    checkpoints = []
    for _ in range(2):
        for _ in range(3):
            opt.zero_grad()
            loss(model(x), y).mean().backward()
            opt.step()
        state = copy.deepcopy(opt.state_dict())
        state["state"][1]["exp_avg_sq"].fill_(v_shift)  # the shift's, the second parameter
        weights = {k: t.detach().to(getattr(torch, dtype), copy=True) for k, t in model.state_dict().items()}
        checkpoints.append((weights, 0.05, state))
    model = model.to(getattr(torch, dtype))
    checkpoints = checkpoints if preconditioner else [(w, lr) for w, lr, _ in checkpoints]
    return _caught(
        lambda: export_gradients(
            model, checkpoints, (x, y), loss, preconditioner=preconditioner, batch_size=8, progress=False
        ),
        pattern,
    )


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_16_bit_gradients_with_a_tiny_v_warn_once_naming_the_parameter(dtype):
    out, messages = _torch_export(dtype, TINY)
    assert len(messages) == 1, messages
    assert WARNED.match(messages[0]).group(1).startswith(f"'0.shift' ({dtype}, ")
    assert _shift_share(out.matrices[0]) > 0.3


@pytest.mark.parametrize(("dtype", "v_shift"), [("float32", TINY), ("bfloat16", 1e-2), ("float16", 1e-2)])
def test_torch_float32_gradients_or_a_v_of_their_size_do_not_warn(dtype, v_shift):
    out, messages = _torch_export(dtype, v_shift)
    assert messages == []
    assert _shift_share(out.matrices[0]) < 0.1


@pytest.mark.parametrize("preconditioner", ["adam", None])
def test_torch_autocast_warning_says_what_adam_does_to_its_rounding(preconditioner):
    torch = pytest.importorskip("torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, texts = _torch_export("float32", TINY, preconditioner, "called under torch.autocast")
    assert len(texts) == 1, texts
    assert ("preconditioner='adam' divides it by sqrt(v_hat) + eps" in texts[0]) == (preconditioner == "adam")


def test_torch_float32_gradients_that_fit_16_bits_do_not_warn():
    """A float32 linear model on integer counts with a margin loss (-t * output): its gradients (+-counts, +-1) are
    exact and fit bfloat16's bits, and the rarely active features' v is tiny; the params are float32: no warning."""
    torch = pytest.importorskip("torch")
    from tracin.torch import export_gradients

    rng = np.random.default_rng(3)
    x = np.zeros((N, D), np.float32)
    x[:, 0] = rng.integers(1000, 5000, N)  # a large count
    x[: N // 2, 1:] = rng.integers(0, 2, (N // 2, D - 1))  # 0/1 features
    t = (rng.integers(0, 2, N) * 2 - 1).astype(np.float32)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 1))

    def margin(out, t):
        return -t * out.squeeze(-1)

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    margin(model(torch.from_numpy(x)), torch.from_numpy(t)).mean().backward()
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    state["state"][0]["exp_avg_sq"][:, 1:] = TINY  # the 0/1 features, unseen for many steps
    checkpoints = [(copy.deepcopy(model.state_dict()), 1e-3, state)]
    data = (torch.from_numpy(x), torch.from_numpy(t))
    out, messages = _caught(
        lambda: export_gradients(model, checkpoints, data, margin, preconditioner="adam", batch_size=N, progress=False)
    )
    assert (np.asarray(out.matrices[0]) != 0).any()
    assert messages == []
