"""preconditioner="adam" where some of a parameter's second moment v is exactly 0 (embedding rows of tokens the
training never held), through tracin.torch and tracin.jax: the full-row "adam" divides those entries by eps and
the Kronecker (rank-one) one scales those rows by 0, and each path says so in one RuntimeWarning per layer per
checkpoint; a state with no zero v gives none. Checked against float64 NumPy from the optimizer state."""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest

import tracin

V, D, C = 10, 4, 3  # vocabulary, embedding width, classes
SEEN = 6  # training ids are 0 .. SEEN - 1: rows SEEN .. V - 1 of the embedding's v stay 0
EXACT = re.compile(
    r"preconditioner='adam': (\d+) of the (\d+) rows of a batch have gradient where the second moment \(v\) of "
    r"(.+?) is 0 in checkpoint (\d+) \((\d+) of (\d+) entries(?:; (\d+) of its (\d+) rows all 0)?: "
    r".*divides a gradient there by eps=(\S+),"
)
KRON = re.compile(
    r"preconditioner='adam': (\d+) of (\d+) second moments \(v\) of (.+?) are 0(?: in checkpoint (\d+))?: "
    r"(\d+) of (\d+) rows and (\d+) of (\d+) columns of v are all 0 .* scales those rows and columns by 0"
)


