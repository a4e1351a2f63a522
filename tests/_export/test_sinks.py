"""Sinks: in memory and GradientStore, the same dtype conversion and range check."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

import tracin
from tracin._export.sinks import MemorySink, StoreSink


@pytest.mark.parametrize("n_rows", [None, 5])
def test_memory_sink_puts_blocks_at_their_rows(n_rows):
    sink = MemorySink(n_rows, 1, "float32", True, [1.0])
    sink.write(0, 3, (np.full((2, 2), 2.0, np.float32), np.full((2, 1), 4.0, np.float32)))
    sink.write(0, 0, (np.full((3, 2), 1.0, np.float32), np.full((3, 1), 3.0, np.float32)))
    g = sink.finish({"mode": "last_layer"})
    np.testing.assert_array_equal(g.left[0][:, 0], [1, 1, 1, 2, 2])
    np.testing.assert_array_equal(g.right[0][:, 0], [3, 3, 3, 4, 4])
    assert g.metadata == {"mode": "last_layer"}


@pytest.mark.parametrize("factored", [False, True])
def test_memory_sink_puts_blocks_written_out_of_order_at_their_start_rows(factored):
    """Random rows in blocks written out of order, the first at a later row: each lands at its start (in a 5-row
    sink, a block written at row 0 instead left np.empty leftovers that could hold the right values)."""
    rng = np.random.default_rng(0)
    left, right = rng.normal(size=(600, 3)).astype(np.float32), rng.normal(size=(600, 4)).astype(np.float32)
    sink = MemorySink(600, 1, "float32", factored, [1.0])
    for start, stop in ((400, 550), (100, 250), (550, 600), (0, 100), (250, 400)):
        sink.write(0, start, (left[start:stop], right[start:stop]) if factored else right[start:stop])
    g = sink.finish({})
    np.testing.assert_array_equal(g.right[0] if factored else g.matrices[0], right)
    if factored:
        np.testing.assert_array_equal(g.left[0], left)


def test_memory_sink_destination_is_its_rows_of_the_checkpoint():
    """What is computed in place into destination(c, start, rows, width) is rows [start, start + rows)."""
    sink = MemorySink(6, 1, "float32", False, [1.0])
    for start, stop in ((2, 6), (0, 2)):
        sink.destination(0, start, stop - start, 3)[:] = np.arange(3 * start, 3 * stop).reshape(-1, 3)
    assert sink.destination(0, 0, 2, 5) is None  # another width: not this checkpoint's rows
    np.testing.assert_array_equal(sink.finish({}).matrices[0], np.arange(18).reshape(6, 3))


_CUTOFFS = {"float16": "65520 rounds beyond 65504", "bfloat16": "3.3961775e+38 rounds beyond 3.3895314e+38"}


@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize(
    "dtype, big, wider", [("float16", 7e4, "'float32' or dtype='bfloat16'"), ("bfloat16", 3.4e38, "'float32'")]
)
def test_both_sinks_refuse_values_beyond_the_stored_range(tmp_path, dtype, big, wider, factored):
    """In the export's words: dtype=, the checkpoint, the first such row of the data (the block's row 2
    written at row 5) and the dtypes that hold it (was: 'block holds ... store them as float32 (or
    bfloat16 instead of float16)', even for bfloat16); the store's adds that its directory keeps the dtype."""
    x = np.ones((4, 2), np.float32)
    x[2, 1] = x[3, 0] = big
    block = (np.ones((4, 1), np.float32), x) if factored else x
    dims = [(1, 2)] if factored else [2]
    memory = MemorySink(9, 2, dtype, factored, [1.0, 1.0])
    store = StoreSink(tmp_path / "g", 9, dims * 2, dtype, factored, [1.0, 1.0], {})
    errors = []
    for sink in (memory, store):
        with pytest.raises(ValueError) as e:
            sink.write(1, 5, block)
        errors.append(str(e.value))
    expected = (
        f"dtype='{dtype}': row 7 of checkpoint 1 holds float32 gradient values beyond the {dtype} range "
        f"(|x| >= {_CUTOFFS[dtype]}), the first such row; "
        f"export with dtype={wider}"
    )
    assert errors[0] == expected
    assert errors[1] == (
        f"{expected}; the store begun in {tmp_path / 'g'} keeps dtype='{dtype}' (a resume must use it): "
        "export into another directory, or delete this one"
    )
    assert store.rows_done(1) == 0
    store.close()


def test_overflow_in_a_factored_export_names_the_checkpoint_and_factor_pair(tmp_path):
    """A factored export has one sink slot per layer (slot = checkpoint * layers + layer): slot 3 of
    2 layers per checkpoint is checkpoint 1's factor pair 1, not 'checkpoint 3'."""
    right = np.ones((3, 2), np.float32)
    right[1, 0] = 1e5
    block = (np.ones((3, 1), np.float32), right)
    memory = MemorySink(3, 4, "float16", True, [1.0] * 4, slots=2)
    store = StoreSink(tmp_path / "g", 3, [(1, 2), (1, 2)] * 2, "float16", True, [1.0] * 4, {}, slots=2)
    for sink in (memory, store):
        with pytest.raises(ValueError, match=r"^dtype='float16': row 1 of checkpoint 1 \(factor pair 1\) holds"):
            sink.write(3, 0, block)
    store.close()


