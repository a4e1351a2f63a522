"""The shared export loop, driven by a small NumPy 'framework' (rows = inputs * the checkpoint's scale),
so that resume, transforms, the in-place path and the errors are checked without torch or JAX."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pytest

import tracin
from interrupts import ctrl_c_when
from tracin._export.driver import Options, check_store, export
from tracin._export.sinks import StoreSink
from tracin._export.transforms import row_transforms


@dataclass
class _Batch:
    start: int
    count: int
    x: np.ndarray


class _Scaled:
    """Rows of checkpoint {"scale": s} are s * x (float64 reference: the same product)."""

    name = "numpy"
    params = [("w", (3,))]
    last_layer = None
    slot_dims = [3]
    segments = [3]
    fingerprints = {"loss": "scaled"}
    inplace_width = None

    def __init__(self, batches: list[np.ndarray], n_rows: int | None = -1, one_shot: bool = False):
        self.data, self.one_shot = batches, one_shot
        self.n_rows = sum(len(b) for b in batches) if n_rows == -1 else n_rows
        self.computed: list[int] = []  # start row of every batch computed
        self.into: list[int] = []  # start row of every batch computed in place
        self.checked = 0

    def batches(self):
        start = 0
        for x in self.data:
            yield _Batch(start, len(x), x)
            start += len(x)

    def fingerprint_arrays(self, batch):
        return [batch.x[:, 0]], [batch.x]

    def state_digest(self, source, index):
        return str(source["scale"])

    def load(self, source, index):
        return source["scale"]

    def check(self, state, batch):
        self.checked += 1

    def compute(self, state, batch):
        self.computed.append(batch.start)
        return batch.x * np.float32(state)

    def to_host(self, computed, count, float32):
        return [np.asarray(computed[:count], np.float32)]

    def compute_into(self, state, batch, out):
        self.into.append(batch.start)
        out[:] = batch.x * np.float32(state)

    @staticmethod
    def wrap(array, dtype):
        return array


def _data(n: int = 10, size: int = 4) -> list[np.ndarray]:
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3) / 7
    return [x[i : i + size] for i in range(0, n, size)]


CKPTS = [({"scale": 2.0}, 0.5), ({"scale": -1.0}, 0.25)]


def _options(store=None, mode="full") -> Options:
    return Options(mode, None, "float32", store, progress=False)


def test_rows_weights_and_metadata_in_memory():
    data = _data()
    g = export(_Scaled(data), CKPTS, _options(), [])
    x = np.concatenate(data).astype(np.float64)
    for m, (ckpt, _) in zip(g.matrices, CKPTS, strict=True):
        np.testing.assert_allclose(m, x * ckpt["scale"], rtol=1e-6)
    np.testing.assert_array_equal(g.weights, [0.5, 0.25])
    fp = g.metadata["fingerprints"]
    assert fp["checkpoints"] == ["2.0", "-1.0"] and fp["loss"] == "scaled" and fp["data"] is not None
    assert g.metadata["framework"] == "numpy" and g.metadata["projection"] is None


def test_transforms_are_applied_in_order_and_recorded_under_their_key():
    class Doubled:
        key = "doubling"

        def dims(self, dims):
            return 2 * dims

        def apply(self, block, checkpoint, slot):
            return np.hstack([block, -block])

        def to_dict(self):
            return {"kind": "doubling"}

    projection = tracin.Projection(4, seed=1)
    chain = [Doubled(), *row_transforms(projection, None)]
    g = export(_Scaled(_data()), CKPTS[:1], _options(), chain)
    x = np.concatenate(_data()).astype(np.float64) * 2.0
    expected = projection.apply(np.hstack([x, -x]).astype(np.float32))
    np.testing.assert_allclose(g.matrices[0], expected, rtol=1e-5, atol=1e-6)
    assert g.metadata["doubling"] == {"kind": "doubling"} and g.metadata["projection"] == projection.to_dict()


def test_in_place_rows_are_used_only_without_transforms():
    framework = _Scaled(_data())
    framework.inplace_width = 3
    g = export(framework, CKPTS, _options(), [])
    assert framework.into == [0, 4, 8] * 2 and framework.computed == []
    np.testing.assert_allclose(g.matrices[1], np.concatenate(_data()) * -1.0, rtol=1e-6)
    projected = _Scaled(_data())
    projected.inplace_width = 3
    export(projected, CKPTS, _options(), row_transforms(tracin.Projection(2), [3]))
    assert projected.into == [] and projected.computed == [0, 4, 8] * 2


def test_resume_writes_only_the_missing_rows_of_a_partly_written_batch(tmp_path, monkeypatch):
    path = tmp_path / "g"
    real_write = StoreSink.write

    def torn(self, c, start, block):  # killed half-way through checkpoint 1's second batch
        if c == 1 and start == 4:
            real_write(self, c, start, block[:2])
            raise KeyboardInterrupt
        real_write(self, c, start, block)

    monkeypatch.setattr(StoreSink, "write", torn)
    with pytest.raises(KeyboardInterrupt):
        export(_Scaled(_data()), CKPTS, _options(path), [])
    writes = []
    monkeypatch.setattr(
        StoreSink,
        "write",
        lambda self, c, start, block: writes.append((c, start, len(block))) or real_write(self, c, start, block),
    )
    again = _Scaled(_data())  # batches at rows 0, 4, 8
    store = export(again, CKPTS, _options(path), [])
    assert again.computed == [4, 8]  # checkpoint 0 and rows 0..6 of checkpoint 1 are done
    assert writes == [(1, 6, 2), (1, 8, 2)]
    x = np.concatenate(_data()).astype(np.float64)
    np.testing.assert_allclose(tracin.self_influence(store), 0.5 * 4 * (x**2).sum(1) + 0.25 * (x**2).sum(1), rtol=1e-5)


def test_a_finished_store_computes_nothing(tmp_path):
    export(_Scaled(_data()), CKPTS, _options(tmp_path / "g"), [])
    again = _Scaled(_data())
    assert export(again, CKPTS, _options(tmp_path / "g"), []).complete
    assert again.computed == [] and again.checked == 0


def test_the_users_functions_are_checked_once():
    framework = _Scaled(_data())
    export(framework, CKPTS, _options(), [])
    assert framework.checked == 1


@pytest.mark.parametrize(
    "framework, error, message",
    [
        (_Scaled([], n_rows=0), ValueError, "data has no rows"),
        (_Scaled([], n_rows=None), ValueError, "data has no rows"),
        (
            _Scaled(_data(), n_rows=None, one_shot=True),
            ValueError,
            r"one-shot iterator, but it is read once per "
            r"checkpoint \(2 checkpoints\)",
        ),
        (
            _Scaled(_data(), n_rows=11),
            ValueError,
            r"data gave 10 rows at checkpoint 0, but its length \(len\) was 11: len\(data\) must count the rows",
        ),
    ],
)
def test_data_mistakes(framework, error, message):
    with pytest.raises(error, match=message):
        export(framework, CKPTS, _options(), [])


def test_a_missing_checkpoint_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoints\[1\]: no checkpoint at .*nope"):
        export(_Scaled(_data()), [CKPTS[0], (str(tmp_path / "nope"), 1.0)], _options(), [])


def test_a_store_needs_the_row_count_and_is_closed_on_error(tmp_path):
    """A store counts the rows of re-iterable data in its read-through (one pass fewer than counting
    them first); one-shot data of unknown length is refused, in the adapter's words when it has them."""
    counted = export(_Scaled(_data(), n_rows=None), CKPTS, _options(tmp_path / "f"), [])
    known = export(_Scaled(_data()), CKPTS, _options(tmp_path / "e"), [])
    assert counted.n_rows == known.n_rows == 10
    np.testing.assert_array_equal(tracin.self_influence(counted), tracin.self_influence(known))
    with pytest.raises(ValueError, match=r"store= needs the number of examples .* a Dataset or DataLoader"):
        export(_Scaled(_data(), n_rows=None, one_shot=True), CKPTS[:1], _options(tmp_path / "g"), [])
    worded = _Scaled(_data(), n_rows=None, one_shot=True)
    worded.countable_data = "arrays"
    with pytest.raises(ValueError, match=r"cannot be known for this data: pass arrays$"):
        export(worded, CKPTS[:1], _options(tmp_path / "g"), [])
    failing = _Scaled(_data())
    failing.compute = lambda state, batch: 1 / 0
    with pytest.raises(ZeroDivisionError):
        export(failing, CKPTS, _options(tmp_path / "h"), [])
    # the lock was released: the same export resumes at once
    assert export(_Scaled(_data()), CKPTS, _options(tmp_path / "h"), []).complete


