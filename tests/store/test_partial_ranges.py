"""GradientStore.open(allow_partial=True) on a store that range writers (a distributed export) are
writing or have written, not yet merged (review272 F2): the usable prefix counts the rows their
progress files record, read only; rows recorded past it, and malformed progress files, are
warnings; the CLI's "no usable rows" error says that range writers' rows await the rows before them."""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import tracin
from tracin.cli import main

N_ROWS, DIMS, WEIGHTS = 12, [3, 2], [0.5, 2.0]


@pytest.fixture
def rows() -> list[np.ndarray]:
    """Per checkpoint the (N_ROWS, d) rows written (float32, exact in the store)."""
    rng = np.random.default_rng(7)
    return [rng.standard_normal((N_ROWS, d)).astype(np.float32) for d in DIMS]


def _create(path: Path) -> None:
    tracin.GradientStore.create(path, N_ROWS, DIMS, weights=WEIGHTS).close()


def _write_range(path: Path, rows: list[np.ndarray], start: int, stop: int, upto: list[int]) -> None:
    """A range writer of [start, stop) that writes rows [start, upto[c]) of checkpoint c, then closes."""
    with tracin.GradientStore.create(path, N_ROWS, DIMS, weights=WEIGHTS, rows=(start, stop)) as w:
        for c, end in enumerate(upto):
            if end > start:
                w.write(c, start, rows[c][start:end])


def _self_influence(rows: list[np.ndarray], n: int) -> np.ndarray:
    """float64 reference: sum over checkpoints of weight * ||g_c||^2 for rows [0, n)."""
    return sum(w * np.sum(r[:n].astype(np.float64) ** 2, axis=1) for w, r in zip(WEIGHTS, rows, strict=True))


def _open_quietly(path: Path, **kwargs) -> tracin.GradientStore:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return tracin.GradientStore.open(path, **kwargs)


def _assert_rows(store: tracin.GradientStore, rows: list[np.ndarray], n: int) -> None:
    assert store.n_rows == n
    side = store.kernel_side()
    for block, r in zip(side.blocks, rows, strict=True):
        np.testing.assert_array_equal(np.asarray(block), r[:n])
    np.testing.assert_allclose(tracin.self_influence(store), _self_influence(rows, n), rtol=1e-6)


def test_rows_of_finished_ranges_are_usable_before_the_merge(tmp_path, rows):
    path = tmp_path / "s"
    _create(path)
    _write_range(path, rows, 0, 6, [6, 6])
    _write_range(path, rows, 6, 12, [12, 12])
    store = _open_quietly(path, allow_partial=True)
    assert not store.complete
    _assert_rows(store, rows, N_ROWS)
    expected = sum(w * r[:2].astype(np.float64) @ r.astype(np.float64).T for w, r in zip(WEIGHTS, rows, strict=True))
    found = tracin.top_k(tracin.Gradients([r[:2] for r in rows], weights=WEIGHTS), store, k=3)
    np.testing.assert_array_equal(found.indices, np.argsort(-expected, axis=1, kind="stable")[:, :3])


def test_ranges_written_partly_on_two_checkpoints_give_the_prefix_written_on_both(tmp_path, rows):
    path = tmp_path / "s"
    _create(path)
    _write_range(path, rows, 0, 6, [6, 4])  # checkpoint 1 stops at row 4
    _write_range(path, rows, 6, 12, [12, 12])
    with pytest.warns(UserWarning, match=r"past the 4 usable from row 0 \(per checkpoint: 8, 6 more\)") as caught:
        store = tracin.GradientStore.open(path, allow_partial=True)
    assert "once the rows before them are written" in str(caught[0].message)
    _assert_rows(store, rows, 4)
    assert store.info()["rows_past_usable"] == [8, 6]
    assert store[1:3].info()["rows_past_usable"] == [8, 6]
    assert store.info()["rows_from_row_0"] == [12, 4] and store.info()["rows_written"] == [0, 0]


def test_a_factored_store_counts_rows_past_the_usable_ones_per_factor_pair(tmp_path):
    """review294 F3: the warning said "per checkpoint" with two counts for a store of one checkpoint of two
    layers."""
    rng = np.random.default_rng(0)
    path = tmp_path / "f"
    meta = {"framework": "numpy", "mode": "factored", "fingerprints": {"checkpoints": ["a" * 32]}}  # one checkpoint
    spec = dict(n_rows=12, dims=[(4, 3), (2, 5)], weights=[0.1, 0.1], factored=True, metadata=meta)
    tracin.GradientStore.create(path, **spec).close()
    for (start, stop), upto in (((0, 6), (6, 2)), ((6, 12), (12, 12))):
        with tracin.GradientStore.create(path, rows=(start, stop), **spec) as w:
            for slot, (end, (a, b)) in enumerate(zip(upto, spec["dims"], strict=True)):
                w.write(slot, start, tuple(rng.standard_normal((end - start, d)).astype(np.float32) for d in (a, b)))
    said = r"past the 2 usable from row 0 \(per factor pair \(2 layers per checkpoint\): 10, 6 more\)"
    with pytest.warns(UserWarning, match=said) as caught:
        store = tracin.GradientStore.open(path, allow_partial=True)
    assert "not yet written for every factor pair" in str(caught[0].message)
    assert store.n_rows == 2 and store.info()["rows_past_usable"] == [10, 6]


