"""Exports into a GradientStore: same rows as in memory, and a killed export resumes where it stopped."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest

import tracin
from interrupts import FailingBatches, Killed
from tracin.jax import export_gradients, per_example


def _blocks(gradient_set):
    factored, blocks, _ = gradient_set.kernel_side(0, None)
    return [np.asarray(b) for b in blocks]


def _in_memory_and_stored(mlp, data, path, mode: str, **options):
    """The same export of `mlp` over `data` in memory and into a store at `path` (batches of 16;
    last_layer on l2)."""
    kw = dict(mode=mode, batch_size=16, progress=False, **options)
    if mode == "last_layer":
        kw.update(layers=["l2"], layer_input=mlp.hidden)
    ckpts = list(zip(mlp.params, mlp.lrs, strict=True))
    memory = export_gradients(mlp.loss_fn, ckpts, data, **kw)
    return memory, export_gradients(mlp.loss_fn, ckpts, data, store=path, **kw)


def _store_files(path):
    """{file name: bytes} of a store directory's .npy files, and its manifest without the random
    store id (a new one per store)."""
    files = {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.suffix == ".npy"}
    manifest = json.loads((path / "manifest.json").read_text())
    files["manifest.json"] = json.dumps({k: v for k, v in manifest.items() if k != "id"}, sort_keys=True).encode()
    return files


@pytest.mark.parametrize("mode, dtype", [("full", "float32"), ("last_layer", "bfloat16")])
def test_store_holds_the_in_memory_rows(mlp, data, tmp_path, mode, dtype):
    memory, store = _in_memory_and_stored(mlp, data, tmp_path / "g", mode, dtype=dtype)
    assert isinstance(store, tracin.GradientStore) and store.n_rows == 70 and store.dims == memory.dims
    np.testing.assert_array_equal(store.weights, mlp.lrs)
    assert store.metadata["params"] == memory.metadata["params"]
    for a, b in zip(_blocks(store), _blocks(memory), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(tracin.scores(memory[:5], store), tracin.scores(memory[:5], memory))


def test_killed_export_resumes_without_recomputing(mlp, data, tmp_path, monkeypatch):
    x, y = data
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 70, 16)]  # 5 batches, the last of 6 rows
    ckpts = list(zip(mlp.params, mlp.lrs, strict=True))
    calls = []
    original = per_example.FullRows.__call__

    def counted(self, selected, arrays, batch):
        calls.append(batch.start)
        return original(self, selected, arrays, batch)

    monkeypatch.setattr(per_example.FullRows, "__call__", counted)
    flaky = FailingBatches(batches, on=3, after=3)  # pass 1 fingerprints the data; dies in checkpoint 1 after 3 batches
    with pytest.raises(Killed):
        export_gradients(mlp.loss_fn, ckpts, flaky, store=tmp_path / "g", progress=False)
    assert calls == [0, 16, 32, 48, 64, 0, 16, 32]
    calls.clear()
    resumed = export_gradients(mlp.loss_fn, ckpts, batches, store=tmp_path / "g", progress=False)
    assert calls == [48, 64], "only the batches not yet written are computed"
    memory = export_gradients(mlp.loss_fn, ckpts, batches, progress=False)
    for a, b in zip(_blocks(resumed), _blocks(memory), strict=True):
        np.testing.assert_array_equal(a, b)
    calls.clear()
    again = export_gradients(mlp.loss_fn, ckpts, batches, store=tmp_path / "g", progress=False)
    assert calls == [] and again.complete


@pytest.mark.parametrize("mode", ["full", "last_layer"])
def test_projected_store_holds_the_projected_rows_and_its_spec(mlp, data, tmp_path, mode):
    projection = tracin.Projection(12, seed=2, per_layer=mode == "full")
    memory, store = _in_memory_and_stored(mlp, data, tmp_path / "g", mode, projection=projection)
    assert store.dims == memory.dims == (((4, 3),) * 2 if mode == "last_layer" else (12, 12))
    assert tracin.Projection.from_dict(store.metadata["projection"]) == projection
    for a, b in zip(_blocks(store), _blocks(memory), strict=True):
        np.testing.assert_array_equal(a, b)
    reopened = tracin.GradientStore.open(tmp_path / "g")
    np.testing.assert_array_equal(tracin.self_influence(reopened), tracin.self_influence(memory))


def test_scoring_refuses_a_store_projected_differently(mlp, data, tmp_path):
    x, y = data
    ckpts = list(zip(mlp.params, mlp.lrs, strict=True))
    store = export_gradients(
        mlp.loss_fn, ckpts, (x, y), projection=tracin.Projection(12, seed=2), store=tmp_path / "g", progress=False
    )
    other = export_gradients(
        mlp.loss_fn, ckpts, (x[:5], y[:5]), projection=tracin.Projection(12, seed=3), progress=False
    )
    with pytest.raises(ValueError, match="projection mismatch.*seed"):
        tracin.top_k(other, store, k=3)
    plain = export_gradients(mlp.loss_fn, ckpts, (x[:5], y[:5]), layers=["l2"], progress=False)
    with pytest.raises(ValueError, match="projection mismatch.*not projected"):
        tracin.scores(plain, store)


def test_resuming_with_other_data_or_checkpoints_is_refused(mlp, data, tmp_path):
    x, y = data
    ckpts = list(zip(mlp.params, mlp.lrs, strict=True))
    path = tmp_path / "g"
    export_gradients(mlp.loss_fn, ckpts, (x, y), store=path, progress=False)
    other = x.copy()
    other[-1] += 1  # same size, one input changed
    with pytest.raises(ValueError, match=r"the data \(inputs or targets\) differ, or the batch size does "):
        export_gradients(mlp.loss_fn, ckpts, (other, y), store=path, progress=False)
    swapped = [(mlp.params[1], mlp.lrs[0]), (mlp.params[0], mlp.lrs[1])]  # same rates, other weights
    with pytest.raises(ValueError, match=r"other inputs: the same checkpoints in another order\. "):
        export_gradients(mlp.loss_fn, swapped, (x, y), store=path, progress=False)
    assert export_gradients(mlp.loss_fn, ckpts, (x, y), store=path, progress=False).complete


def test_an_interrupted_export_leaves_byte_identical_files_after_resume(mlp, data, tmp_path):
    x, y = data
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 70, 16)]
    ckpts = list(zip(mlp.params, mlp.lrs, strict=True))
    with pytest.raises(Killed):
        export_gradients(
            mlp.loss_fn,
            ckpts,
            FailingBatches(batches, on=3, after=2),
            store=tmp_path / "g",
            dtype="float16",
            progress=False,
        )
    export_gradients(mlp.loss_fn, ckpts, batches, store=tmp_path / "g", dtype="float16", progress=False)
    export_gradients(mlp.loss_fn, ckpts, batches, store=tmp_path / "f", dtype="float16", progress=False)
    assert _store_files(tmp_path / "g") == _store_files(tmp_path / "f") and len(_store_files(tmp_path / "f")) == 3


class _Rotating(list):
    """A list of batches iterated from a different start on every pass (a shuffling iterable)."""

    passes = 0

    def __iter__(self):
        self.passes += 1
        k = self.passes % len(self)
        return iter(list.__getitem__(self, slice(k, None)) + list.__getitem__(self, slice(0, k)))


def test_data_that_changes_order_between_checkpoints_is_refused(mlp, data):
    x, y = data
    rotating = _Rotating([(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)])
    with pytest.raises(ValueError, match="checkpoint 1: batch 0 of the data holds other targets"):
        export_gradients(mlp.loss_fn, list(zip(mlp.params, mlp.lrs, strict=True)), rotating, progress=False)


class _Reshuffled:
    """A re-iterable of unknown length whose every pass gives the rows in another order."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y, self.passes = x, y, 0

    def __iter__(self):
        self.passes += 1
        order = np.random.default_rng(self.passes).permutation(len(self.x))
        return ((self.x[order[i : i + 8]], self.y[order[i : i + 8]]) for i in range(0, len(self.x), 8))