def test_resuming_with_another_fingerprint_names_what_changed(tmp_path):
    export(_Scaled(_data()), CKPTS, _options(tmp_path / "g"), [])
    other_loss = _Scaled(_data())
    other_loss.fingerprints = {"loss": "squared"}
    with pytest.raises(ValueError, match=r"other inputs: the loss function differs \(scaled there, squared here\)"):
        export(other_loss, CKPTS, _options(tmp_path / "g"), [])
    with pytest.raises(ValueError, match=r"checkpoints\[1\] differs"):
        export(_Scaled(_data()), [CKPTS[0], ({"scale": 3.0}, 0.25)], _options(tmp_path / "g"), [])
    with pytest.raises(ValueError, match="the data .* differ"):
        export(_Scaled([b + 1 for b in _data()]), CKPTS, _options(tmp_path / "g"), [])
    with pytest.raises(ValueError, match=r"the data .* differ, or the batch size does .* resume with the batch_size"):
        export(_Scaled(_data(size=5)), CKPTS, _options(tmp_path / "g"), [])  # the same rows, batched otherwise


def test_resuming_with_other_settings_names_them(tmp_path):
    """Another dtype (or mode, projection...) for an existing store: named, with advice an export can follow."""
    export(_Scaled(_data()), CKPTS, _options(tmp_path / "g"), [])
    with pytest.raises(
        ValueError,
        match=r"g holds gradients exported with other settings: dtype 'float32' there vs 'bfloat16' here\. Rows "
        r"from both cannot be mixed: export into another directory, or delete this one$",
    ):
        export(_Scaled(_data()), CKPTS, Options("full", None, "bfloat16", tmp_path / "g", progress=False), [])