def test_memory_sink_keeps_the_stored_dtype_and_values():
    sink = MemorySink(2, 1, "float16", False, [0.5])
    sink.write(0, 0, np.array([[1.0, 2.5], [-3.0, 65504.0]], np.float32))
    g = sink.finish({})
    assert g.matrices[0].dtype == np.float16
    np.testing.assert_array_equal(g.matrices[0], [[1.0, 2.5], [-3.0, 65504.0]])


def test_closing_a_store_sink_lets_a_new_writer_resume(tmp_path):
    sink = StoreSink(tmp_path / "g", 2, [1], "float32", False, [1.0], {"k": 1})
    sink.write(0, 0, np.ones((1, 1), np.float32))
    sink.close()
    again = StoreSink(tmp_path / "g", 2, [1], "float32", False, [1.0], {"k": 1})
    assert again.rows_done(0) == 1
    again.write(0, 1, np.full((1, 1), 2.0, np.float32))
    store = again.finish()
    assert isinstance(store, tracin.GradientStore)
    np.testing.assert_array_equal(tracin.self_influence(store), [1.0, 4.0])  # rows 1 and 2, squared


def test_a_store_needs_the_row_count(tmp_path):
    with pytest.raises(ValueError, match="store= needs the number of examples up front"):
        StoreSink(tmp_path / "g", None, [1], "float32", False, [1.0], {})


def test_a_store_sink_records_a_batch_once(tmp_path):
    sink = StoreSink(tmp_path / "g", 4, [1, 2], "float32", False, [1.0, 1.0], {})
    manifest = tmp_path / "g" / "manifest.json"
    before = os.stat(manifest).st_ino
    with sink.batch():
        sink.write(0, 0, np.ones((4, 1), np.float32))
        sink.write(1, 0, np.full((4, 2), 2.0, np.float32))
        assert os.stat(manifest).st_ino == before and sink.rows_done(0) == 0  # recorded on leaving only
    assert [sink.rows_done(0), sink.rows_done(1)] == [4, 4]
    np.testing.assert_array_equal(tracin.self_influence(sink.finish()), [9.0] * 4)


def test_a_memory_sink_batch_is_plain_writes():
    sink = MemorySink(2, 1, "float32", False, [1.0])
    with sink.batch():
        sink.write(0, 0, np.ones((2, 1), np.float32))
    np.testing.assert_array_equal(sink.finish({}).matrices[0], [[1.0], [1.0]])


def _refusal(tmp_path, **kw) -> str:
    with pytest.raises(ValueError) as e:
        StoreSink(tmp_path / "g", 2, [1], "float32", False, kw.pop("weights", [1.0]), {}, **kw)
    return str(e.value)


def test_a_store_sink_never_advises_an_overwrite_the_export_does_not_take(tmp_path):
    StoreSink(tmp_path / "g", 2, [1], "float32", False, [0.5], {}).close()
    for message in (_refusal(tmp_path), _refusal(tmp_path, rows=(0, 1))):  # other weights
        assert "weights [0.5] there vs [1.0] here" in message
        assert message.endswith("; export into another directory, or delete this one")
        assert "overwrite" not in message
    with open(tmp_path / "g" / "checkpoint_000.npy", "r+b") as f:  # an unfinished store, damaged
        f.truncate(100)
    message = _refusal(tmp_path, weights=[0.5])
    assert "checkpoint_000.npy: corrupt .npy header" in message
    assert message.endswith("export into another directory, or delete this one")
    (tmp_path / "g" / "manifest.json").unlink()  # files named like a store's, no manifest
    message = _refusal(tmp_path, weights=[0.5])
    assert "so it is not a store tracin wrote: export into another directory, or delete this one" in message
    assert "overwrite" not in message