def test_data_reshuffled_between_checkpoints_is_refused_when_every_target_is_the_same(mlp, data, tmp_path):
    """The rows of one class (targets all equal) in another order on every pass: the same-rows check
    compares inputs too, with or without a store (which first reads the data through)."""
    x, y = data
    same = np.full_like(y[:24], y[0])
    for store in (None, tmp_path / "g"):
        with pytest.raises(ValueError, match="checkpoint [01]: batch 0 of the data holds other inputs"):
            export_gradients(
                mlp.loss_fn,
                list(zip(mlp.params, mlp.lrs, strict=True)),
                _Reshuffled(x[:24], same),
                store=store,
                progress=False,
            )


def test_data_without_targets_reshuffled_is_refused_for_its_inputs_digested_once(mlp, data, monkeypatch):
    """targets None (a language model's loss): the inputs stood in for the targets, so they were
    digested twice per pass and a reshuffle was reported as 'other targets' (review11 nonetargets.py).
    The data digest stays what it was (inputs' digest twice per batch): stores resume."""
    import hashlib

    from tracin._export import fingerprint

    x, _ = data

    def loss(params, inputs, _none):  # every example's label 0
        return mlp.loss_fn(params, inputs, np.zeros(inputs.shape[0], np.int32))

    digested = []
    original = fingerprint.digest_arrays
    monkeypatch.setattr(fingerprint, "digest_arrays", lambda arrays: digested.append(1) or original(arrays))
    batches = [(x[i : i + 8], None) for i in range(0, 24, 8)]
    got = export_gradients(loss, list(zip(mlp.params, mlp.lrs, strict=True)), batches, progress=False)
    assert len(digested) == 3  # once per batch, first pass only
    whole = hashlib.blake2b(digest_size=16)
    for inputs, _ in batches:
        whole.update(2 * original([inputs]).encode())
    assert got.metadata["fingerprints"]["data"] == whole.hexdigest()
    rows = [(x[i : i + 8], None) for i in range(0, 24, 8)]
    with pytest.raises(ValueError, match="checkpoint 1: batch 0 of the data holds other inputs"):
        export_gradients(loss, list(zip(mlp.params, mlp.lrs, strict=True)), _Rotating(rows), progress=False)