def test_resuming_with_other_parameters_says_so_before_the_checkpoint_digests(tmp_path):
    """A newer version differentiating one more leaf changes the columns and the checkpoint digests (which
    cover that leaf): the message names the parameters, not 'checkpoints[0] differs'."""
    export(_Scaled(_data()), CKPTS, _options(tmp_path / "g"), [])

    class _MoreLeaves(_Scaled):
        params = [("w", (3,)), ("drop/p", ())]
        slot_dims, segments = [4], [3, 1]

        def state_digest(self, source, index):
            return f"{source['scale']} with p"

    with pytest.raises(
        ValueError,
        match=r"g holds gradients of other parameters than this export's: only here: 'drop/p' \(3 columns there, "
        r"4 here\); another model or layers=, or a tracin version that differentiates other leaves\. Rows",
    ):
        export(_MoreLeaves(_data()), CKPTS, _options(tmp_path / "g"), [])

    class _Wider(_Scaled):
        params = [("w", (5,))]

    with pytest.raises(ValueError, match=r"other parameters than this export's: 'w' \[3\] there, \[5\] here \(3 col"):
        export(_Wider(_data()), CKPTS, _options(tmp_path / "g"), [])


def test_checkpoint_sources_say_how_each_digest_was_made(tmp_path):
    np.save(tmp_path / "scale.npy", np.float32(3.0))

    class _Renamed(_Scaled):
        def load(self, source, index):
            return float(np.load(source)) if isinstance(source, str) else source["scale"]

    g = export(_Renamed(_data()), [CKPTS[0], (str(tmp_path / "scale.npy"), 1.0)], _options(), [])
    assert g.metadata["checkpoint_sources"] == ["state", "file"]
    assert g.metadata["fingerprints"]["checkpoints"][0] == "2.0"
    np.testing.assert_allclose(g.matrices[1], np.concatenate(_data()) * 3.0, rtol=1e-6)


def test_a_store_exported_before_checkpoint_sources_resumes_and_is_returned_without_them(tmp_path):
    path = tmp_path / "g"
    with ctrl_c_when(StoreSink, "write", lambda c, start, block: c == 1):
        export(_Scaled(_data()), CKPTS, _options(path), [])
    manifest = path / "manifest.json"
    doc = json.loads(manifest.read_text())
    del doc["metadata"]["checkpoint_sources"]  # as an older version wrote it
    manifest.write_text(json.dumps(doc))
    again = _Scaled(_data())
    store = export(again, CKPTS, _options(path), [])
    assert again.computed == [0, 4, 8] and store.complete  # checkpoint 1 only
    assert "checkpoint_sources" not in store.metadata
    assert store.metadata["fingerprints"]["checkpoints"] == ["2.0", "-1.0"]
    assert export(_Scaled(_data()), CKPTS, _options(path), []).complete
    fresh = export(_Scaled(_data()), CKPTS, _options(tmp_path / "new"), [])
    assert fresh.metadata["checkpoint_sources"] == ["state", "state"]