def test_the_prefix_ends_at_the_first_gap(tmp_path, rows):
    path = tmp_path / "s"
    _create(path)
    with tracin.GradientStore.create(path, N_ROWS, DIMS, weights=WEIGHTS) as w:  # rows 0..3 in manifest.json
        for c in range(len(DIMS)):
            w.write(c, 0, rows[c][:3])
    _write_range(path, rows, 3, 6, [6, 6])
    _write_range(path, rows, 6, 9, [6, 6])  # claimed, nothing written: the gap
    _write_range(path, rows, 9, 12, [12, 12])
    with pytest.warns(UserWarning, match=r"past the 6 usable from row 0 \(per checkpoint: 3, 3 more\)"):
        store = tracin.GradientStore.open(path, allow_partial=True)
    _assert_rows(store, rows, 6)
    # merging (a writer of the whole store) leaves the same rows usable, now from manifest.json
    tracin.GradientStore.create(path, N_ROWS, DIMS, weights=WEIGHTS).close()
    assert not list(path.glob("rows-*"))
    _assert_rows(_open_quietly(path, allow_partial=True), rows, 6)


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        json.dumps(
            {
                "format": "tracin-gradient-store-range",
                "version": 1,
                "id": "0" * 32,
                "rows": [6, 12],
                "written": [[[6, 12]], [[6, 12]]],
            }
        ),  # fmt: skip
        json.dumps({"format": "tracin-gradient-store-range", "version": 1, "rows": [6, 12], "written": [[[6, 20]]]}),
    ],
    ids=["not-json", "another-store", "bad-ranges"],
)
def test_a_malformed_progress_file_is_a_warning_and_its_range_left_out(tmp_path, rows, text):
    path = tmp_path / "s"
    _create(path)
    _write_range(path, rows, 0, 6, [6, 6])
    _write_range(path, rows, 6, 12, [12, 12])
    bad = path / "rows-6-12.json"
    bad.write_text(text)
    with pytest.warns(UserWarning, match="rows-6-12.json") as caught:
        store = tracin.GradientStore.open(path, allow_partial=True)
    assert len(caught) == 1 and "leaves out the rows rows-6-12.json records" in str(caught[0].message)
    _assert_rows(store, rows, 6)
    assert bad.read_text() == text  # read only


def test_a_store_without_range_files_is_unchanged(tmp_path, rows):
    path = tmp_path / "s"
    with tracin.GradientStore.create(path, N_ROWS, DIMS, weights=WEIGHTS) as w:
        for c in range(len(DIMS)):
            w.write(c, 0, rows[c][:5])
            w.write(c, 8, rows[c][8:10])  # out of order: not part of the prefix, no warning
    store = _open_quietly(path, allow_partial=True)
    _assert_rows(store, rows, 5)
    assert store.info()["rows_past_usable"] == [0, 0] and store.info()["rows_from_row_0"] == [5, 5]


def test_without_allow_partial_range_files_change_nothing(tmp_path, rows):
    path = tmp_path / "s"
    _create(path)
    _write_range(path, rows, 0, 6, [6, 6])
    _write_range(path, rows, 6, 12, [12, 12])
    names = sorted(p.name for p in path.iterdir())
    store = _open_quietly(path)
    assert store.n_rows == N_ROWS and store.info()["rows_past_usable"] == [0, 0]
    assert store.info()["rows_from_row_0"] == [0, 0]  # the progress files are not read
    with pytest.raises(ValueError, match=r"unfinished \(rows usable from row 0, per checkpoint: \[0, 0\] of 12\)"):
        tracin.self_influence(store)
    assert sorted(p.name for p in path.iterdir()) == names  # nothing created, removed or merged