class _ReadOnce:
    """Looks re-iterable (iter(d) is not d) but every __iter__ returns the same generator."""

    def __init__(self, batches):
        self.batches = (b for b in batches)

    def __iter__(self):
        return iter(self.batches)


def test_data_readable_once_behind_a_re_iterable_face_is_refused_with_advice_not_no_rows(mlp, data, tmp_path):
    """store= reads the data through to count its rows, which consumes such data: the pass at the
    first checkpoint then gives none (was 'data has no rows' for data of 24 rows)."""
    x, y = data
    once = _ReadOnce([(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)])
    with pytest.raises(ValueError, match=r"gave 0 rows at checkpoint 0, expected 24.*read only once.*pass \(inputs"):
        export_gradients(mlp.loss_fn, [(mlp.params[0], 1.0)], once, store=tmp_path / "g", progress=False)


def test_gradients_beyond_the_float16_range_are_an_error_at_export(mlp, data, tmp_path):
    x, y = data
    huge = lambda params, xs, ys: mlp.loss_fn(params, xs, ys) * 1e6  # noqa: E731
    for store in (None, tmp_path / "g"):
        with pytest.raises(ValueError, match="beyond the float16 range"):
            export_gradients(
                huge, list(zip(mlp.params, mlp.lrs, strict=True)), (x, y), dtype="float16", store=store, progress=False
            )


def test_an_export_beyond_its_dtype_names_dtype_the_checkpoint_and_the_first_row(tmp_path):
    """Only row 13 (in the second batch of 8) of checkpoint 1 overflows float16 (|g| up to 5.4e5, 5.4e3 at
    checkpoint 0): the error names dtype=, checkpoint 1 and row 13, with the dtypes that hold it (was:
    'block holds float32 values beyond the float16 range ...; store them as float32 (or bfloat16 instead
    of float16)'). With store=, that the directory keeps float16 (tests/_export/test_sinks.py: bfloat16)."""
    r = np.random.default_rng(0)
    x = r.normal(size=(20, 3)).astype(np.float32)
    x[13] = 300.0

    def loss(p, inputs, targets):
        return ((inputs @ p["w"]) ** 2).sum(-1)

    w = np.full((3, 2), 0.01, np.float32)
    ckpts = [({"w": w}, 1.0), ({"w": 100 * w}, 1.0)]
    message = (
        r"^dtype='float16': row 13 of checkpoint 1 holds float32 gradient values beyond the float16 range "
        r"\(\|x\| >= 65520 rounds beyond 65504\), the first such row; export with dtype='float32' or dtype='bfloat16'"
    )
    with pytest.raises(ValueError, match=message + "$"):
        export_gradients(loss, ckpts, (x, None), dtype="float16", batch_size=8, progress=False)
    with pytest.raises(ValueError, match=message + "; the store begun in .* keeps dtype='float16'"):
        export_gradients(loss, ckpts, (x, None), dtype="float16", batch_size=8, store=tmp_path / "g", progress=False)
    fits = export_gradients(loss, ckpts[:1], (x, None), dtype="float16", batch_size=8, progress=False)
    assert fits.matrices[0].shape == (20, 6)