class _Files(_Scaled):
    """_Scaled that also reads a checkpoint's scale from a .npy file."""

    def load(self, source, index):
        return float(np.load(source)) if isinstance(source, str) else source["scale"]


class _Renamed(_Files):
    """A framework whose digests of in-memory checkpoints changed: older versions made 'old <scale>'."""

    def __init__(self, batches):
        super().__init__(batches)
        self.legacy: list[int] = []  # checkpoints whose legacy digest was asked for

    def legacy_state_digest(self, source, index):
        self.legacy.append(index)
        return f"old {source['scale']}"


def _as_older_versions_wrote(path, digests: list[str], sources: bool = False) -> None:
    manifest = path / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["metadata"]["fingerprints"]["checkpoints"] = digests
    if not sources:
        doc["metadata"].pop("checkpoint_sources", None)
    manifest.write_text(json.dumps(doc))


def test_an_older_store_holding_legacy_digests_of_in_memory_checkpoints_resumes(tmp_path):
    np.save(tmp_path / "scale.npy", np.float32(-1.0))
    checkpoints = [CKPTS[0], (str(tmp_path / "scale.npy"), 0.25)]
    path = tmp_path / "g"
    with ctrl_c_when(StoreSink, "write", lambda c, start, block: c == 1):
        export(_Renamed(_data()), checkpoints, _options(path), [])
    file_digest = json.loads((path / "manifest.json").read_text())["metadata"]["fingerprints"]["checkpoints"][1]
    _as_older_versions_wrote(path, ["old 2.0", file_digest], sources=True)
    with pytest.raises(ValueError, match=r"other inputs: checkpoints\[0\] differs\. "):
        export(_Renamed(_data()), checkpoints, _options(path), [])  # legacy digests only without the record
    _as_older_versions_wrote(path, ["old 2.0", file_digest])
    with pytest.raises(ValueError, match=r"other inputs: checkpoints\[0\] differs\. "):
        export(_Files(_data()), checkpoints, _options(path), [])  # an adapter without legacy digests (JAX)
    other = _Renamed(_data())
    with pytest.raises(ValueError, match=r"other inputs: checkpoints\[0\] differs\. "):
        export(other, [({"scale": 3.0}, 0.5), checkpoints[1]], _options(path), [])
    assert other.legacy == [0]
    again = _Renamed(_data())
    store = export(again, checkpoints, _options(path), [])
    assert store.complete and again.computed == [0, 4, 8] and again.legacy == [0]
    assert "checkpoint_sources" not in store.metadata
    assert store.metadata["fingerprints"]["checkpoints"] == ["old 2.0", file_digest]
    x = np.concatenate(_data()).astype(np.float64)
    np.testing.assert_allclose(tracin.self_influence(store), (0.5 * 4 + 0.25) * (x**2).sum(1), rtol=1e-5)
    returned = _Renamed(_data())
    assert export(returned, checkpoints, _options(path), []).complete and returned.computed == []
    _as_older_versions_wrote(path, ["2.0", "another file's digest"])
    with pytest.raises(ValueError, match=r"other inputs: checkpoints\[1\] differs\. "):
        export(_Renamed(_data()), checkpoints, _options(path), [])  # files: their bytes, no legacy digest
    fresh = _Renamed(_data())
    assert export(fresh, checkpoints, _options(tmp_path / "new"), []).metadata["checkpoint_sources"] == [
        "state",
        "file",
    ]
    assert fresh.legacy == []


class _Slots(_Scaled):
    """_Scaled with three sink slots per checkpoint: the rows times 1, 2 and 3."""

    slot_dims = [3, 3, 3]

    def to_host(self, computed, count, float32):
        return [np.asarray(computed[:count] * k, np.float32) for k in (1, 2, 3)]


