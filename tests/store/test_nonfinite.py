"""NaN / Inf rows are refused when written into a store (scoring refuses a store holding any), naming
the store, the checkpoint (and factor) and the first such rows in the store's numbering, before
anything of the write reaches the disk; the store stays resumable with the rows fixed."""

from __future__ import annotations

import pickle

import ml_dtypes
import numpy as np
import pytest

import tracin
from tracin.store._convert import NonFiniteError

from .helpers import NUMPY_DTYPES


def _files(path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


@pytest.mark.parametrize("source", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("target", ["float32", "float16", "bfloat16"])
def test_a_block_with_nan_or_inf_is_refused_and_nothing_of_it_is_stored(tmp_path, source, target):
    rng = np.random.default_rng(0)
    block = rng.standard_normal((20, 6)).astype(np.float32)
    block[3, 2], block[8, 0] = np.nan, -np.inf
    w = tracin.GradientStore.create(tmp_path / "s", n_rows=200, dims=[4, 6], dtype=target)
    w.write(0, 0, rng.standard_normal((200, 4)).astype(NUMPY_DTYPES[source]))
    before = _files(tmp_path / "s")
    with pytest.raises(ValueError, match=r"block holds NaN or Inf values in rows 103, 108 of checkpoint 1") as e:
        w.write(1, 100, block.astype(NUMPY_DTYPES[source]))
    assert isinstance(e.value, NonFiniteError) and e.value.rows == [103, 108] and e.value.count == 2
    assert str(tmp_path / "s") in str(e.value) and "nothing of this write was stored" in str(e.value)
    assert _files(tmp_path / "s") == before  # neither the data nor the manifest changed
    assert w.missing(1) == [[0, 200]]


def test_the_store_resumes_with_the_rows_fixed_and_scores_them(tmp_path):
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((30, 5)).astype(np.float32)
    bad = rows.copy()
    bad[17, 4] = np.inf
    w = tracin.GradientStore.create(tmp_path / "s", n_rows=30, dims=[5])
    w.write(0, 0, rows[:10])
    with pytest.raises(ValueError, match=r"in row 17 of checkpoint 0"):
        w.write(0, 10, bad[10:])
    w.close()
    w = tracin.GradientStore.create(tmp_path / "s", n_rows=30, dims=[5])  # resume: rows [10, 30) still to do
    assert w.missing(0) == [[10, 30]]
    w.write(0, 10, rows[10:])
    store = w.finalize()
    np.testing.assert_allclose(tracin.self_influence(store), (rows.astype(np.float64) ** 2).sum(1), rtol=1e-6)


def test_a_factored_block_names_the_factor_and_writes_neither(tmp_path):
    rng = np.random.default_rng(2)
    left, right = rng.standard_normal((8, 3)).astype(np.float32), rng.standard_normal((8, 2)).astype(np.float32)
    right[5, 1] = np.nan
    w = tracin.GradientStore.create(tmp_path / "s", n_rows=8, dims=[(3, 2), (2, 2)], factored=True, dtype="bfloat16")
    before = _files(tmp_path / "s")
    with pytest.raises(ValueError, match=r"block\[1\] \(the right factor\) holds NaN or Inf values in row 5 of checkp"):
        w.write(0, 0, (left, right))
    assert _files(tmp_path / "s") == before
    left[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"block\[0\] \(the left factor\) holds NaN or Inf values in row 0 of check"):
        w.write(0, 0, (left.astype(ml_dtypes.bfloat16), right))
    w.close()


def test_many_bad_rows_name_the_first_five_and_the_count(tmp_path):
    block = np.ones((50, 2), np.float32)
    block[[4, 9, 10, 20, 30, 31, 49], 1] = np.nan
    w = tracin.GradientStore.create(tmp_path / "s", n_rows=50, dims=[2], dtype="float16")
    with pytest.raises(ValueError, match=r"in rows 4, 9, 10, 20, 30, \.\.\. \(7 rows in all\) of checkpoint 0"):
        w.write(0, 0, block)
    w.close()


def test_a_range_writer_names_rows_of_the_store(tmp_path):
    tracin.GradientStore.create(tmp_path / "s", n_rows=100, dims=[3]).close()
    block = np.zeros((10, 3), np.float32)
    block[2, 0] = np.inf
    with tracin.GradientStore.create(tmp_path / "s", n_rows=100, dims=[3], rows=(40, 60)) as w:
        with pytest.raises(ValueError, match=r"in row 52 of checkpoint 0"):
            w.write(0, 50, block)


def test_the_error_survives_pickling():
    err = NonFiniteError("block holds NaN or Inf values in row 7", [7], 1, "block", " of checkpoint 0")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is NonFiniteError and str(back) == str(err) and (back.rows, back.count) == ([7], 1)


def test_a_torch_export_into_a_store_names_the_example(tmp_path):
    torch = pytest.importorskip("torch")
    import tracin.torch as tt

    torch.manual_seed(0)
    x, y = torch.randn(20, 4), torch.randn(20)
    good = x[7].clone()
    x[7] = float("nan")
    model = torch.nn.Linear(4, 1)
    states = [(model.state_dict(), 0.1)]

    def loss(out, t):
        return (out.squeeze(-1) - t) ** 2

    with pytest.raises(ValueError, match=r"row 7 of checkpoint 0"):
        tt.export_gradients(model, states, (x, y), loss, store=tmp_path / "g", batch_size=4, progress=False)
    x[7] = good  # fixed data is another export: into another directory
    store = tt.export_gradients(model, states, (x, y), loss, store=tmp_path / "g2", batch_size=4, progress=False)
    assert store.complete and np.isfinite(tracin.self_influence(store)).all()


def test_a_jax_export_into_a_store_names_the_example(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    import tracin.jax as tj

    x = np.random.default_rng(3).standard_normal((12, 3)).astype(np.float32)
    x[9, 1] = np.inf
    y = np.ones(12, np.float32)

    def loss(p, xb, yb):
        return ((xb @ p["w"]) - yb) ** 2

    params = {"w": jnp.ones(3, jnp.float32)}
    with pytest.raises(ValueError, match=r"row 9 of checkpoint 0"):
        tj.export_gradients(loss, [(params, 1.0)], (x, y), store=tmp_path / "g", batch_size=4, progress=False)