def _caught(run):
    """run()'s result and its RuntimeWarnings' texts; each of them points at this file (the user's call)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run()
    caught = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert all(w.filename == __file__ for w in caught if "(v)" in str(w.message)), [w.filename for w in caught]
    return out, [str(w.message) for w in caught]


def _check(messages, v_emb, kron, checkpoints=2):
    """One warning per checkpoint, all about the embedding, with the counts of float64 NumPy on its v."""
    zero_rows = int((~v_emb.any(1)).sum())
    assert zero_rows == V - SEEN and int((v_emb == 0).sum()) == zero_rows * D  # the setting the test means
    assert len(messages) == checkpoints, messages
    for c, text in enumerate(messages):
        if kron:
            m = KRON.match(text)
            assert m, text
            zero, size, _, checkpoint, rows, p, cols, q = m.groups()
            assert (zero, size, checkpoint) in ((str(zero_rows * D), str(V * D), x) for x in (None, str(c)))
            assert (rows, p, cols, q) == (str(zero_rows), str(V), "0", str(D))
            assert "divides those entries by eps=1e-08" in text
        else:
            m = EXACT.match(text)
            assert m, text
            touch, n_rows, _, checkpoint, zero, size, rows, of_rows, eps = m.groups()
            assert (touch, n_rows) == ("1", "1")  # the query, which holds id 8
            assert (zero, size, checkpoint, eps) == (str(zero_rows * D), str(V * D), str(c), "1e-08")
            assert (rows, of_rows) in ((None, None), (str(zero_rows), str(V)))
            assert "scales whole zero rows and columns of v by 0" in text


# --- torch ---


def _torch_setup():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, D)
            self.head = nn.Linear(D, C)

        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids)))

    def loss(logits, labels):
        return nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").sum(1)

    torch.manual_seed(0)
    model = Tagger()
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, SEEN, (8, 5), generator=g), torch.randint(0, C, (8, 5), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    checkpoints = []
    for _ in range(2):
        for _ in range(2):
            opt.zero_grad()
            loss(model(ids), labels).mean().backward()
            opt.step()
        checkpoints.append((copy.deepcopy(model.state_dict()), 0.05, copy.deepcopy(opt.state_dict())))
    query = torch.tensor([[1, 2, 8, 3]]), torch.tensor([[0, 1, 2, 0]])  # id 8: never in training
    return model, loss, checkpoints, query


def test_torch_exact_and_kronecker_adam_warn_about_embedding_rows_whose_v_is_zero():
    from tracin.torch import export_gradients

    model, loss, checkpoints, query = _torch_setup()
    v_emb = [c[2]["state"][0]["exp_avg_sq"].double().numpy() for c in checkpoints]
    full, messages = _caught(
        lambda: export_gradients(
            model, checkpoints, query, loss, layers=["emb"], preconditioner="adam", batch_size=1, progress=False
        )
    )
    _check(messages, v_emb[0], kron=False)
    row = np.asarray(full.matrices[1], np.float64)[0].reshape(V, D)
    assert (row[8] ** 2).sum() / (row**2).sum() > 0.999  # g / eps: the unseen token's row is nearly all of it
    proj = tracin.Projection(4 * 8, seed=0, per_layer=True, kronecker=True)
    _, messages = _caught(
        lambda: export_gradients(
            model,
            checkpoints,
            query,
            loss,
            layers=["emb", "head"],
            projection=proj,
            preconditioner="adam",
            progress=False,
        )
    )
    _check(messages, v_emb[0], kron=True)


def test_torch_adam_without_zero_v_does_not_warn():
    from tracin.torch import export_gradients

    model, loss, checkpoints, query = _torch_setup()
    proj = tracin.Projection(4 * 8, seed=0, per_layer=True, kronecker=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "projection .* not fewer than the gradient's row width", RuntimeWarning)
        for kwargs in ({"layers": ["head"]}, {"layers": ["head"], "projection": proj}):
            export_gradients(model, checkpoints, query, loss, preconditioner="adam", progress=False, **kwargs)


def test_torch_exact_adam_does_not_warn_when_no_exported_row_has_gradient_where_v_is_zero():
    """Ids 6 .. 9 (as a padding_idx row, or positions beyond the texts' length) have v = 0 but no exported row
    holds them: their gradient is 0, divided by eps still 0, so the full-row "adam" says nothing."""
    import torch

    from tracin.torch import export_gradients

    model, loss, checkpoints, _ = _torch_setup()
    v_emb = checkpoints[0][2]["state"][0]["exp_avg_sq"].double().numpy()
    assert int((~v_emb.any(1)).sum()) == V - SEEN
    seen = torch.tensor([[1, 2, 5, 3], [0, 4, 4, 1]]), torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = export_gradients(
            model, checkpoints, seen, loss, layers=["emb"], preconditioner="adam", batch_size=1, progress=False
        )
    rows = np.asarray(out.matrices[1], np.float64).reshape(2, V, D)
    assert rows[:, :SEEN].any() and not rows[:, SEEN:].any()


# --- JAX ---


def _jax_setup():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jnp = jax.numpy

    def loss(p, ids, labels):
        logits = jnp.tanh(p["emb"][ids]) @ p["head"].T
        lp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(lp, labels[..., None], -1)[..., 0].sum(-1)

    r = np.random.default_rng(2)
    params = {
        "emb": jnp.asarray(r.normal(size=(V, D)), jnp.float32),
        "head": jnp.asarray(r.normal(size=(C, D)), jnp.float32),
    }
    ids, labels = jnp.asarray(r.integers(0, SEEN, (8, 5))), jnp.asarray(r.integers(0, C, (8, 5)))
    opt = optax.adam(0.05)
    state, checkpoints = opt.init(params), []
    grad = jax.jit(jax.grad(lambda p: loss(p, ids, labels).mean()))
    for _ in range(2):
        for _ in range(2):
            updates, state = opt.update(grad(params), state, params)
            params = optax.apply_updates(params, updates)
        checkpoints.append((params, 0.05, state))
    query = jnp.asarray([[1, 2, 8, 3]]), jnp.asarray([[0, 1, 2, 0]])
    nu = [
        np.asarray(next(s for s in c[2] if isinstance(s, optax.ScaleByAdamState)).nu["emb"], np.float64)
        for c in checkpoints
    ]
    return loss, checkpoints, query, nu


def test_jax_exact_and_kronecker_adam_warn_about_embedding_rows_whose_v_is_zero():
    from tracin.jax import export_gradients

    loss, checkpoints, query, nu = _jax_setup()
    full, messages = _caught(
        lambda: export_gradients(loss, checkpoints, query, preconditioner="adam", batch_size=1, progress=False)
    )
    messages = [m for m in messages if "(v)" in m]
    _check(messages, nu[0], kron=False)
    row = np.asarray(full.matrices[1], np.float64)[0, : V * D].reshape(V, D)  # "emb" first (keys sorted)
    assert (row[8] ** 2).sum() / (np.asarray(full.matrices[1], np.float64)[0] ** 2).sum() > 0.999
    proj = tracin.Projection(4 * 8, seed=0, per_layer=True, kronecker=True)
    _, messages = _caught(
        lambda: export_gradients(loss, checkpoints, query, projection=proj, preconditioner="adam", progress=False)
    )
    _check([m for m in messages if "(v)" in m], nu[0], kron=True)


def test_jax_adam_without_zero_v_does_not_warn():
    from tracin.jax import export_gradients

    loss, checkpoints, query, _ = _jax_setup()
    proj = tracin.Projection(4 * 8, seed=0, per_layer=True, kronecker=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "projection .* not fewer than the gradient's row width", RuntimeWarning)
        for kwargs in ({}, {"projection": proj}):  # the head only: every entry of its v is > 0
            export_gradients(loss, checkpoints, query, layers=["head"], preconditioner="adam", progress=False, **kwargs)


def test_jax_exact_adam_does_not_warn_when_no_exported_row_has_gradient_where_v_is_zero():
    from tracin.jax import export_gradients

    loss, checkpoints, _, nu = _jax_setup()
    assert int((~nu[0].any(1)).sum()) == V - SEEN
    seen = np.asarray([[1, 2, 5, 3], [0, 4, 4, 1]]), np.asarray([[0, 1, 2, 0], [2, 2, 1, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = export_gradients(loss, checkpoints, seen, layers=["emb"], preconditioner="adam", progress=False)
    rows = np.asarray(out.matrices[1], np.float64).reshape(2, V, D)
    assert rows[:, :SEEN].any() and not rows[:, SEEN:].any()