def test_a_store_records_each_batch_once_for_all_its_slots(tmp_path, monkeypatch):
    import tracin.store._writer as writer

    records = []
    real = writer.write_json_atomic
    monkeypatch.setattr(writer, "write_json_atomic", lambda path, doc: records.append(path.name) or real(path, doc))
    store = export(_Slots(_data()), CKPTS, _options(tmp_path / "g"), [])
    assert records == ["manifest.json"] * (3 * 2 + 1)  # 3 batches x 2 checkpoints, then finalize
    x = np.concatenate(_data()).astype(np.float64)
    exact = sum(w * s * s * k * k * (x**2).sum(1) for s, w in ((2.0, 0.5), (-1.0, 0.25)) for k in (1, 2, 3))
    np.testing.assert_allclose(tracin.self_influence(store), exact, rtol=1e-5)


def test_an_empty_store_path_is_refused_naming_store():
    """store="" would be the current folder: refused before any work, naming the argument (as the
    adapters call check_store first)."""
    with pytest.raises(ValueError, match=r"^store must name a gradient store folder, got ''"):
        check_store("")
    check_store(None)


class _Changed(_Files):
    """_Files whose checkpoint 1 is changed by `change` after the export fingerprinted it, just before it
    is loaded (a training job still saving it, a re-save); a folder's scale is its scale.npy."""

    def __init__(self, batches, change):
        super().__init__(batches)
        self.change = change

    def load(self, source, index):
        if index == 1:
            self.change()
        if isinstance(source, str) and os.path.isdir(source):
            source = os.path.join(source, "scale.npy")
        return super().load(source, index)


def _rewrite_in_place(path) -> None:
    """The same number of bytes written over the file (same inode), its modification time moved on."""
    before = os.stat(path)
    np.save(path, np.float32(5.0))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))


def _replace(path) -> None:
    np.save(str(path) + ".new.npy", np.float32(5.0))
    os.replace(str(path) + ".new.npy", path)


@pytest.mark.parametrize("change", [_rewrite_in_place, _replace])
@pytest.mark.parametrize("store", [False, True])
def test_a_checkpoint_file_changed_after_its_fingerprint_is_refused_before_any_of_its_rows(tmp_path, change, store):
    """Rows of the new file under the old file's fingerprint would be taken as the old file's rows later."""
    path = tmp_path / "scale.npy"
    np.save(path, np.float32(-1.0))
    framework = _Changed(_data(), lambda: change(path))
    with pytest.raises(ValueError, match=r"^checkpoints\[1\] \(.*scale\.npy\) changed while it was exported \(its"):
        export(framework, [CKPTS[0], (str(path), 0.25)], _options(tmp_path / "g" if store else None), [])
    assert framework.computed == [0, 4, 8]  # checkpoint 0's batches only


def test_a_checkpoint_folder_whose_files_changed_after_its_fingerprint_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    np.save(folder / "scale.npy", np.float32(-1.0))
    checkpoints = [CKPTS[0], (str(folder), 0.25)]
    with pytest.raises(ValueError, match=r"^checkpoints\[1\] \(.*ckpt\): .*ckpt/scale\.npy changed while it was"):
        export(_Changed(_data(), lambda: _replace(folder / "scale.npy")), checkpoints, _options(), [])
    with pytest.raises(ValueError, match=r"^checkpoints\[1\] \(.*ckpt\): the files it holds changed while it was"):
        export(_Changed(_data(), lambda: (folder / "notes.txt").write_text("x")), checkpoints, _options(), [])
    g = export(_Changed(_data(), lambda: None), checkpoints, _options(), [])  # read, not changed: no error
    np.testing.assert_allclose(g.matrices[1], np.concatenate(_data()) * 5.0, rtol=1e-6)


def test_a_pretrained_folder_that_gains_the_weights_file_a_loader_prefers_is_refused(tmp_path):
    """review309: model.safetensors written beside pytorch_model.bin while the export runs is what a loader
    reads now, though the fingerprint is of pytorch_model.bin (unchanged, and as many files as before)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    np.save(folder / "scale.npy", np.float32(-1.0))
    (folder / "pytorch_model.bin").write_bytes(b"weights")
    checkpoints = [CKPTS[0], (str(folder), 0.25)]
    with pytest.raises(ValueError, match=r"^checkpoints\[1\] \(.*ckpt\): the files it holds changed while it was"):
        export(
            _Changed(_data(), lambda: (folder / "model.safetensors").write_bytes(b"other")), checkpoints, _options(), []
        )


class _Loads(_Scaled):
    """_Scaled recording the index of every checkpoint loaded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loaded: list[int] = []

    def load(self, source, index):
        self.loaded.append(index)
        return super().load(source, index)


