"""The export loop's row bookkeeping, driven by a small NumPy framework (rows = inputs * the checkpoint's
scale): a store export of data whose length overstates or understates its rows, or that has none; a
range writer (store_rows) computing and writing only the batches of its range; the progress bar of a
resumed export ending full; and the rows handed to the host in the stored dtype when nothing
transforms them. Expectations are hand-worked or float64 NumPy."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import tracin
from interrupts import ctrl_c_when
from tests._export.test_driver import _Scaled as _DriverScaled
from tracin._export.driver import Options, batch_starts, export, store_rows
from tracin._export.sinks import StoreSink


class _Scaled(_DriverScaled):
    """test_driver's framework (rows of checkpoint {"scale": s} are s * x), also recording to_host's float32
    flag and viewing bfloat16 rows as such."""

    def __init__(self, batches: list[np.ndarray], n_rows: int | None = -1):
        super().__init__(batches, n_rows)
        self.float32: list[bool] = []

    def to_host(self, computed, count, float32):
        self.float32.append(float32)
        return super().to_host(computed, count, float32)

    @staticmethod
    def wrap(array, dtype):
        return array.view(ml_dtypes.bfloat16) if dtype == "bfloat16" else array


def _data(n: int = 10, size: int = 4) -> list[np.ndarray]:
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3) / 7
    return [x[i : i + size] for i in range(0, n, size)]  # batches at rows 0, 4, 8


CKPTS = [({"scale": 2.0}, 0.5), ({"scale": -1.0}, 0.25)]


def _options(store=None, dtype="float32") -> Options:
    return Options("full", None, dtype, store, progress=False)


def _self_influence_f64() -> np.ndarray:
    x = np.concatenate(_data()).astype(np.float64)
    return sum(lr * s["scale"] ** 2 * (x**2).sum(1) for s, lr in CKPTS)


def test_a_store_export_of_data_longer_than_its_length_is_refused(tmp_path):
    """len(data) == 9 but 10 rows come: the store's read-through refuses it (not only a length that
    overstates the rows), before any store is made."""
    with pytest.raises(ValueError, match=r"^data gave 10 rows, expected 9 \(its length\)$"):
        export(_Scaled(_data(), n_rows=9), CKPTS, _options(tmp_path / "g"), [])
    assert not (tmp_path / "g").exists()


def test_a_store_export_of_data_of_unknown_length_and_no_rows_is_refused(tmp_path):
    """Re-iterable data of unknown length yielding no rows: 'data has no rows' from the read-through,
    and no store of 0 rows is made."""
    framework = _Scaled([], n_rows=None)
    with pytest.raises(ValueError, match=r"^data has no rows$"):
        export(framework, CKPTS, _options(tmp_path / "g"), [])
    assert not (tmp_path / "g").exists() and framework.computed == []


def _range_writes(tmp_path, monkeypatch, start: int, stop: int) -> tuple[_Scaled, list[tuple[int, int, int]]]:
    path = tmp_path / "g"
    with store_rows(0, 0):  # creates the store, computes nothing
        assert export(_Scaled(_data()), CKPTS, _options(path), []) is None
    writes: list[tuple[int, int, int]] = []
    real = StoreSink.write
    monkeypatch.setattr(
        StoreSink, "write", lambda self, c, s, block: writes.append((c, s, len(block))) or real(self, c, s, block)
    )
    framework = _Scaled(_data())
    with store_rows(start, stop):
        assert export(framework, CKPTS, _options(path), []) is None
    monkeypatch.setattr(StoreSink, "write", real)
    return framework, writes


def test_a_range_writer_computes_only_the_batches_of_its_range(tmp_path, monkeypatch):
    """Rows [4, 8) are exactly batch 4: the batch starting at the range's stop (8) is not computed."""
    framework, writes = _range_writes(tmp_path, monkeypatch, 4, 8)
    assert framework.computed == [4, 4]  # once per checkpoint
    assert writes == [(0, 4, 4), (1, 4, 4)]
    store = export(_Scaled(_data()), CKPTS, _options(tmp_path / "g"), [])  # a plain export finishes the store
    assert store.complete
    np.testing.assert_allclose(tracin.self_influence(store), _self_influence_f64(), rtol=1e-5)


def test_a_range_writer_cuts_the_batches_straddling_its_edges(tmp_path, monkeypatch):
    """Rows [2, 6): batches 0 and 4 are computed whole and cut to rows 2..4 and 4..6."""
    framework, writes = _range_writes(tmp_path, monkeypatch, 2, 6)
    assert framework.computed == [0, 4, 0, 4]
    assert writes == [(0, 2, 2), (0, 4, 2), (1, 2, 2), (1, 4, 2)]
    store = export(_Scaled(_data()), CKPTS, _options(tmp_path / "g"), [])
    np.testing.assert_allclose(tracin.self_influence(store), _self_influence_f64(), rtol=1e-5)