@pytest.mark.parametrize("mode", ["full", "last_layer"])
def test_float64_gradients_beyond_the_float32_range_are_an_error_naming_the_row(mode):
    """x64 params: row 13 (second batch of 8) of checkpoint 1 has finite float64 gradients above float32's
    largest value (2 x_13 (x_13 w) ~ 6e40; dL/dy ~ 6e40 for the factored rows). They were stored as inf (then
    refused by scoring as if the loss were NaN); checkpoint 0 fits and matches the float64 NumPy rows."""
    import jax

    r = np.random.default_rng(0)
    x = r.normal(size=(20, 3))
    x[13] = 1e20

    def loss(p, inputs, targets):
        return ((inputs @ p["w"] + p["b"]) ** 2).sum(-1)

    ckpts = [({"w": np.full((3, 2), s), "b": np.zeros(2)}, 1.0) for s in (1e-10, 1e20)]
    kw = dict(mode=mode, batch_size=8, progress=False)
    if mode == "last_layer":
        kw.update(layers=["w", "b"], layer_input=lambda p, inputs: inputs)
    message = (
        r"^checkpoint 1: row 13 holds float64 gradient values beyond the float32 range \(\|x\| > 3.40282e\+38\), "
        "the first such row"
    )
    with jax.enable_x64(True):
        with pytest.raises(ValueError, match=message):
            export_gradients(loss, ckpts, (x, None), **kw)
        fits = export_gradients(loss, ckpts[:1], (x, None), **kw)
    w = ckpts[0][0]["w"]
    dy = 2 * (x @ w)  # float64 dL/dy per example (b = 0)
    if mode == "full":  # rows: b then w (sorted keys), w row-major
        expected = np.concatenate([dy, np.einsum("ni,no->nio", x, dy).reshape(20, -1)], axis=1)
        got = np.asarray(fits.matrices[0], np.float64)
    else:
        expected = np.einsum("no,ni->noi", dy, np.concatenate([x, np.ones((20, 1))], axis=1)).reshape(20, -1)
        left, right = (np.asarray(b, np.float64) for b in _blocks(fits))
        got = np.einsum("no,ni->noi", left, right).reshape(20, -1)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_numpy_batch_sizes_are_accepted(mlp, data):
    x, y = data
    ckpts = list(zip(mlp.params, mlp.lrs, strict=True))
    a = export_gradients(mlp.loss_fn, ckpts, (x, y), batch_size=16, progress=False)
    b = export_gradients(mlp.loss_fn, ckpts, (x, y), batch_size=np.int64(16), progress=False)
    for m, n in zip(a.matrices, b.matrices, strict=True):
        np.testing.assert_array_equal(m, n)


def test_resuming_with_another_loss_function_is_refused(mlp, data, tmp_path):
    x, y = data
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 70, 16)]
    ckpts = list(zip(mlp.params, mlp.lrs, strict=True))
    with pytest.raises(Killed):  # pass 1 fingerprints the data; dies in checkpoint 0
        dying = FailingBatches(batches, on=2, after=2)
        export_gradients(mlp.loss_fn, ckpts, dying, store=tmp_path / "g", progress=False)

    def squared_error(params, inputs, targets):
        return (mlp.loss_fn(params, inputs, targets) - 1.0) ** 2

    with pytest.raises(
        ValueError,
        match=r"other inputs: the loss function differs \(.*loss_fn code\[[0-9.]+\]=\w+ there, "
        r".*squared_error code\[[0-9.]+\]=\w+ here\)",
    ):
        export_gradients(squared_error, ckpts, batches, store=tmp_path / "g", progress=False)
    resumed = export_gradients(mlp.loss_fn, ckpts, batches, store=tmp_path / "g", progress=False)
    memory = export_gradients(mlp.loss_fn, ckpts, batches, progress=False)
    for a, b in zip(_blocks(resumed), _blocks(memory), strict=True):
        np.testing.assert_array_equal(a, b)