def test_a_resume_does_not_load_the_checkpoints_already_written(tmp_path, monkeypatch):
    """A checkpoint whose rows are all in the store is skipped whole: not loaded, its data not read again."""
    real_write = StoreSink.write

    def killed(self, c, start, block):  # killed at checkpoint 1's second batch
        if c == 1 and start == 4:
            raise KeyboardInterrupt
        real_write(self, c, start, block)

    monkeypatch.setattr(StoreSink, "write", killed)
    with pytest.raises(KeyboardInterrupt):
        export(_Scaled(_data()), CKPTS, _options(tmp_path / "g"), [])
    monkeypatch.setattr(StoreSink, "write", real_write)
    again = _Loads(_data())
    assert export(again, CKPTS, _options(tmp_path / "g"), []).complete
    assert again.loaded == [1] and again.computed == [4, 8]


def test_a_store_export_of_data_whose_length_is_not_its_row_count_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"data gave 10 rows, expected 11 \(its length\)"):
        export(_Scaled(_data(), n_rows=11), CKPTS, _options(tmp_path / "g"), [])


def test_data_of_unknown_length_ends_its_bar_full_on_the_last_checkpoint(monkeypatch):
    """The row count learnt on the first pass makes a new bar for the later ones, started at the rows of
    the passes done: the last pass ends it at rows x checkpoints."""
    import tracin._export.driver as driver

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
    checkpoints = [*CKPTS, ({"scale": 3.0}, 1.0)]
    export(_Scaled(_data(), n_rows=None), checkpoints, _options(), [])
    assert [(b.total, b.passes) for b in bars] == [(None, 3), (10, 3)]
    assert bars[-1].count == 30


def test_a_resumed_batchs_non_finite_projection_is_named_by_its_data_row(tmp_path, monkeypatch):
    """A transform's NonFiniteRowError names a row of the block it was given; in a batch trimmed at the resume
    point that block starts past the batch's first row, and the error names the data's row."""
    from tracin.projection import NonFiniteRowError

    class Refusing:  # refuses data row 7 (x[7, 0] * 2.0 == 6.0 at checkpoint 0) once armed
        key = "refusing"
        armed = False

        def dims(self, dims):
            return dims

        def apply(self, block, checkpoint, slot):
            bad = np.flatnonzero(np.isclose(block[:, 0], 6.0))
            if self.armed and bad.size:
                raise NonFiniteRowError("the projection of row {} is not finite", int(bad[0]))
            return block

        def to_dict(self):
            return {"kind": "refusing"}

    real_write = StoreSink.write

    def torn(self, c, start, block):  # killed half-way through checkpoint 0's second batch (rows 4..7)
        if c == 0 and start == 4:
            real_write(self, c, start, block[:2])
            raise KeyboardInterrupt
        real_write(self, c, start, block)

    monkeypatch.setattr(StoreSink, "write", torn)
    with pytest.raises(KeyboardInterrupt):
        export(_Scaled(_data()), CKPTS, _options(tmp_path / "g"), [Refusing()])
    monkeypatch.setattr(StoreSink, "write", real_write)
    refusing = Refusing()
    refusing.armed = True
    with pytest.raises(ValueError, match=r"^checkpoint 0: the projection of row 7 is not finite$"):
        export(_Scaled(_data()), CKPTS, _options(tmp_path / "g"), [refusing])


def test_a_recorded_step_gives_its_own_widths_and_passes_rows_unchanged():
    """transforms.Recorded (a step the adapter took already) maps any width to the width it recorded."""
    from tracin._export.transforms import Recorded, apply_all, chained_dims

    steps = [Recorded("preconditioner", {"kind": "adam"}, 64), Recorded("projection", {"dim": 8}, 8)]
    assert chained_dims(steps, 1000) == 8 and steps[1].to_dict() == {"dim": 8}
    block = np.ones((2, 8), np.float32)
    assert apply_all(steps, block, 0, 0) is block