def test_a_resumed_export_ends_its_progress_bar_full(tmp_path, monkeypatch):
    """A checkpoint whose rows are all in the store counts its rows on the bar without reading the data:
    resumed at checkpoint 1, the bar still ends at rows x checkpoints (20)."""
    import tracin._export.driver as driver

    with ctrl_c_when(StoreSink, "write", lambda c, start, block: c == 1 and start == 4):
        export(_Scaled(_data()), CKPTS, _options(tmp_path / "g"), [])
    bars = []

    class Bar:
        def __init__(self, total, *args, passes=1, **kwargs):
            self.total, self.passes, self.count = total, passes, 0
            bars.append(self)

        def update(self, n):
            self.count += n

        def close(self):
            pass

    monkeypatch.setattr(driver, "progress_bar", Bar)
    again = _Scaled(_data())
    assert export(again, CKPTS, _options(tmp_path / "g"), []).complete
    assert again.computed == [4, 8]
    loop_bar = bars[-1]  # after the read-through's
    assert (loop_bar.total, loop_bar.passes, loop_bar.count) == (10, 2, 20)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_rows_nothing_transforms_reach_the_host_in_the_stored_dtype(dtype):
    """Without transforms the adapter is not asked for float32 rows (it may hand the stored dtype: a
    smaller host copy); a transform needs float32 NumPy and asks for it."""
    framework = _Scaled(_data())
    export(framework, CKPTS, _options(dtype=dtype), [])
    assert framework.float32 == [False] * 6

    class Negated:
        key = "negated"

        def dims(self, dims):
            return dims

        def apply(self, block, checkpoint, slot):
            return -block

        def to_dict(self):
            return {"kind": "negated"}

    transformed = _Scaled(_data())
    g = export(transformed, CKPTS, _options(dtype=dtype), [Negated()])
    assert transformed.float32 == [True] * 6
    if dtype == "float32":
        np.testing.assert_allclose(g.matrices[0], -2.0 * np.concatenate(_data()).astype(np.float64), rtol=1e-6)


class _Shrinking(_Scaled):
    """Gives its batches on the first pass, then `later` on every later pass."""

    def __init__(self, batches, later):
        super().__init__(batches)
        self.first, self.later, self.passes = batches, later, 0

    def batches(self):
        self.data = self.first if self.passes == 0 else self.later
        self.passes += 1
        return super().batches()


def test_data_giving_fewer_rows_at_a_later_checkpoint_is_refused_with_the_words_on_data_read_once():
    """Rows on the first pass only (an object whose __iter__ returns the same generator): the error says why."""
    with pytest.raises(
        ValueError,
        match=r"^data gave 0 rows at checkpoint 1, expected 10; it must give the same rows for every checkpoint "
        r"\(data that can be read only once, .* is read again for each checkpoint, and once before with store=: "
        r"pass \(inputs, targets\) arrays, a Dataset or DataLoader with len\(\), or a list of batches\)$",
    ):
        export(_Shrinking(_data(), []), CKPTS, _options(), [])


def test_an_export_into_a_store_gives_its_batch_starts(tmp_path):
    """batch_starts() collects the first row of each batch of the store's reading pass (tracin.distributed
    cuts its row ranges there); an export in memory has no such pass."""
    with batch_starts() as starts:
        export(_Scaled(_data()), CKPTS, _options(tmp_path / "g"), [])
    assert starts == [0, 4, 8]
    with batch_starts() as none:
        export(_Scaled(_data()), CKPTS, _options(), [])
    assert none == []


def test_a_range_export_needs_a_store():
    framework = _Scaled(_data())
    with (
        store_rows(0, 4),
        pytest.raises(ValueError, match=r"^an export of a row range \(tracin\.distributed\) needs store="),
    ):
        export(framework, CKPTS, _options(), [])
    assert framework.computed == []


class _InPlace(_Scaled):
    """_Scaled that can also compute full float32 rows straight into a host buffer."""

    inplace_width = 3

    def __init__(self, batches):
        super().__init__(batches)
        self.into: list[int] = []

    def compute_into(self, state, batch, out):
        self.into.append(batch.start)
        out[:] = batch.x * np.float32(state)


@pytest.mark.parametrize("dtype, rtol", [("float16", 2**-11), ("bfloat16", 2**-8)])
def test_sixteen_bit_rows_are_never_computed_in_place(dtype, rtol):
    """Rows kept in 16 bits go through the sink's conversion (rounding, the range check): computed into a
    float32 buffer only for dtype='float32'."""
    framework = _InPlace(_data())
    g = export(framework, CKPTS, _options(dtype=dtype), [])
    assert framework.into == [] and framework.computed == [0, 4, 8] * 2
    x = np.concatenate(_data()).astype(np.float64)
    for m, (ckpt, _) in zip(g.matrices, CKPTS, strict=True):
        kept = np.asarray(m)
        kept = kept.view(ml_dtypes.bfloat16) if kept.dtype == np.uint16 else kept  # Gradients keep bfloat16 bits
        np.testing.assert_allclose(kept.astype(np.float64), x * ckpt["scale"], rtol=rtol, atol=1e-30)
    big = _InPlace([np.full((2, 3), 4e4, np.float32)])
    with pytest.raises(
        ValueError, match=r"^dtype='float16': row 0 of checkpoint 0 holds float32 gradient values beyond"
    ):
        export(big, CKPTS, _options(dtype="float16"), [])
    assert big.into == []