class _Loader(Sequence):
    """A loader with len() and indexing (batches read one by one, counted) that iterates itself."""

    def __init__(self, x, y, size):
        self.batches, self.reads = [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)], 0

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        batch = self.batches[i]  # IndexError past the end, which ends Sequence.__iter__
        self.reads += 1
        return batch


class _Iterable:
    """Re-iterable batches with a len() (of batches, not rows) and no indexing, as a grain / tf.data loader."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def test_a_store_reads_a_loader_once_more_with_a_bar_and_counts_its_rows_then(mlp, data, tmp_path, capsys):
    """store= reads the data once up front (its fingerprint and row count, with a progress bar), then once
    per checkpoint: a loader is no longer read a third time to count its rows; an iterable with len()
    works too. One-shot data is refused in tracin.jax's words."""
    x, y = data
    ckpts = list(zip(mlp.params, mlp.lrs, strict=True))
    expected = export_gradients(mlp.loss_fn, ckpts, (x, y), progress=False)
    loader = _Loader(x, y, 16)
    stored = export_gradients(mlp.loss_fn, ckpts, loader, store=tmp_path / "a", progress=True)
    assert loader.reads == 3 * len(loader)  # the read-through and 2 checkpoints
    assert "tracin.jax export: reading the data: 70ex" in capsys.readouterr().err.replace("\r", "\n")
    np.testing.assert_allclose(tracin.self_influence(stored), tracin.self_influence(expected), rtol=1e-5)
    batches = _Iterable(loader.batches)
    again = export_gradients(mlp.loss_fn, ckpts, batches, store=tmp_path / "b", progress=False)
    assert again.n_rows == 70
    np.testing.assert_allclose(tracin.self_influence(again), tracin.self_influence(expected), rtol=1e-5)
    with pytest.raises(ValueError, match=r"up front.*: pass \(inputs, targets\) arrays or a re-iterable") as err:
        export_gradients(mlp.loss_fn, ckpts[:1], iter(loader.batches), store=tmp_path / "c", progress=False)
    assert "DataLoader" not in str(err.value)


def test_an_in_memory_export_of_a_loader_shows_a_total_once_the_rows_are_known(mlp, data, capsys):
    """Without store= a loader's rows are counted by the first checkpoint's pass: the later passes'
    bar has a total (a percentage, an ETA) instead of a bare count."""
    x, y = data
    ckpts = list(zip(mlp.params, mlp.lrs, strict=True))
    export_gradients(mlp.loss_fn, ckpts, _Loader(x, y, 16), progress=True)
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "tracin.jax export: 70ex" in err  # the first pass: rows unknown
    assert "tracin.jax export checkpoint 2/2: 100%" in err and "70/70" in err


@pytest.mark.parametrize("row", [0, 3])
def test_last_layer_rows_whose_factors_fit_float32_are_kept_wherever_they_are(row):
    """x64 params, mode="last_layer": a row whose factors fit float32 though its full kernel gradient does
    not (x ~ 1e20, dL/dy ~ 1e20: 1e40 in the product) is stored, in the first rows too, which the layer_input
    check reads (review32: there it was refused, as the check's float64 reference went through float32);
    a row whose factors do not fit is refused naming its checkpoint and row in either place."""
    import jax

    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}

    def loss(p, inputs, targets):
        return ((inputs @ p["w"] + p["b"] - targets) ** 2).sum(-1)

    kw = dict(mode="last_layer", layers=["w", "b"], layer_input=lambda p, inputs: inputs, batch_size=2)
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    with jax.enable_x64(True):
        x[row] *= 1e20
        g = export_gradients(loss, [(params, 1.0)], (x, y), progress=False, **kw)
        dy = 2 * (x @ params["w"] + params["b"] - y)  # float64 dL/dy
        np.testing.assert_allclose(np.asarray(g.left[0], np.float64), dy, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(g.right[0], np.float64), np.c_[x, np.ones(4)], rtol=1e-6)
        x[row] *= 1e19
        with pytest.raises(ValueError, match=rf"^checkpoint 0: row {row} holds float64 gradient values beyond"):
            export_gradients(loss, [(params, 1.0)], (x, y), progress=False, **kw)