def test_cli_says_range_writers_rows_await_the_rows_before_them(tmp_path, rows, capsys):
    path = tmp_path / "s"
    _create(path)
    _write_range(path, rows, 6, 12, [12, 9])  # nothing from row 0 on
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning's text is in the error, not shown twice
        assert main(["self-influence", str(path), "--allow-partial"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tracin self-influence: error: path: "), lines
    assert (
        f"gradient store {path} has no usable rows yet (rows written from row 0, per checkpoint: 0, 0 of 12: "
        "a row is usable once it and those before it are written for every checkpoint)" in lines[0]
    )
    assert "; range writers record 6, 3 rows per checkpoint not yet usable (let the export finish, or rerun" in lines[0]
    # finishing the missing range makes them usable
    _write_range(path, rows, 0, 6, [6, 6])
    assert main(["self-influence", str(path), "--allow-partial"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 1 + 9
    warned = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warned) == 1 and warned[0].startswith(f"tracin self-influence: warning: gradient store {path}: ")
    assert "past the 9 usable from row 0 (per checkpoint: 3, 0 more)" in warned[0]


def test_cli_shows_a_malformed_progress_file_before_the_no_usable_rows_error(tmp_path, rows, capsys):
    # review283 F1: the warning naming the corrupt file (and its remedy) was dropped with the error
    path = tmp_path / "s"
    _create(path)
    _write_range(path, rows, 0, 6, [6, 6])
    _write_range(path, rows, 6, 12, [12, 12])
    (path / "rows-0-6.json").write_text("{not json")
    for flags in (["--allow-partial"], []):
        assert main(["self-influence", str(path), *flags]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 2, lines
        assert lines[0].startswith(f"tracin self-influence: warning: {path / 'rows-0-6.json'}: corrupt progress file")
        assert "remove it to write rows [0, 6) again" in lines[0]
        assert lines[1].startswith("tracin self-influence: error: path: ") and "0, 0 of 12" in lines[1]
        said = "range writers record 6, 6 rows per checkpoint not yet usable" in lines[1]
        assert said == bool(flags)  # the warning on them is in the error, not shown


def test_cli_counts_range_writers_rows_without_allow_partial_too(tmp_path, rows, capsys):
    # review283 F5: without --allow-partial the counts were manifest.json's only ("0, 0 of 12")
    path = tmp_path / "s"
    _create(path)
    _write_range(path, rows, 0, 6, [6, 0])  # checkpoint 0 only
    assert main(["self-influence", str(path)]) == 1
    line = capsys.readouterr().err.strip()
    assert "unfinished (rows written from row 0, per checkpoint: 6, 0 of 12)" in line
    assert "--allow-partial has none to use" in line
    assert main(["self-influence", str(path), "--allow-partial"]) == 1
    line = capsys.readouterr().err.strip()
    assert "has no usable rows yet (rows written from row 0, per checkpoint: 6, 0 of 12: a row is usable" in line
    _write_range(path, rows, 0, 6, [6, 6])
    _write_range(path, rows, 6, 12, [12, 9])
    assert main(["self-influence", str(path)]) == 1
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and "(rows written from row 0, per checkpoint: 12, 9 of 12)" in line
    assert "or pass --allow-partial to use the 9 rows written so far for every checkpoint" in line
    assert main(["self-influence", str(path), "--allow-partial"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 9


def test_cli_says_a_store_written_whole_by_range_writers_needs_finalize_and_finalize_merges(tmp_path, rows, capsys):
    # review283 F5: the "never finalized" branch was never reached for rows written in range files
    path = tmp_path / "s"
    _create(path)
    _write_range(path, rows, 0, 6, [6, 6])
    _write_range(path, rows, 6, 12, [12, 12])
    assert main(["self-influence", str(path)]) == 1
    line = capsys.readouterr().err.strip()
    assert "every row is written (rows written from row 0, per checkpoint: 12, 12 of 12)" in line
    assert "never finalized; call GradientStore.create(<the same arguments>).finalize() (it merges" in line
    tracin.GradientStore.create(path, N_ROWS, DIMS, weights=WEIGHTS).finalize()  # the remedy it names
    assert main(["self-influence", str(path)]) == 0
    ranked = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(ranked) == N_ROWS and not list(path.glob("rows-*"))
    influence = {int(r["train_row"]): float(r["self_influence"]) for r in ranked}
    np.testing.assert_allclose([influence[i] for i in range(N_ROWS)], _self_influence(rows, N_ROWS), rtol=1e-6)


def test_an_unreadable_progress_file_is_a_warning_and_its_range_left_out(tmp_path, rows, monkeypatch):
    """r288: a progress file that cannot be read (an OSError, EACCES or EIO) is left out with a warning, as a
    malformed one is, not an error failing the open."""
    import tracin.store._store as store_module

    path = tmp_path / "s"
    _create(path)
    _write_range(path, rows, 0, 6, [6, 6])
    _write_range(path, rows, 6, 12, [12, 12])
    read = store_module.read_progress

    def failing(root, m, start, stop):
        if start == 6:
            raise PermissionError(13, "Permission denied", str(root / "rows-6-12.json"))
        return read(root, m, start, stop)

    monkeypatch.setattr(store_module, "read_progress", failing)
    with pytest.warns(UserWarning, match=r"Permission denied.*leaves out the rows rows-6-12\.json records"):
        store = tracin.GradientStore.open(path, allow_partial=True)
    _assert_rows(store, rows, 6)


def test_cli_says_range_writers_rows_await_the_rows_before_them_on_one_checkpoint_too(tmp_path, rows, capsys):
    """r288: rows past the usable prefix on one checkpoint alone are said in the no-usable-rows error too."""
    path = tmp_path / "s"
    _create(path)
    _write_range(path, rows, 6, 12, [12, 0])  # checkpoint 1: nothing
    assert main(["self-influence", str(path), "--allow-partial"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "has no usable rows yet" in lines[0], lines
    assert "; range writers record 6, 0 rows per checkpoint not yet usable (let the export finish" in lines[0]