@pytest.mark.parametrize("factored", [False, True])
def test_a_float16_export_warns_once_of_rows_left_below_its_normal_range(tmp_path, factored):
    """review94 F1: float16 turned rows of gradients below 2**-14 (a loss near 0) into subnormals or zeros
    without a word. Each sink warns once, at its first such block (in memory: dtype=, the rows of the data,
    the checkpoint and factor pair, how many became zero, what to export instead; a store: its writer's
    words: review100 F4), however many blocks follow; rows of normal size are silent."""
    import warnings

    tiny = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32) * 1e-6
    tiny[1] = [2e-8, -1e-8, 0.0]  # becomes all zero in float16
    tiny[3] = 1.0  # normal
    ones = np.ones((4, 2), np.float32)
    block = (ones, tiny) if factored else tiny
    dims = [(2, 3)] * 4 if factored else [3] * 4
    memory = MemorySink(9, 4, "float16", factored, [1.0] * 4, slots=2)
    store = StoreSink(tmp_path / "g", 9, dims, "float16", factored, [1.0] * 4, {}, slots=2)
    part = "the right factors" if factored else "the gradients"
    words = [
        rf"^dtype='float16': 3 of the 4 rows of {part} \(rows 5 to 8 of checkpoint 1 \(factor pair 1\)\) hold only "
        r"values below float16's smallest normal number, 6.1e-05, .*; 1 of them became all zero \(it scores 0\); "
        r"export such gradients with dtype='bfloat16' \(nearly float32's range, up to 3\.39e38, in 16 bits\) or "
        r"dtype='float32'; this "
        r"export warns once and does not check later rows$",
        rf"^dtype='float16': 3 of the 4 rows of {part} \(rows 5 to 8 of checkpoint 1 \(factor pair 1\)\) hold only "
        r"values below float16's smallest normal number, 6.1e-05, .*; 1 of them became all zero \(it scores 0\); "
        r"export such gradients with dtype='bfloat16' \(nearly float32's range, up to 3\.39e38, in 16 bits\) or "
        r"dtype='float32', into "
        rf"another directory \(the store begun in {re.escape(os.fspath(tmp_path / 'g'))} keeps dtype='float16'\); "
        r"this export warns once and does not check later rows$",
    ]
    for sink, message in zip((memory, store), words, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sink.write(0, 0, (ones, ones[:, :1].repeat(3, 1)) if factored else ones[:, :1].repeat(3, 1))
        with pytest.warns(RuntimeWarning, match=message) as caught:
            sink.write(3, 5, block)
        assert len(caught) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sink.write(2, 5, block)
            sink.write(1, 0, block)
    store.close()


def test_a_float16_export_into_a_store_warns_once_in_its_own_words(tmp_path):
    """review100 F4: export_gradients(store=..., dtype="float16") warned in the store writer's words ("this writer
    warns once", "in a new store", rows of a block): one warning for the whole export (2 checkpoints, 4 batches),
    naming dtype=, the rows of the data and the checkpoint, pointing at the caller's line."""
    torch = pytest.importorskip("torch")
    import warnings

    from tracin.torch import export_gradients

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.arange(8) % 2

    def tiny_loss(out, target):  # gradients ~1e-7: below float16's normal range
        return torch.nn.functional.cross_entropy(out, target, reduction="none") * 1e-7

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    state = model.state_dict()  # one object: two views of the live weights would be refused (review115 F1)
    checkpoints = [(state, 1.0), (state, 0.5)]
    store = tmp_path / "g"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_gradients(model, checkpoints, data, tiny_loss, dtype="float16", store=store, progress=False)
    low = [w for w in caught if "float16's smallest normal number" in str(w.message)]
    assert len(low) == 1, [str(w.message) for w in caught]
    text = str(low[0].message)
    assert re.match(r"dtype='float16': 2 of the 2 rows of the gradients \(rows 0 to 1 of checkpoint 0\) ", text), text
    assert text.endswith(
        "export such gradients with dtype='bfloat16' (nearly float32's range, up to 3.39e38, in 16 bits) or "
        f"dtype='float32', into another "
        f"directory (the store begun in {os.fspath(store)} keeps dtype='float16'); this export warns once and does "
        "not check later rows"
    ), text
    assert "writer" not in text and "block" not in text and "new store" not in text, text
    assert issubclass(low[0].category, RuntimeWarning) and low[0].filename == __file__
    stored = tracin.store.GradientStore.open(store)  # the rows are kept (a warning, not a refusal)
    assert stored.n_rows == 8


def test_a_full_disk_during_a_write_in_a_batch_says_once_that_a_rerun_resumes(tmp_path, monkeypatch):
    """The write's and the batch's handlers both see the OSError: the advice is added once (r297 M38: twice)."""
    import errno

    sink = StoreSink(tmp_path / "g", 4, [1], "float32", False, [1.0], {})

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "g" / "data.npy"))

    monkeypatch.setattr(sink._writer, "write", full)
    with pytest.raises(OSError) as err:
        with sink.batch():
            sink.write(0, 0, np.ones((4, 1), np.float32))
    sink.close()
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "g" / "data.npy")
    assert str(err.value).count("rerun the same export call, which resumes where it stopped") == 1
