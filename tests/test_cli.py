"""The tracin command line: subcommands on real stores, errors and exit codes, the self-benchmark,
and the progress bars it shows."""

from __future__ import annotations

import argparse
import csv
import errno
import importlib.metadata
import inspect
import io
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

import tracin
from reference import exact_scores
from tracin import _progress, selfbench
from tracin.cli import PAIRS_HEADER, build_parser, main

CHECKOUT = Path(__file__).resolve().parents[1]


def _write_store(path, mats, weights, rows=None, ids=None):
    """A store of `mats` (one (n, d) per checkpoint); only the first `rows` rows written (unfinished) if given."""
    n = len(mats[0])
    w = tracin.GradientStore.create(path, n, [m.shape[1] for m in mats], weights=weights, ids=ids)
    for c, m in enumerate(mats):
        w.write(c, 0, m[: n if rows is None else rows])
    if rows is None:
        w.finalize()
    return path


@pytest.fixture
def signals_as_in_a_terminal():
    """SIGINT raises KeyboardInterrupt, SIGTERM and SIGHUP kill, as in an interactive shell, also where
    pytest started with them ignored (`pytest &` from a script, as CI runners do); restored after."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


@pytest.fixture
def terminal(monkeypatch):
    """stderr counts as a terminal, as where someone watches: automatic bars show."""
    monkeypatch.setattr(_progress, "stderr_is_a_terminal", lambda: True)


@pytest.fixture
def stores(tmp_path, rng):
    weights = [0.5, 0.1]
    blocks = {
        side: [rng.standard_normal((n, d)).astype(np.float32) for d in (6, 4)]
        for side, n in (("test", 3), ("train", 40))
    }
    paths = {
        side: _write_store(tmp_path / side, mats, weights, ids=[f"{side}-{i}" for i in range(len(mats[0]))])
        for side, mats in blocks.items()
    }
    return paths, blocks, weights


def _score(paths, *extra):
    return ["score", "--test", str(paths["test"]), "--train", str(paths["train"]), *extra]


def _error_line(err: str, command: str) -> str:
    """The single stderr line of a failed command, checked for the one prefix style."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tracin {command}: error: "), lines[0]
    return lines[0]


# -- commands ------------------------------------------------------------------------------------
def test_info_describes_a_store(stores, capsys):
    paths, _, _ = stores
    assert main(["info", str(paths["train"])]) == 0
    out = capsys.readouterr().out
    assert "40" in out and "float32" in out and "complete" in out


def test_info_on_the_folder_of_an_interrupted_create_says_so(tmp_path, monkeypatch, capsys):
    """review88 F4: `tracin info` said only 'no manifest.json' for the leftovers of a create that failed
    (or was killed) part-way; it names the interrupted create and how to redo it."""

    def refuse(fd, length):
        raise OSError(27, "File too large")

    with monkeypatch.context() as m:
        m.setattr(os, "ftruncate", refuse)
        with pytest.raises(OSError):
            tracin.GradientStore.create(tmp_path / "s", n_rows=10, dims=[4])
    assert main(["info", str(tmp_path / "s")]) != 0
    err = capsys.readouterr().err
    assert "interrupted GradientStore.create" in err and "create-in-progress" in err
    assert "same arguments" in err and "delete the folder" in err
    info_line = _error_line(err, "info")
    # score and self-influence say the same after the option they read the folder from (said only 'no manifest.json')
    for command, option in (
        (["self-influence", str(tmp_path / "s")], "path"),
        (["score", "--test", str(tmp_path / "s"), "--train", str(tmp_path / "s")], "--test"),
    ):
        assert main(command) == 1
        line = _error_line(capsys.readouterr().err, command[0])
        assert line.startswith(f"tracin {command[0]}: error: {option}: ")
        assert line.endswith(info_line.split("error: ", 1)[1]), (line, info_line)
    tracin.GradientStore.create(tmp_path / "s", n_rows=10, dims=[4]).close()  # redone: a partial store now
    assert main(["info", str(tmp_path / "s")]) == 0


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


HOSTILE_IDS = ["\x1b]0;pwned\x07\x1b[2J", "two\nlines", "bidi\u202ex", "é,中"]


@pytest.mark.parametrize("on_terminal", [False, True])
def test_ids_with_control_characters_are_escaped_on_a_terminal_only(tmp_path, monkeypatch, capsys, on_terminal):
    # weights make the ranking the order of HOSTILE_IDS; a store from elsewhere must not drive the terminal
    mats = [np.array([[4.0], [3.0], [2.0], [1.0]], np.float32)]
    store = _write_store(tmp_path / "s", mats, [1.0], ids=HOSTILE_IDS)
    stdout = _Terminal() if on_terminal else io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["self-influence", str(store)]) == 0
    assert main(["score", "--test", str(store), "--train", str(store), "-k", "1", "--side", "proponents"]) == 0
    text = stdout.getvalue()
    ranking, pairs = text.split("test_row,", 1)
    rows = list(csv.DictReader(io.StringIO(ranking)))
    pair_rows = list(csv.DictReader(io.StringIO("test_row," + pairs)))
    if on_terminal:
        assert all(line.isprintable() for line in text.splitlines())
        shown = [r"\x1b]0;pwned\x07\x1b[2J", r"two\nlines", r"bidi\u202ex", "é,中"]
    else:  # a pipe or file gets the data as it is (CSV-quoted)
        shown = HOSTILE_IDS
    assert [r["train_id"] for r in rows] == shown
    assert [r["test_id"] for r in pair_rows] == shown  # row 0 (4 * x) is each test row's top proponent
    assert [r["train_id"] for r in pair_rows] == [shown[0]] * 4


def test_an_error_line_escapes_control_characters(tmp_path, capsys):
    assert main(["info", str(tmp_path / "gone\x1b[2J\x07")]) == 1
    err = capsys.readouterr().err
    assert err == f"tracin info: error: no gradient store at {tmp_path}/gone\\x1b[2J\\x07\n"


def test_score_writes_npz_equal_to_reference(stores, tmp_path, capsys):
    paths, blocks, weights = stores
    out = tmp_path / "top.npz"
    assert main(_score(paths, "-k", "5", "--side", "both", "-o", str(out))) == 0
    said = capsys.readouterr()
    assert str(out) in said.err and said.out == ""  # the path written is said, on stderr
    got = np.load(out)
    exact = exact_scores(blocks["test"], blocks["train"], weights)
    np.testing.assert_array_equal(got["proponents_indices"], np.argsort(-exact, axis=1)[:, :5])
    np.testing.assert_array_equal(got["opponents_indices"], np.argsort(exact, axis=1)[:, :5])


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_device_option_scores_there_or_says_in_one_line_why_not(stores, tmp_path, capsys, monkeypatch, device):
    # the library's GPU path could not be reached from the command line
    paths, blocks, weights = stores
    exact = exact_scores(blocks["test"], blocks["train"], weights)
    self_exact = sum(w * (b.astype(np.float64) ** 2).sum(1) for w, b in zip(weights, blocks["train"], strict=True))
    score = _score(paths, "-k", "5", "-o", str(tmp_path / "top.npz"), "--device", device)
    rank = ["self-influence", str(paths["train"]), "-o", str(tmp_path / "rank.csv"), "--device", device]
    if device == "cpu" or _cuda_available():
        assert main(score) == 0 and main(rank) == 0
        np.testing.assert_array_equal(np.load(tmp_path / "top.npz")["proponents_indices"], np.argsort(-exact)[:, :5])
        ranked = [int(r["train_row"]) for r in csv.DictReader(open(tmp_path / "rank.csv"))]
        assert ranked == list(np.argsort(-self_exact))
        return
    monkeypatch.setattr(tracin, "top_k", lambda *a, **k: pytest.fail("scored without a GPU"))
    for command in (score, rank):
        assert main(command) == 1
        line = _error_line(capsys.readouterr().err, command[0])
        assert "--device cuda: no usable CUDA device (" in line and "leave --device out" in line, line


def test_device_cuda_with_a_scheduler_is_refused_naming_both(stores, capsys):
    paths, _, _ = stores
    for command in (_score(paths), ["self-influence", str(paths["train"])]):
        assert main([*command, "--device", "cuda", "--scheduler", "local"]) == 2  # usage
        line = _error_line(capsys.readouterr().err, command[0])
        assert "--device cuda scores on this machine's GPU, --scheduler on the Dask workers' CPUs" in line


def test_device_reaches_the_library(stores, monkeypatch, capsys):
    paths, _, _ = stores
    seen = []
    for name in ("top_k", "self_influence"):
        real = getattr(tracin, name)
        monkeypatch.setattr(tracin, name, lambda *a, real=real, **k: seen.append(k["device"]) or real(*a, **k))
    assert main(_score(paths)) == main(["self-influence", str(paths["train"])]) == 0
    assert (
        main(_score(paths, "--device", "cpu")) == main(["self-influence", str(paths["train"]), "--device", "cpu"]) == 0
    )
    assert seen == [None, None, "cpu", "cpu"]  # None: where the rows are, the CPU for stores


def test_score_summary_says_the_k_returned_when_capped(stores, capsys):
    paths, _, _ = stores  # 40 train rows
    assert main(_score(paths, "-k", "100000")) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == (
        "top-40 proponents of 3 test rows over 40 train rows (k capped at the 40 train rows)"
    )
    assert len(captured.out.strip().splitlines()) == 1 + 3 * 40  # header + 40 ranks per test row
    assert main(_score(paths, "-k", "40")) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == "top-40 proponents of 3 test rows over 40 train rows"


def test_score_csv_ranks_count_from_one_per_test_row_and_side(stores, capsys):
    paths, _, _ = stores
    assert main(_score(paths, "-k", "4", "--side", "both")) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 3 * 2 * 4
    for t in range(3):
        for side in ("proponents", "opponents"):
            assert [r["rank"] for r in rows if r["test_row"] == str(t) and r["side"] == side] == ["1", "2", "3", "4"]


def test_score_normalize_writes_cosine_top_k(stores, tmp_path, capsys):
    paths, blocks, weights = stores
    out = tmp_path / "cos.npz"
    assert main(_score(paths, "-k", "4", "--side", "both", "--normalize", "-o", str(out))) == 0
    assert "(cosine scores)" in capsys.readouterr().err
    unit = {s: [m / np.linalg.norm(m.astype(np.float64), axis=1, keepdims=True) for m in b] for s, b in blocks.items()}
    exact = exact_scores(unit["test"], unit["train"], weights)  # float64, rows normalised per checkpoint
    with np.load(out) as got:
        for side, sign in (("proponents", 1), ("opponents", -1)):
            order = np.argsort(-sign * exact, axis=1, kind="stable")[:, :4]
            np.testing.assert_array_equal(got[f"{side}_indices"], order)
            expected = np.take_along_axis(exact, order, 1)
            np.testing.assert_allclose(got[f"{side}_values"], expected, atol=1e-5 * sum(weights))
    plain = tmp_path / "plain.npz"
    assert main(_score(paths, "-k", "4", "--side", "both", "-o", str(plain))) == 0
    with np.load(out) as a, np.load(plain) as b:
        assert not np.array_equal(a["proponents_values"], b["proponents_values"])


def test_score_csv_carries_ids(stores, tmp_path):
    paths, blocks, weights = stores
    out = tmp_path / "top.csv"
    assert main(_score(paths, "-k", "2", "--side", "proponents", "-o", str(out))) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 3 * 2
    best = int(np.argmax(exact_scores(blocks["test"], blocks["train"], weights)[0]))
    assert rows[0]["test_id"] == "test-0" and rows[0]["train_id"] == f"train-{best}"
    # review221 F1: csv's default \r\n line ends left "24.25\r" in awk's and cut's last column
    assert b"\r" not in out.read_bytes()


def test_csv_ids_ending_in_a_carriage_return_stay_in_their_row(tmp_path, rng):
    """review298 F4: ids split from a CRLF file end in \r; csv before Python 3.13 left such a cell unquoted with
    lineterminator \n, so csv readers saw a line break in the row (rows of 2 and 3 cells)."""
    ids = "img-0\r\nimg-1\r\nimg-2\r\n".split("\n")[:3]
    mats = [rng.standard_normal((3, 4)).astype(np.float32)]
    train = _write_store(tmp_path / "train", mats, [1.0], ids=ids)
    ranking, top = tmp_path / "rank.csv", tmp_path / "top.csv"
    assert main(["self-influence", str(train), "-o", str(ranking)]) == 0
    assert main(["score", "--test", str(train), "--train", str(train), "-k", "2", "-o", str(top)]) == 0
    for out, width, id_columns in ((ranking, 4, (2,)), (top, 7, (1, 5))):
        rows = list(csv.reader(open(out, newline="")))
        assert len(rows) == 1 + 3 * (1 if out == ranking else 2)
        assert all(len(row) == width for row in rows), rows
        assert all(row[c] in ids for row in rows[1:] for c in id_columns)
    exact = (mats[0].astype(np.float64) ** 2).sum(1)
    rows = list(csv.DictReader(open(ranking, newline="")))
    assert [r["train_id"] for r in rows] == [ids[i] for i in np.argsort(-exact)]


def test_self_influence_ranking(stores, tmp_path, capsys):
    paths, blocks, weights = stores
    out = tmp_path / "rank.csv"
    assert main(["self-influence", str(paths["train"]), "-o", str(out), "--top", "7"]) == 0
    said = capsys.readouterr()
    assert str(out) in said.err and said.out == ""
    assert b"\r" not in out.read_bytes()
    rows = list(csv.DictReader(open(out)))
    exact = sum(w * (b.astype(np.float64) ** 2).sum(1) for w, b in zip(weights, blocks["train"], strict=True))
    assert [int(r["train_row"]) for r in rows] == list(np.argsort(-exact)[:7])
    # review1 nit: the train row's id was `id` here and `train_id` in score's CSV
    assert list(rows[0]) == ["rank", "train_row", "train_id", "self_influence"]
    assert [r["train_id"] for r in rows] == [f"train-{i}" for i in np.argsort(-exact)[:7]]
    assert {"train_row", "train_id"} <= set(PAIRS_HEADER)


def test_self_influence_ranks_equal_scores_in_row_order(tmp_path, capsys):
    """Rows of equal self-influence (duplicated examples) are ranked in row order, as top_k breaks ties: the
    same CSV on every run and machine."""
    row = np.array([[1.0, 2.0, -0.5]], np.float32)
    rows = np.repeat(row, 300, axis=0)
    rows[7] *= 2  # one row first; the other 299 tie
    path = _write_store(tmp_path / "s", [rows], [1.0])
    assert main(["self-influence", str(path), "--top", "300"]) == 0
    ranked = [int(r["train_row"]) for r in csv.DictReader(io.StringIO(capsys.readouterr().out))]
    assert ranked == [7, *(i for i in range(300) if i != 7)]


def test_csv_scores_read_back_to_the_same_float32(tmp_path, rng):
    # ~0.5% of float32 values need 9 significant digits: 8000 scores and 2000 self-influences have some
    paths = {
        side: _write_store(tmp_path / side, [rng.standard_normal((n, 3)).astype(np.float32)], [0.7])
        for side, n in (("test", 2), ("train", 2000))
    }
    assert main(_score(paths, "-k", "2000", "--side", "both", "-o", str(tmp_path / "top.csv"))) == 0
    assert main(_score(paths, "-k", "2000", "--side", "both", "-o", str(tmp_path / "top.npz"))) == 0
    assert main(["self-influence", str(paths["train"]), "-o", str(tmp_path / "rank.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "top.csv")))
    with np.load(tmp_path / "top.npz") as top:
        for side in ("proponents", "opponents"):
            text = [r["influence"] for r in rows if r["side"] == side]
            expected = top[f"{side}_values"].ravel()
            np.testing.assert_array_equal(np.array(text, dtype=np.float32).view(np.uint32), expected.view(np.uint32))
    store = tracin.GradientStore.open(paths["train"])
    ranked = list(csv.DictReader(open(tmp_path / "rank.csv")))
    expected = tracin.self_influence(store)[[int(r["train_row"]) for r in ranked]]
    got = np.array([r["self_influence"] for r in ranked], dtype=np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_without_output_results_go_to_stdout_and_no_file_is_written(stores, tmp_path, capsys, monkeypatch):
    paths, blocks, weights = stores
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(_score(paths, "-k", "3")) == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader(io.StringIO(out)))
    exact = exact_scores(blocks["test"], blocks["train"], weights)
    got = np.array([int(r["train_row"]) for r in rows]).reshape(3, 3)
    np.testing.assert_array_equal(got, np.argsort(-exact, axis=1)[:, :3])  # proponents, the library's default
    assert {r["side"] for r in rows} == {"proponents"}
    assert main(["self-influence", str(paths["train"]), "--top", "4"]) == 0
    ranked = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    self_exact = sum(w * (b.astype(np.float64) ** 2).sum(1) for w, b in zip(weights, blocks["train"], strict=True))
    assert [int(r["train_row"]) for r in ranked] == list(np.argsort(-self_exact)[:4])
    assert list(cwd.iterdir()) == []


def test_long_runs_show_a_progress_bar_unless_turned_off(stores, tmp_path, capsys, monkeypatch, terminal):
    import tracin.scoring

    paths, _, _ = stores
    monkeypatch.setattr(tracin.scoring, "_AUTO_PROGRESS_MACS", 0)  # every run counts as long
    score = _score(paths, "-o", str(tmp_path / "t.npz"))
    rank = ["self-influence", str(paths["train"]), "-o", str(tmp_path / "r.csv")]
    for command, bar in ((score, "tracin top_k"), (rank, "tracin self_influence")):
        assert main(command) == 0
        assert bar in capsys.readouterr().err
        assert main([*command, "--no-progress"]) == 0
        assert bar not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["score", "self-influence"])
def test_bars_go_to_a_terminal_but_not_into_a_log(stores, tmp_path, command):
    # stderr redirected to a file collected a frame of every bar per refresh
    import fcntl
    import pty
    import struct
    import termios

    paths, _, _ = stores
    args = _score(paths, "-o", str(tmp_path / "out.csv")) if command == "score" else [command, str(paths["train"])]
    script = (
        "import sys, tracin.scoring as s, tracin._progress as p\n"
        "s._AUTO_PROGRESS_MACS = 0; p.AUTO_DELAY_S = 0  # every run counts as long: bars at once\n"
        f"from tracin.cli import main; sys.exit(main({args!r}))"
    )
    log = tmp_path / "stderr.log"
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=f, timeout=120)
    assert done.returncode == 0 and "%|" not in log.read_text(), log.read_text()
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # 0 columns: bars drawn empty
    try:
        done = subprocess.run([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=slave, timeout=120)
        os.close(slave)
        seen = b""
        while chunk := _read_pty(master):
            seen += chunk
    finally:
        os.close(master)
    bar = b"tracin top_k" if command == "score" else b"tracin self_influence"
    assert done.returncode == 0 and bar in seen and b"%|" in seen, seen


def _read_pty(fd: int) -> bytes:
    """What is left to read from a pty's master once its slave side is closed (b"" at the end)."""
    try:
        return os.read(fd, 65536)
    except OSError:  # Linux: EIO once the slave side is closed and drained
        return b""


class _InterruptingSpec(str):
    """A format spec that raises KeyboardInterrupt (Ctrl-C) at its `after`-th use."""

    def __new__(cls, spec: str, after: int):
        self = super().__new__(cls, spec)
        self.left = after
        return self

    def __format__(self, format_spec: str) -> str:
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        return str(self)


def test_interrupted_output_leaves_the_previous_file_whole(stores, tmp_path, capsys, monkeypatch):
    import tracin.cli

    paths, _, _ = stores
    previous = b"the previous result\n"

    def interrupted_savez(file, **arrays):
        (file if hasattr(file, "write") else open(file, "wb")).write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt

    for name, command in (
        ("rank.csv", ["self-influence", str(paths["train"])]),
        ("top.csv", _score(paths, "-k", "40", "--side", "both")),
        ("top.npz", _score(paths)),
    ):
        out = tmp_path / "out" / name
        out.parent.mkdir(exist_ok=True)
        out.write_bytes(previous)
        out.chmod(0o640)
        with monkeypatch.context() as m:  # Ctrl-C after 20 rows written, or in the middle of np.savez
            m.setattr(tracin.cli, "FLOAT32", _InterruptingSpec(tracin.cli.FLOAT32, 20))
            m.setattr(np, "savez", interrupted_savez)
            assert main([*command, "-o", str(out)]) == 130
        assert "interrupted" in capsys.readouterr().err
        assert out.read_bytes() == previous and [p.name for p in out.parent.iterdir()] == [name]  # no temp file left
        assert main([*command, "-o", str(out)]) == 0  # replaced whole, keeping the old file's permissions
        assert out.read_bytes() != previous and (out.stat().st_mode & 0o777) == 0o640
        assert [p.name for p in out.parent.iterdir()] == [name]
        out.unlink()
    capsys.readouterr()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_while_writing_leave_the_previous_file_whole(stores, tmp_path, signum):
    paths, _, _ = stores
    out = tmp_path / "out" / "rank.csv"
    out.parent.mkdir()
    out.write_text("the previous result\n")
    script = f"""
import os, signal, sys, tracin.cli as cli
signal.signal({int(signum)}, signal.SIG_DFL)  # as in a terminal, also under nohup or a CI runner
class Spec(str):  # the signal arrives after 20 rows written
    left = 20
    def __format__(self, spec):
        Spec.left -= 1
        if Spec.left == 0:
            os.kill(os.getpid(), {int(signum)})
        return str(self)
cli.FLOAT32 = Spec(cli.FLOAT32)
sys.exit(cli.main(["self-influence", {str(paths["train"])!r}, "-o", {str(out)!r}, "--no-progress"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    what = "hung up (SIGHUP)" if signum == signal.SIGHUP else "terminated (SIGTERM)"
    assert (done.returncode, done.stderr) == (128 + signum, f"tracin self-influence: {what}\n")
    assert out.read_text() == "the previous result\n" and [p.name for p in out.parent.iterdir()] == ["rank.csv"]


def test_a_failed_output_write_names_the_option_and_the_file(stores, tmp_path, capsys, monkeypatch):
    # review1 F4: a full disk while writing -o said only "tracin score: error: [Errno 28] No space left on device"
    import errno

    paths, _, _ = stores
    if os.path.exists("/dev/full"):  # a device that is always full: written in place, through the link
        for name, command in (
            ("full.csv", _score(paths, "-k", "5")),
            ("full.npz", _score(paths, "-k", "5")),
            ("full.csv", ["self-influence", str(paths["train"])]),
        ):
            link = tmp_path / name
            if not link.is_symlink():
                link.symlink_to("/dev/full")
            assert main([*command, "-o", str(link)]) == 1
            line = _error_line(capsys.readouterr().err, command[0])
            assert line.endswith(f"error: --output: cannot write {link}: No space left on device"), line
    out = tmp_path / "top.npz"
    out.write_bytes(b"the previous file")

    def full(f, **arrays):
        f.write(b"partly")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full)
    assert main(_score(paths, "-k", "5", "-o", str(out))) == 1
    line = _error_line(capsys.readouterr().err, "score")
    assert line == f"tracin score: error: --output: cannot write {out}: {os.strerror(errno.ENOSPC)}"
    assert out.read_bytes() == b"the previous file"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tracin-")) == []


def test_a_failed_stdout_write_names_stdout_and_a_closed_pipe_or_ctrl_c_keep_their_exit_codes(
    stores, tmp_path, rng, capsys, monkeypatch
):
    # review5 F1: `tracin self-influence STORE > /dev/full` said only "error: [Errno 28] No space left on device"
    import errno

    import tracin.cli as cli

    paths, _, _ = stores
    big = _write_store(tmp_path / "big", [rng.standard_normal((3000, 2)).astype(np.float32)], [1.0])  # > 8 KiB CSV
    said = "cannot write the results to stdout: No space left on device"
    run = [sys.executable, "-m", "tracin"]
    if os.path.exists("/dev/full"):  # the results fail while written (self-influence) or at the last flush (score)
        for command in (["self-influence", str(big)], _score(paths, "-k", "2")):
            with open("/dev/full", "w") as full:
                done = subprocess.run([*run, *command], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
            assert (done.returncode, done.stderr) == (1, f"tracin {command[0]}: error: {said}\n")

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for command in (["info", str(paths["train"])], ["self-influence", str(paths["train"])], _score(paths)):
        monkeypatch.setattr(sys, "stdout", Full())
        assert main(command) == 1
        monkeypatch.undo()
        assert _error_line(capsys.readouterr().err, command[0]) == f"tracin {command[0]}: error: {said}"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_write_csv", interrupted)
    assert main(["self-influence", str(paths["train"])]) == 130
    assert capsys.readouterr().err == "tracin self-influence: interrupted\n"
    read, write = os.pipe()
    os.close(read)  # the reader went away: quietly 141, as before
    try:
        done = subprocess.run([*run, "self-influence", str(big)], stdout=write, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, b"")


def test_bench_refuses_a_stdout_it_cannot_write_before_timing(capsys, monkeypatch):
    # `tracin bench > /dev/full` timed for seconds, then ended with a bare "[Errno 28] ..." line
    import errno

    from tracin import selfbench

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def timed(*args, **kwargs):
        raise AssertionError("the benchmark ran although its results could not be written")

    monkeypatch.setattr(selfbench, "run", timed)
    monkeypatch.setattr(sys, "stdout", Full())
    assert main(["bench", "--quick"]) == 1
    monkeypatch.undo()
    said = "cannot write the results to stdout: No space left on device"
    assert _error_line(capsys.readouterr().err, "bench") == f"tracin bench: error: {said}"


def test_output_through_a_symlink_fifo_or_hard_link_writes_the_file_named(stores, tmp_path):
    paths, _, _ = stores
    rank = ["self-influence", str(paths["train"]), "--top", "3", "-o"]
    expected = tmp_path / "expected.csv"
    assert main([*rank, str(expected)]) == 0
    real, link = tmp_path / "real" / "rank.csv", tmp_path / "rank.csv"
    real.parent.mkdir()
    real.write_text("old\n")
    link.symlink_to("real/rank.csv")
    assert main([*rank, str(link)]) == 0  # the link stays, its target gets the result
    assert link.is_symlink() and real.read_text() == expected.read_text()
    other = tmp_path / "other-name.csv"
    os.link(real, other)
    assert main([*rank, str(real)]) == 0  # both names still one file
    assert os.path.samefile(real, other)
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    read = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_text()))
    reader.start()
    assert main([*rank, str(fifo)]) == 0  # a reader of the FIFO gets the result; the FIFO stays
    reader.join(timeout=60)
    assert read == [expected.read_text()] and stat.S_ISFIFO(fifo.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_fifo_or_device_output_is_streamed_whatever_its_name(stores, tmp_path):
    """review152 F3: -o /dev/stdout or a FIFO named without .csv/.npz was refused by the suffix check, while
    the README says a FIFO or a device is streamed: CSV goes to it (score's NPZ only to a name ending in .npz)."""
    paths, _, _ = stores
    rank = ["self-influence", str(paths["train"]), "--top", "3", "-o"]
    pairs = _score(paths, "-k", "2", "-o")
    expected_rank, expected_pairs = tmp_path / "rank.csv", tmp_path / "pairs.csv"
    assert main([*rank, str(expected_rank)]) == 0 and main([*pairs, str(expected_pairs)]) == 0
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for command, expected in ((rank, expected_rank), (pairs, expected_pairs)):
        read: list[str] = []
        reader = threading.Thread(target=lambda got=read: got.append(fifo.read_text()))
        reader.start()
        assert main([*command, str(fifo)]) == 0
        reader.join(timeout=60)
        assert read == [expected.read_text()]
    done = subprocess.run(
        [sys.executable, "-m", "tracin", *rank, "/dev/stdout"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout == expected_rank.read_text(), done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.csv", "pipe", "rank.csv", "test", "train"]


def test_dev_stdout_redirected_to_a_file_or_closed_is_refused_naming_what_it_is(stores, tmp_path):
    """fr152: with stdout redirected to a file, /dev/stdout is that regular file, not a device: refused for its
    name, the error saying which file it is (not only "be a FIFO or a device, got '/dev/stdout'"). With stdout
    closed (`>&-`), /dev/stdout is the /dev/null the command puts there: -o /dev/stdout exited 0, the results
    dropped, where leaving -o out is an error."""
    paths, _, _ = stores
    redirected = tmp_path / "out" / "results"
    redirected.parent.mkdir()
    with open(redirected, "w") as f:
        done = subprocess.run(
            [sys.executable, "-m", "tracin", "self-influence", str(paths["train"]), "-o", "/dev/stdout"],
            stdout=f,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    said = f"--output must end in .csv or be a FIFO or a device, got '/dev/stdout', which is the file {redirected}"
    assert (done.returncode, done.stderr.splitlines()[-1]) == (2, f"tracin self-influence: error: {said}")
    assert redirected.read_text() == "" and os.listdir(redirected.parent) == ["results"]
    closed = "cannot write the results to stdout: it is closed; give -o FILE to write them to a file"
    for command in (_score(paths, "-o", "/dev/stdout"), ["self-influence", str(paths["train"]), "-o", "/dev/fd/1"]):
        done = _run_with_closed(">&-", command)
        assert (done.returncode, done.stderr) == (1, f"tracin {command[0]}: error: {closed}\n")
    done = _run_with_closed(">&-", ["self-influence", str(paths["train"]), "-o", "/dev/null"])  # not stdout
    assert (done.returncode, done.stderr) == (0, "self-influence of 40 rows, 40 ranked: wrote /dev/null\n")


def test_a_socket_output_is_no_device_and_is_refused_before_any_work(stores, tmp_path, capsys, monkeypatch):
    """fr152: a Unix socket passed as a FIFO or a device (anything not a file or a folder): refused for its
    name by no check, it failed to open (ENXIO, exit code 1) only after the whole pass."""
    import socket

    paths, _, _ = stores
    monkeypatch.setattr(tracin, "self_influence", lambda *a, **k: pytest.fail("scored before --output was checked"))
    rank = ["self-influence", str(paths["train"]), "-o"]
    with socket.socket(socket.AF_UNIX) as named, socket.socket(socket.AF_UNIX) as suffixed:
        named.bind(str(tmp_path / "sock"))
        suffixed.bind(str(tmp_path / "sock.csv"))
        assert main([*rank, str(tmp_path / "sock")]) == 2
        line = _error_line(capsys.readouterr().err, "self-influence")
        assert line.endswith(f"--output must end in .csv or be a FIFO or a device, got '{tmp_path / 'sock'}'")
        assert main([*rank, str(tmp_path / "sock.csv")]) == 1
        line = _error_line(capsys.readouterr().err, "self-influence")
        assert line.endswith(f"--output: cannot write {tmp_path / 'sock.csv'} (No such device or address)"), line


def test_one_ctrl_c_ends_score_streaming_npz_to_a_fifo_whose_reader_stopped_reading(tmp_path, rng):
    """fr152: score's NPZ to a FIFO whose reader holds it open but reads no more took three Ctrl-Cs, each at
    least a second apart: the first interrupted a blocked write, then zipfile's closing records, written while
    the interrupt unwound, blocked again. The archive is staged whole and written at once, as the CSV is."""
    import fcntl
    import termios

    test = _write_store(tmp_path / "test", [rng.standard_normal((2000, 4)).astype(np.float32)], [1.0])
    train = _write_store(tmp_path / "train", [rng.standard_normal((40, 4)).astype(np.float32)], [1.0])
    fifo = tmp_path / "pipe.npz"  # 2000 x 40 x 2 sides x 12 bytes: far more than a pipe holds
    os.mkfifo(fifo)
    command = ["score", "--test", str(test), "--train", str(train), "-k", "40", "--side", "both", "-o", str(fifo)]
    script = f"""
import signal, sys, tracin.cli as cli
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, also where pytest runs with it ignored
sys.exit(cli.main({command!r}))
"""
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # holds the FIFO open, never reads
    try:
        done = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
        held, deadline = [-1], time.monotonic() + 120
        while time.monotonic() < deadline:  # until the pipe is full: the writer is blocked
            time.sleep(0.5)
            held.append(int.from_bytes(fcntl.ioctl(reader, termios.FIONREAD, bytes(4)), sys.byteorder))
            if held[-1] > 0 and held[-1] == held[-2]:
                break
        assert done.poll() is None and held[-1] > 0, held
        done.send_signal(signal.SIGINT)
        try:
            code = done.wait(timeout=30)
        except subprocess.TimeoutExpired:
            done.kill()
            done.wait()
            pytest.fail("one Ctrl-C did not end score writing NPZ to a FIFO whose reader stopped reading")
        assert (code, done.stderr.read()) == (130, "tracin score: interrupted\n")
    finally:
        os.close(reader)


def test_long_output_names_are_written_and_too_long_ones_refused_first(stores, tmp_path, capsys, monkeypatch):
    paths, _, _ = stores
    rank = ["self-influence", str(paths["train"]), "-o"]
    longest = tmp_path / ("a" * 251 + ".csv")  # 255 bytes, the usual limit
    assert main([*rank, str(longest)]) == 0 and longest.read_text().startswith("rank,")
    assert capsys.readouterr().err.endswith(f": wrote {longest}\n")  # the summary, on stderr
    monkeypatch.setattr(tracin, "self_influence", lambda *a, **k: pytest.fail("scored before --output was checked"))
    assert main([*rank, str(tmp_path / ("a" * 252 + ".csv"))]) == 1
    assert "file name of 256 bytes" in _error_line(capsys.readouterr().err, "self-influence")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to own files as another user")
def test_another_users_output_keeps_its_owner(stores, tmp_path, monkeypatch):
    import tracin.cli

    paths, _, _ = stores
    out = tmp_path / "r.csv"
    out.write_text("old\n")
    os.chown(out, 65534, 65534)
    out.chmod(0o640)
    rank = ["self-influence", str(paths["train"]), "-o", str(out)]
    assert main(rank) == 0  # replaced by a file of the same owner, group and permissions
    st = out.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o640)
    inode = st.st_ino

    def refused(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(tracin.cli.os, "fchown", refused)  # as for a user who may not give it away
    out.write_text("old\n")
    assert main(rank) == 0  # written in place: same file, same owner
    assert out.stat().st_ino == inode and out.read_text().startswith("rank,")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_writing_a_long_csv_shows_a_progress_bar_unless_turned_off(stores, tmp_path, capsys, monkeypatch, terminal):
    paths, _, _ = stores
    monkeypatch.setattr(_progress, "AUTO_DELAY_S", 0)  # every write counts as long
    for command in (
        ["self-influence", str(paths["train"]), "-o", str(tmp_path / "r.csv")],
        _score(paths, "-k", "5"),
    ):
        assert main(command) == 0
        assert "tracin writing CSV" in capsys.readouterr().err
        assert main([*command, "--no-progress"]) == 0
        assert "tracin writing CSV" not in capsys.readouterr().err


# -- unfinished stores ---------------------------------------------------------------------------
def test_unfinished_store_is_named_before_a_shape_mismatch(stores, tmp_path, rng, capsys):
    paths, _, _ = stores
    three = [rng.standard_normal((40, 5)).astype(np.float32) for _ in range(3)]  # 3 checkpoints, not 2
    partial = _write_store(tmp_path / "partial", three, [1.0] * 3, rows=10)
    assert main(["score", "--test", str(paths["test"]), "--train", str(partial)]) == 1
    line = _error_line(capsys.readouterr().err, "score")
    assert "--train" in line and "unfinished" in line and "--allow-partial" in line and "10, 10, 10 of 40" in line
    assert "checkpoint" not in line.split("unfinished")[0]  # not reported as a mismatch
    assert main(["self-influence", str(partial)]) == 1
    assert "--allow-partial" in _error_line(capsys.readouterr().err, "self-influence")


def test_a_store_written_whole_but_never_finalized_names_finalize(tmp_path, rng, capsys):
    mats = [rng.standard_normal((12, 5)).astype(np.float32) for _ in range(2)]
    whole = _write_store(tmp_path / "whole", mats, [1.0, 0.5], rows=12)  # every row, no finalize()
    assert main(["self-influence", str(whole)]) == 1
    line = _error_line(capsys.readouterr().err, "self-influence")
    assert "every row is written" in line and "never finalized" in line and ".finalize()" in line
    assert "12, 12 of 12" in line


def test_allow_partial_scores_the_rows_written(stores, tmp_path, capsys):
    paths, blocks, weights = stores
    partial = _write_store(tmp_path / "partial", blocks["train"], weights, rows=25)
    assert main(["score", "--test", str(paths["test"]), "--train", str(partial), "-k", "4", "--allow-partial"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    exact = exact_scores(blocks["test"], [m[:25] for m in blocks["train"]], weights)
    got = np.array([int(r["train_row"]) for r in rows]).reshape(3, 4)
    np.testing.assert_array_equal(got, np.argsort(-exact, axis=1)[:, :4])
    assert main(["self-influence", str(partial), "--allow-partial"]) == 0
    ranked = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(ranked) == 25


def test_allow_partial_with_no_usable_rows_is_an_error_naming_the_side(stores, tmp_path, capsys):
    paths, blocks, weights = stores
    gap = tracin.GradientStore.create(tmp_path / "gap", 40, [6, 4], weights=weights)
    for c, m in enumerate(blocks["train"]):
        gap.write(c, 10, m[10:20])  # rows recorded, but none from row 0 on
    gap.close()
    for command, option in (
        (["score", "--test", str(tmp_path / "gap"), "--train", str(paths["train"])], "--test"),
        (["score", "--test", str(paths["test"]), "--train", str(tmp_path / "gap")], "--train"),
        (["self-influence", str(tmp_path / "gap")], "path"),
    ):
        assert main(command) == 1
        line = _error_line(capsys.readouterr().err, command[0])
        assert f"{option}: gradient store" in line and "(rows written from row 0, per checkpoint: 0, 0 of 40)" in line
        assert main([*command, "--allow-partial"]) == 1
        line = _error_line(capsys.readouterr().err, command[0])
        assert f"{option}: gradient store {tmp_path / 'gap'} has no usable rows yet" in line and "0, 0 of 40" in line


def test_an_unfinished_factored_stores_counts_are_said_per_factor_pair(tmp_path, rng, capsys):
    # review1 F6: a store of 1 checkpoint x 2 layers said "per checkpoint: 60, 30": two counts for one checkpoint
    meta = {"framework": "numpy", "mode": "factored", "fingerprints": {"checkpoints": ["a" * 32]}}
    w = tracin.GradientStore.create(
        tmp_path / "pf", n_rows=100, dims=[(4, 3), (2, 5)], weights=[0.1, 0.1], factored=True, metadata=meta
    )
    for slot, (rows, (a, b)) in enumerate(((60, (4, 3)), (30, (2, 5)))):
        w.write(slot, 0, tuple(rng.standard_normal((rows, d), dtype=np.float32) for d in (a, b)))
    w.close()
    assert main(["self-influence", str(tmp_path / "pf")]) == 1
    line = _error_line(capsys.readouterr().err, "self-influence")
    assert "(rows written from row 0, per factor pair (2 layers per checkpoint): 60, 30 of 100)" in line
    assert "--allow-partial to use the 30 rows written so far for every factor pair" in line
    assert "per checkpoint:" not in line


# -- warnings ------------------------------------------------------------------------------------
def _store_that_warns(path: Path, rng: np.random.Generator) -> Path:
    """An unfinished store whose range writers recorded rows 9..12 past the 6 usable (rows 6..9 missing):
    GradientStore.open(allow_partial=True) warns of them."""
    tracin.GradientStore.create(path, 12, [3, 2], weights=[0.5, 2.0]).close()
    for start, stop in ((0, 6), (9, 12)):
        with tracin.GradientStore.create(path, 12, [3, 2], weights=[0.5, 2.0], rows=(start, stop)) as w:
            for c, d in enumerate((3, 2)):
                w.write(c, start, rng.standard_normal((stop - start, d)).astype(np.float32))
    return path


def test_a_warning_made_an_error_is_a_one_line_error(tmp_path, rng, capsys):
    # review283 F4: `python -W error -m tracin ...` ended in a traceback
    path = _store_that_warns(tmp_path / "s", rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["self-influence", str(path), "--allow-partial"]) == 1
    line = _error_line(capsys.readouterr().err, "self-influence")
    assert line.startswith(f"tracin self-influence: error: gradient store {path}: range writers record rows past")


def test_one_store_on_both_sides_warns_once_per_command(tmp_path, rng, capsys):
    # review283 F4: its warning was shown twice, once per side
    path = _store_that_warns(tmp_path / "s", rng)
    for _ in range(2):  # and again in the next command
        assert main(["score", "--test", str(path), "--train", str(path), "--allow-partial", "-k", "2"]) == 0
        err = capsys.readouterr().err
        warned = [line for line in err.splitlines() if line.startswith("tracin score: warning: ")]
        assert len(warned) == 1 and "past the 6 usable from row 0" in warned[0], err


def test_a_warning_to_a_stderr_whose_reader_went_away_does_not_stop_the_command(tmp_path, rng):
    # review283 F4: the warning's BrokenPipeError ended the command before the -o file was written
    path = _store_that_warns(tmp_path / "s", rng)
    out = tmp_path / "out.csv"
    script = f"""
import os, sys
from tracin.cli import main
r, w = os.pipe()
os.close(r)
sys.stderr = os.fdopen(w, "w", buffering=1)
code = main(["self-influence", {str(path)!r}, "--allow-partial", "-o", {str(out)!r}])
open({str(tmp_path / "code")!r}, "w").write(str(code))
"""
    subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    # the summary line after the results also meets the broken pipe: exit code 141, as for SIGPIPE
    assert (tmp_path / "code").read_text() == "141"
    rows = list(csv.DictReader(out.open()))
    assert sorted(int(r["train_row"]) for r in rows) == list(range(6))


# -- errors --------------------------------------------------------------------------------------
def test_errors_are_one_line_with_one_prefix_and_exit_codes(tmp_path, stores, capsys):
    assert main(["info", str(tmp_path / "nowhere")]) == 1
    assert "no gradient store" in _error_line(capsys.readouterr().err, "info")
    paths, _, _ = stores
    with pytest.raises(SystemExit) as e:
        main(_score(paths, "-k", "0"))
    assert e.value.code == 2 and "expected a positive integer" in capsys.readouterr().err
    (tmp_path / "folder.csv").mkdir()
    assert main(["self-influence", str(paths["train"]), "-o", str(tmp_path / "folder.csv")]) == 1  # a directory
    _error_line(capsys.readouterr().err, "self-influence")
    assert main(_score(paths, "-o", str(tmp_path / "x.txt"))) == 2  # usage: the name itself is wrong
    assert ".npz or .csv" in _error_line(capsys.readouterr().err, "score")
    assert main(["score", "--test", str(tmp_path / "nowhere"), "--train", str(paths["train"])]) == 1
    assert "--test: no gradient store" in _error_line(capsys.readouterr().err, "score")
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


def test_an_unknown_option_is_the_commands_usage_error(stores, capsys):
    # A mistyped option printed the top-level usage and "tracin: error:", not the command's (review199 F1)
    paths, _, _ = stores
    with pytest.raises(SystemExit) as e:
        main(_score(paths, "--normalise"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: tracin score" in err
    assert "tracin score: error: unrecognized arguments: --normalise (did you mean --normalize?)" in err
    with pytest.raises(SystemExit) as e:
        main(["info", str(paths["train"]), "extra"])
    assert e.value.code == 2 and "tracin info: error: unrecognized arguments: extra" in capsys.readouterr().err


def test_stores_of_other_checkpoints_are_one_line_naming_them(tmp_path, stores, capsys):
    """Stores whose exports recorded other checkpoints: the CLI names the checkpoints that differ and
    what to do from a shell, not the library's advice to edit metadata; the same checkpoints score."""
    _, blocks, weights = stores

    def exported(name, mats, digests):
        meta = {"framework": "torch", "mode": "full", "fingerprints": {"data": name, "checkpoints": digests}}
        w = tracin.GradientStore.create(
            tmp_path / name,
            len(mats[0]),
            [m.shape[1] for m in mats],
            weights=weights,
            metadata={**meta, "checkpoint_sources": ["file", "file"]},
        )
        for c, m in enumerate(mats):
            w.write(c, 0, m)
        w.finalize()
        return tmp_path / name

    test = exported("t", blocks["test"], ["a", "b"])
    other = {"test": test, "train": exported("x", blocks["train"], ["a", "c"])}
    out = tmp_path / "top.npz"
    assert main(_score(other, "-o", str(out))) == 1
    line = _error_line(capsys.readouterr().err, "score")
    assert "--test and --train were exported at different checkpoints (checkpoints [1] differ)" in line
    assert line.endswith("export both sides from the same checkpoints (same files or state dicts)")
    assert "metadata" not in line and not out.exists()
    same = {"test": test, "train": exported("s", blocks["train"], ["a", "b"])}
    assert main(_score(same, "-k", "3", "-o", str(out))) == 0
    exact = exact_scores(blocks["test"], blocks["train"], weights)
    np.testing.assert_array_equal(np.load(out)["proponents_indices"], np.argsort(-exact, axis=1)[:, :3])


def test_adam_stores_of_other_optimizer_states_are_one_line_naming_them(tmp_path, stores, capsys):
    """preconditioner='adam' stores of the same checkpoints whose exports recorded other optimizer states: the
    CLI names the checkpoints whose states differ, not the checkpoints themselves nor the metadata advice."""
    _, blocks, weights = stores

    def exported(name, mats, states):
        meta = {
            "framework": "torch",
            "mode": "full",
            "preconditioner": {"kind": "adam"},
            "fingerprints": {"data": name, "checkpoints": ["a", "b"], "optimizer_states": states},
            "checkpoint_sources": ["file", "file"],
            "optimizer_state_sources": ["file", "file"],
        }
        w = tracin.GradientStore.create(
            tmp_path / name, len(mats[0]), [m.shape[1] for m in mats], weights=weights, metadata=meta
        )
        for c, m in enumerate(mats):
            w.write(c, 0, m)
        w.finalize()
        return tmp_path / name

    test = exported("t", blocks["test"], ["s0", "s1"])
    other = {"test": test, "train": exported("x", blocks["train"], ["r0", "s1"])}
    out = tmp_path / "top.npz"
    assert main(_score(other, "-o", str(out))) == 1
    line = _error_line(capsys.readouterr().err, "score")
    assert "--test and --train were exported with different optimizer states (of checkpoints [0])" in line
    assert "different checkpoints" not in line and "metadata" not in line and not out.exists()
    same = {"test": test, "train": exported("s", blocks["train"], ["s0", "s1"])}
    assert main(_score(same, "-k", "3", "-o", str(out))) == 0


def test_output_is_checked_before_scoring(stores, tmp_path, capsys, monkeypatch):
    paths, _, _ = stores

    def never(*args, **kwargs):
        raise AssertionError("scored before --output was checked")

    monkeypatch.setattr(tracin, "top_k", never)
    monkeypatch.setattr(tracin, "self_influence", never)
    missing = tmp_path / "no" / "such"
    for command, output in (
        (_score(paths), missing / "x.npz"),
        (["self-influence", str(paths["train"])], missing / "rank.csv"),
    ):
        assert main([*command, "-o", str(output)]) == 1
        assert f"--output: folder {missing} does not exist" in _error_line(capsys.readouterr().err, command[0])
    assert main(_score(paths, "-o", str(tmp_path))) == 2
    assert ".npz or .csv" in _error_line(capsys.readouterr().err, "score")
    assert main(["self-influence", str(paths["train"]), "-o", str(tmp_path / "rank.npz")]) == 2
    line = _error_line(capsys.readouterr().err, "self-influence")  # review152 F3: the whole path, not 'rank.npz'
    assert f"--output must end in .csv or be a FIFO or a device, got '{tmp_path / 'rank.npz'}'" in line
    (tmp_path / "dir.csv").mkdir()
    for command in (_score(paths), ["self-influence", str(paths["train"])]):
        assert main([*command, "-o", str(tmp_path / "dir.csv")]) == 1
        assert f"--output: {tmp_path / 'dir.csv'} is a folder" in _error_line(capsys.readouterr().err, command[0])


def test_output_names_without_a_stem_in_a_file_or_empty_are_refused_and_suffixes_take_any_case(
    stores, tmp_path, capsys, monkeypatch
):
    # were: "folder afile does not exist", "must end in .npz or .csv, got .csv", "got " and .CSV refused
    paths, blocks, weights = stores
    (tmp_path / "afile").write_text("x")
    monkeypatch.chdir(tmp_path)
    for output, message, code in (
        ("afile/x.csv", f"--output: {tmp_path / 'afile'} is not a folder, so afile/x.csv cannot be written in it", 1),
        (".csv", "--output: '.csv' has no name before .csv; give one, as in out.csv", 2),
        (".NPZ", "--output: '.NPZ' has no name before .npz; give one, as in out.npz", 2),
        ("", "--output: expected a file name, got ''", 2),
        ("x.txt", "--output must end in .npz or .csv or be a FIFO or a device, got 'x.txt'", 2),
    ):
        assert main(_score(paths, "-o", output)) == code
        assert _error_line(capsys.readouterr().err, "score").endswith(message)
    assert main(_score(paths, "-k", "3", "-o", "UP.NPZ")) == 0
    expected = np.argsort(-exact_scores(blocks["test"], blocks["train"], weights), axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(np.load(tmp_path / "UP.NPZ")["proponents_indices"], expected)
    assert main(_score(paths, "-k", "3", "-o", "UP.CSV")) == 0
    assert (tmp_path / "UP.CSV").read_text().splitlines()[0] == ",".join(PAIRS_HEADER)
    assert main(["self-influence", str(paths["train"]), "-o", "R.Csv"]) == 0
    assert len((tmp_path / "R.Csv").read_text().splitlines()) == 41


def test_output_ending_in_a_separator_or_a_link_loop_is_refused_before_scoring(stores, tmp_path, capsys, monkeypatch):
    """As writing would refuse them (a name ending in '/' names a folder; a loop never ends), not
    written as the name without the '/' nor refused only after scoring."""
    paths, _, _ = stores

    def never(*args, **kwargs):
        raise AssertionError("scored before --output was checked")

    monkeypatch.setattr(tracin, "self_influence", never)
    (tmp_path / "loopA.csv").symlink_to("loopB.csv")
    (tmp_path / "loopB.csv").symlink_to("loopA.csv")
    (tmp_path / "existing.csv").write_text("keep\n")
    for output, message, code in (
        (f"{tmp_path}/new.csv/", f"--output: {tmp_path}/new.csv/ ends in '/', which names a folder", 2),
        (f"{tmp_path}/existing.csv/", f"--output: {tmp_path}/existing.csv/ ends in '/', which names a folder", 2),
        (".", "--output: . ends in '.', which names a folder", 2),  # review109 F2: it said "got ''"
        ("..", "--output: .. ends in '..', which names a folder", 2),
        (f"{tmp_path}/new.csv/.", f"--output: {tmp_path}/new.csv/. ends in '.', which names a folder", 2),
        (
            str(tmp_path / "loopA.csv"),
            f"--output: cannot write {tmp_path / 'loopA.csv'}: more than 40 symbolic links",
            1,
        ),
    ):
        assert main(["self-influence", str(paths["train"]), "-o", output]) == code
        assert message in _error_line(capsys.readouterr().err, "self-influence")
    assert (tmp_path / "existing.csv").read_text() == "keep\n" and not (tmp_path / "new.csv").exists()


def test_malformed_stores_are_one_line_errors(stores, tmp_path, capsys):
    from tracin.store._format import MANIFEST

    paths, _, _ = stores
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["info", str(empty)]) == 1
    assert MANIFEST in _error_line(capsys.readouterr().err, "info")
    (paths["train"] / MANIFEST).write_text("{not json")
    for command in (["info", str(paths["train"])], _score(paths), ["self-influence", str(paths["train"])]):
        assert main(command) == 1
        assert "corrupt manifest" in _error_line(capsys.readouterr().err, command[0])


def test_every_store_that_does_not_open_is_named_by_its_option(stores, tmp_path, capsys, monkeypatch):
    # only a missing path named the option; a file, an empty folder, a truncated store and '' did not
    paths, _, _ = stores
    (tmp_path / "afile").write_text("x")
    (tmp_path / "emptydir").mkdir()
    truncated = _write_store(tmp_path / "truncated", [np.zeros((50, 8), np.float32)], [1.0])
    data = next(truncated.glob("*.npy"))
    data.write_bytes(data.read_bytes()[:500])
    monkeypatch.chdir(paths["train"])  # '' would open the store here
    for bad, message in (
        (tmp_path / "afile", "(not a directory)"),
        (tmp_path / "emptydir", "(no manifest.json)"),
        (truncated, "malformed gradient store: "),
        ("", "expected a gradient store folder, got ''"),
    ):
        for command, option in (
            (["score", "--test", str(bad), "--train", str(paths["train"])], "--test"),
            (["score", "--test", str(paths["test"]), "--train", str(bad)], "--train"),
            (["self-influence", str(bad)], "path"),
        ):
            assert main(command) == (2 if bad == "" else 1)  # '' is a usage error, whatever the files
            line = _error_line(capsys.readouterr().err, command[0])
            assert line.startswith(f"tracin {command[0]}: error: {option}: ") and message in line, line
    assert main(["info", ""]) == 2
    assert "expected a gradient store folder, got ''" in _error_line(capsys.readouterr().err, "info")


def test_a_store_recreated_while_scoring_is_named_as_changed(stores, monkeypatch, capsys):
    paths, _, _ = stores
    real = tracin.top_k

    def recreate_then_score(test, train, **kwargs):
        n, dims = train.n_rows, [int(d) for d in train.dims]
        tracin.GradientStore.create(paths["train"], n, dims, overwrite=True).close()
        return real(test, train, **kwargs)

    monkeypatch.setattr(tracin, "top_k", recreate_then_score)
    assert main(_score(paths)) == 1
    assert "gradient store changed while reading" in _error_line(capsys.readouterr().err, "score")


def test_a_failed_read_of_a_stores_ids_names_the_store_not_the_output(stores, tmp_path, monkeypatch, capsys):
    # review5 F2: score read the stores' ids inside the -o block, so an OSError reading them was reported as
    # "--output: cannot write OUT: Stale file handle"
    import errno

    import tracin.store._store as store_module

    paths, _, _ = stores
    map_array = store_module.map_array

    def stale_after_opening(scoring):
        def score(*args, **kwargs):
            result = scoring(*args, **kwargs)

            def stale(fd, dtype, offset, shape, path):  # the train store's ids file, replaced on an NFS server
                if path.name == "ids.npy" and "train" in str(path):  # since it was opened
                    raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), str(path))
                return map_array(fd, dtype, offset, shape, path)

            monkeypatch.setattr(store_module, "map_array", stale)
            return result

        return score

    said = f"cannot read the ids of gradient store {paths['train']}: {os.strerror(errno.ESTALE)}"
    out = tmp_path / "out.csv"
    for command, option, library in (
        (_score(paths, "-o", str(out)), "--train", "top_k"),
        (_score(paths), "--train", "top_k"),
        (["self-influence", str(paths["train"]), "-o", str(out)], "path", "self_influence"),
        (["self-influence", str(paths["train"])], "path", "self_influence"),
    ):
        monkeypatch.setattr(tracin, library, stale_after_opening(getattr(tracin, library)))
        assert main(command) == 1
        monkeypatch.undo()
        captured = capsys.readouterr()
        line = _error_line(captured.err, command[0])
        assert (line, captured.out) == (f"tracin {command[0]}: error: {option}: {said}", ""), command
        assert not out.exists()


def test_ids_utf8_cannot_encode_are_refused_naming_file_and_row_before_any_output(
    stores, tmp_path, capsys, monkeypatch
):
    # review58 N3: a store whose ids.npy held a lone surrogate (written by other code) made score / self-influence
    # fail with "'utf-8' codec can't encode character '\\ud800'", naming no file or row, after part of the CSV
    paths, _, _ = stores
    ids = np.load(paths["train"] / "ids.npy")
    ids[7] = "x\ud800y"
    np.save(paths["train"] / "ids.npy", ids)
    bad = "ids[7] = 'x\\ud800y' holds a lone surrogate (U+D800)"
    said = f"malformed gradient store: {paths['train'] / 'ids.npy'}: {bad}"
    out = tmp_path / "out.csv"
    for command, option in (
        (_score(paths, "-o", str(out)), "--train"),
        (_score(paths), "--train"),
        (["score", "--test", str(paths["train"]), "--train", str(paths["test"])], "--test"),
        (["self-influence", str(paths["train"]), "-o", str(out)], "path"),
        (["self-influence", str(paths["train"])], "path"),
    ):
        assert main(command) == 1
        captured = capsys.readouterr()
        line = _error_line(captured.err, command[0])
        assert line.startswith(f"tracin {command[0]}: error: {option}: {said}, which UTF-8"), line
        assert captured.out == "" and not out.exists(), command
    # on a pipe, where the rows before the bad id used to be written
    done = subprocess.run(
        [sys.executable, "-m", "tracin", "self-influence", str(paths["train"])], capture_output=True, timeout=120
    )
    assert (done.returncode, done.stdout) == (1, b"")
    assert f"path: {said}".encode() in done.stderr

    # ids changed to such an id after the store was opened (while scoring): named as changed, still no output
    np.save(paths["train"] / "ids.npy", np.array([f"train-{i}" for i in range(40)]))
    real = tracin.self_influence

    def plant_then_score(*args, **kwargs):
        np.save(paths["train"] / "ids.npy", ids)
        return real(*args, **kwargs)

    monkeypatch.setattr(tracin, "self_influence", plant_then_score)
    assert main(["self-influence", str(paths["train"])]) == 1
    captured = capsys.readouterr()
    line = _error_line(captured.err, "self-influence")
    assert bad in line and "valid when the gradient store was opened" in line
    assert captured.out == ""


def test_broken_pipe_ends_quietly(stores):
    paths, _, _ = stores
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written, as with `| head -0`
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tracin", "info", str(paths["train"])],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")


def test_demo_framework_not_installed_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "jax", None)  # as if JAX were not installed
    assert main(["demo", "--framework", "jax", "--no-progress", "-o", str(tmp_path / "out")]) == 1
    assert "pip install 'tracin[jax]'" in _error_line(capsys.readouterr().err, "demo")


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_demo_framework_failing_to_import_names_its_own_extra(framework, tmp_path, monkeypatch, capsys):
    # review69 F1: an import of the framework that fails with ModuleNotFoundError (a broken install, jax without
    # jaxlib) was sent to 'tracin[demo]', which installs neither torch nor jax
    class Missing:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == framework:
                raise ModuleNotFoundError(f"No module named {framework!r}", name=framework)

    monkeypatch.setattr(sys, "meta_path", [Missing(), *sys.meta_path])
    for name in [m for m in sys.modules if m.partition(".")[0] == framework]:
        monkeypatch.delitem(sys.modules, name)
    assert main(["demo", "--framework", framework, "--no-progress", "-o", str(tmp_path / "out")]) == 1
    line = _error_line(capsys.readouterr().err, "demo")
    assert f"pip install 'tracin[{framework}]'" in line and "tracin[demo]" not in line, line
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_demo_help_names_the_framework_extras(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "'tracin[torch]'" in text and "'tracin[jax]'" in text


# -- help ----------------------------------------------------------------------------------------
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_console_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "tracin", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in ("info", "score", "self-influence", "bench", "demo", "examples:"):
        assert command in out.stdout


def test_version_names_the_package_version_and_the_kernel_instruction_set():
    out = subprocess.run([sys.executable, "-m", "tracin", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"tracin {tracin.__version__} (kernel: {tracin.detect_isa()})\n"
    assert tracin.detect_isa() in ("avx512", "avx2", "generic")
    # review237 F2: one version, src/tracin/__init__.py's, which the wheel's metadata is built from
    assert importlib.metadata.version("tracin") == tracin.__version__


def test_help_shows_every_default_and_no_internal_references(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside the defaults
    for name, parser in _subparsers().items():
        text = " ".join(parser.format_help().split())
        assert not re.search(r"\bissue\s*#?\d", text, re.IGNORECASE), (name, text)
        for action in parser._actions:
            if (
                action.option_strings
                and not isinstance(action.default, bool)
                and action.default is not None
                and action.default != argparse.SUPPRESS
            ):
                assert f"(default: {action.default})" in text, (name, action.dest)


def test_score_side_help_says_what_the_sides_list(tmp_path, monkeypatch, capsys):
    # review48 F4: the help said "opponents: most negative first", but a side lists the k lowest (highest)
    # scores, including scores of 0 or of the other sign when fewer than k have its sign
    rows = np.array([[1, 0], [1, 0.1], [-1, 0]], np.float32)
    store = _write_store(tmp_path / "s", [rows], [1.0])
    assert main(["score", "--test", str(store), "--train", str(store), "-k", "2", "--side", "both"]) == 0
    listed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    scores = rows.astype(np.float64) @ rows.astype(np.float64).T
    for side, sign in (("proponents", -1), ("opponents", 1)):  # sorted as the side ranks them
        got = [(int(r["test_row"]), int(r["train_row"])) for r in listed if r["side"] == side]
        assert got == [(t, int(i)) for t in range(3) for i in np.argsort(sign * scores[t], kind="stable")[:2]]
    opponents = [float(r["influence"]) for r in listed if r["side"] == "opponents"]
    assert max(opponents) > 0  # an opponent not of negative score, as the help now says
    monkeypatch.setenv("COLUMNS", "400")
    text = " ".join(_subparsers()["score"].format_help().split())
    assert (
        "proponents: the k highest scores, largest first; opponents: the k lowest, most negative first (when "
        "fewer than k scores have a side's sign, it also lists scores of 0 or of the other sign)"
    ) in text


def test_score_defaults_are_the_librarys():
    library = inspect.signature(tracin.top_k).parameters
    score = _subparsers()["score"]
    defaults = {a.dest: a.default for a in score._actions}
    assert defaults["side"] == library["side"].default == "proponents"
    assert defaults["k"] == library["k"].default


# -- bench ---------------------------------------------------------------------------------------
def test_bench_runs_without_the_bench_extra_or_the_checkout(monkeypatch, capsys):
    for module in ("faiss", "torch", "matplotlib", "threadpoolctl", "benchmarks", "benchmarks.kernel"):
        monkeypatch.setitem(sys.modules, module, None)  # any import of these fails
    assert main(["bench", "--quick", "-n", "3000", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"tracin is \d+\.\d\dx the speed of NumPy", out) and "matches float64" in out
    assert "python -m benchmarks.kernel" in out


def test_bench_says_the_k_and_the_threads_it_ran_with(monkeypatch, capsys):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)  # 3 of 64 cores
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    used = []
    top_k = tracin.top_k
    monkeypatch.setattr(tracin, "top_k", lambda *a, num_threads, **kw: used.append(num_threads) or top_k(*a, **kw))
    assert main(["bench", "--quick", "-n", "5", "--repeats", "1"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("top-5 (k=10 capped at the train rows) proponents of 64 test rows among 5 train rows")
    assert "tracin on 3 thread(s)" in header and set(used) == {3}
    used.clear()
    assert main(["bench", "--quick", "-n", "50", "--repeats", "1", "--threads", "2"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("top-10 proponents of") and "tracin on 2 thread(s)" in header and set(used) == {2}


def test_bench_threads_beyond_the_usable_cores_say_and_record_the_threads_that_ran(monkeypatch, capsys):
    # review1 F1: `--threads 64` on 3 usable cores printed and recorded 64 while the kernel ran on 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    used = []
    top_k = tracin.top_k
    monkeypatch.setattr(tracin, "top_k", lambda *a, num_threads, **kw: used.append(num_threads) or top_k(*a, **kw))
    assert main(["bench", "--quick", "-n", "50", "--repeats", "1", "--threads", "64"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "tracin on 3 thread(s) (64 asked, capped at the 3 usable core(s))," in header and set(used) == {3}
    result = selfbench.run(selfbench.BenchConfig(m=4, n=100, d=8, repeats=1, threads=64))
    assert result.threads == 3 and result.exact
    assert selfbench.threads(selfbench.BenchConfig(threads=2)) == 2  # fewer than usable: as asked
    assert "asked" not in selfbench.problem(selfbench.BenchConfig(threads=3))


def test_threads_beyond_tracins_bound_are_a_usage_error_naming_the_option(capsys):
    # `tracin bench --threads 9999` said "num_threads must be ...", the library's name, after parsing
    from tracin import cli
    from tracin._validate import MAX_THREADS, thread_count

    assert cli.MAX_THREADS is MAX_THREADS  # one constant, not a copy
    assert thread_count(MAX_THREADS) == MAX_THREADS  # the option's bound is the library's
    with pytest.raises(ValueError, match="no larger than"):
        thread_count(MAX_THREADS + 1)
    for command in (["bench", "--quick"], ["self-influence", "x"], ["score", "--test", "a", "--train", "b"]):
        with pytest.raises(SystemExit) as e:
            main([*command, "--threads", str(MAX_THREADS + 1)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "num_threads" not in err
        assert f"argument --threads: expected a positive integer no larger than {MAX_THREADS}, got '4097'" in err


def test_bench_says_what_it_times_before_timing(monkeypatch, capsys):
    # it printed nothing until every timing had run (34 s silent at -n 1000000)
    seen = []

    def recorded(name, fn):
        def call(*args, **kwargs):
            seen.append((name, *capsys.readouterr()))  # what was printed since the call before
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(tracin, "top_k", recorded("tracin", tracin.top_k))
    monkeypatch.setattr(selfbench, "numpy_top_k", recorded("numpy", selfbench.numpy_top_k))
    assert main(["bench", "--quick", "-n", "500", "--repeats", "2"]) == 0
    out, err = capsys.readouterr()
    assert [name for name, *_ in seen] == ["tracin"] * 4 + ["numpy"] * 3  # check, warm-up, 2 timed; NumPy's
    assert seen[0][1].startswith("top-10 proponents of 64 test rows among 500 train rows, d=64")
    assert "generating the data (64 + 500 rows of 64 float32)" in seen[0][2]
    assert "checking tracin's top-k against float64" in seen[0][2]
    assert seen[1][1:] == ("", "  timing tracin.top_k: a warm-up and 2 timed call(s) ...\n")
    assert seen[4][1:] == ("", "  timing NumPy: a warm-up and 2 timed call(s) ...\n")
    assert all(o == e == "" for _, o, e in seen[2:4] + seen[5:])  # nothing between one timing's calls
    assert out.startswith("  tracin.top_k") and "matches float64" in out and err == ""


def test_an_error_caused_by_ctrl_c_is_reported_as_the_interrupt(monkeypatch, capsys):
    # pybind11 turns a Ctrl-C while the C++ extension initialises into ImportError('initialization
    # failed'), which ended `tracin demo` with a traceback and exit code 1
    import tracin.cli

    def interrupted(wrap, signal_exception=KeyboardInterrupt):
        def command(args):
            try:
                raise signal_exception()
            except BaseException as e:
                wrap(e)

        return command

    def from_import(e):
        raise ImportError("initialization failed") from e

    def guarded(e):  # as cmd_demo's guard turns an ImportError into a CommandError
        try:
            from_import(e)
        except ImportError as error:
            raise tracin.cli.CommandError("the demo needs the demo extra") from error

    def while_unwinding(e):
        raise OSError("cleanup failed")

    def other_cause(e):  # an unrelated cause, the Ctrl-C only in the context: both links are followed
        raise ValueError("x") from OSError("y")

    for wrap, then in (
        (from_import, "initialization failed"),
        (guarded, "initialization failed"),  # the error the Ctrl-C caused, not the guard's advice
        (while_unwinding, "cleanup failed"),
        (other_cause, "x"),
    ):
        monkeypatch.setattr(tracin.cli, "cmd_info", interrupted(wrap))
        assert main(["info", "x"]) == 130
        assert capsys.readouterr().err == f"tracin info: interrupted (then: {then})\n"
    terminated = interrupted(guarded, lambda: tracin.cli._Terminated(signal.SIGTERM))
    monkeypatch.setattr(tracin.cli, "cmd_info", terminated)  # SIGTERM: was exit 1, "needs the demo extra"
    assert main(["info", "x"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "tracin info: terminated (SIGTERM) (then: initialization failed)\n"

    def jax_traceback(args):  # JAX re-raises a KeyboardInterrupt from an UnfilteredStackTrace of it
        raise KeyboardInterrupt from RuntimeError("KeyboardInterrupt The preceding stack trace is the source")

    monkeypatch.setattr(tracin.cli, "cmd_info", jax_traceback)
    assert main(["info", "x"]) == 130 and capsys.readouterr().err == "tracin info: interrupted\n"
    monkeypatch.setattr(tracin.cli, "cmd_info", lambda args: from_import(None))  # no Ctrl-C: an error
    with pytest.raises(ImportError, match="initialization failed"):
        main(["info", "x"])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_whose_exception_is_swallowed_is_still_reported(monkeypatch, capsys, signum, signals_as_in_a_terminal):
    # JAX's gc callback swallows a KeyboardInterrupt raised in it: `tracin demo --framework jax` ran on
    # to the end after Ctrl-C and exited 0
    import tracin.cli

    what = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
    ran = []

    def swallowing(then):
        def command(args):
            try:
                signal.raise_signal(signum)
            except BaseException:
                pass
            ran.append("on")
            then()

        return command

    monkeypatch.setattr(tracin.cli, "cmd_info", swallowing(lambda: print("the output")))
    assert main(["info", "x"]) == 128 + signum and ran == ["on"]
    # not "the previous file is kept": the command wrote its output (an -o file is replaced)
    assert capsys.readouterr() == ("the output\n", f"tracin info: {what}, but it ran to the end (output written)\n")

    def fail():
        raise ValueError("a later error")

    monkeypatch.setattr(tracin.cli, "cmd_info", swallowing(fail))
    assert main(["info", "x"]) == 128 + signum
    assert capsys.readouterr().err == f"tracin info: {what} (then: a later error)\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("pthread_kill", [True, False])  # Windows has none: _thread.interrupt_main instead
def test_a_signal_swallowed_where_python_only_prints_it_is_raised_again(
    monkeypatch, capsys, signals_as_in_a_terminal, pthread_kill
):
    # as in a gc callback or __del__: Python prints 'Exception ignored in ...' and goes on
    import tracin.cli

    if not pthread_kill:
        monkeypatch.delattr(signal, "pthread_kill")

    class SignalledOnCollection:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    steps = []

    def command(args):
        SignalledOnCollection()  # collected at once: the KeyboardInterrupt is raised in __del__
        for step in range(1000):  # 10 s unless the interrupt is raised again here
            time.sleep(0.01)
            steps.append(step)

    hook = sys.unraisablehook
    monkeypatch.setattr(tracin.cli, "cmd_info", command)
    assert main(["info", "x"]) == 130
    assert len(steps) < 100 and capsys.readouterr().err == "tracin info: interrupted\n"
    assert sys.unraisablehook is hook and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_raised_again_wakes_a_blocking_wait(monkeypatch, capsys, signals_as_in_a_terminal):
    # Dask's client blocks the main thread in lock waits, which a pending-signal flag alone does not wake
    import tracin.cli

    class SignalledOnCollection:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    waited = []

    def command(args):
        SignalledOnCollection()
        threading.Event().wait(10)  # never set: only the interrupt raised again ends it early
        waited.append("to the end")

    monkeypatch.setattr(tracin.cli, "cmd_info", command)
    start = time.monotonic()
    assert main(["info", "x"]) == 130
    assert time.monotonic() - start < 5 and waited == []  # 10 s with _thread.interrupt_main
    assert capsys.readouterr().err == "tracin info: interrupted\n"


@pytest.mark.parametrize("closed", ["stdout", "stderr"])
def test_a_signal_is_reported_by_its_exit_code_where_a_stream_was_closed_at_start(monkeypatch, closed):
    # `tracin ... 2>&-` (a daemon, cron): Python sets that stream to None
    import tracin.cli

    def command(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tracin.cli, "cmd_info", command)
    monkeypatch.setattr(sys, closed, None)
    assert main(["info", "x"]) == 130


@pytest.mark.parametrize("swallowed", [False, True])  # unwinds, or runs on to the failing flush of stdout
def test_a_hangup_with_the_terminal_gone_still_exits_129(swallowed):
    script = f"""
import os, signal, sys, time, tracin.cli as cli
signal.signal(signal.SIGHUP, signal.SIG_DFL)
def command(args):
    print("buffered output")
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(10)
    except BaseException:
        if not {swallowed}:
            raise
cli.cmd_info = command
sys.exit(cli.main(["info", "x"]))
"""
    read, write = os.pipe()
    os.close(read)  # the terminal is gone: every write fails with EPIPE
    try:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # the output stays buffered
        done = subprocess.run([sys.executable, "-c", script], stdout=write, stderr=write, env=env, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 128 + signal.SIGHUP  # was 1 or 120 (printing the message raised EPIPE), and 141


def test_bench_sizes_beyond_memory_are_refused_naming_the_options(monkeypatch, capsys):
    import tracin.cli

    def never(config):
        raise AssertionError("generated a problem that does not fit")

    monkeypatch.setattr(selfbench, "run", never)
    monkeypatch.setattr(tracin.cli, "process_memory", lambda: 2**30)  # a process allowed 1 GiB
    for sizes in (["-n", str(10**20)], ["--quick", "-d", str(10**13)], ["--quick", "-m", str(10**8), "-d", "1"]):
        assert main(["bench", *sizes]) == 1
        line = _error_line(capsys.readouterr().err, "bench")
        assert "GiB of memory" in line
        assert "more than the 1.0 GiB this process may use (physical memory, cgroup limit, ulimit -v); give" in line
    assert main(["bench", "--quick", "-n", str(3 * 10**6)]) == 1  # 2.1 GiB with d=64
    assert "-n 3000000 -d 64" in _error_line(capsys.readouterr().err, "bench")


def test_bench_never_imports_the_source_tree():
    code = (
        "import sys, tracin.cli; tracin.cli.main(['bench', '--quick', '-n', '2000', '--repeats', '1']); "
        "print('imported benchmarks' if 'benchmarks' in sys.modules else 'clean')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=CHECKOUT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("clean")


def test_selfbench_numpy_top_k_is_the_float64_top_k(rng):
    test = rng.standard_normal((300, 16)).astype(np.float32)
    train = rng.standard_normal((500, 16)).astype(np.float32)
    values, indices = selfbench.numpy_top_k(test, train, 7)
    exact = test.astype(np.float64) @ train.astype(np.float64).T
    np.testing.assert_array_equal(indices, np.argsort(-exact, axis=1, kind="stable")[:, :7])
    np.testing.assert_allclose(values, np.take_along_axis(exact, indices, 1), rtol=1e-5, atol=1e-5)


def test_selfbench_check_rejects_a_wrong_top_k(rng):
    test = rng.standard_normal((40, 8)).astype(np.float32)
    train = rng.standard_normal((200, 8)).astype(np.float32)
    exact = test.astype(np.float64) @ train.astype(np.float64).T
    indices = np.argsort(-exact, axis=1)[:, :5]
    values = np.take_along_axis(exact, indices, 1).astype(np.float32)
    assert selfbench.matches_float64(test, train, 5, values, indices)
    assert selfbench.matches_float64(test, train, 500, *_float64_top_k(exact, 200))  # k > n: all n rows

    def wrong(values: np.ndarray, indices: np.ndarray) -> bool:
        return not selfbench.matches_float64(test, train, 5, values, indices)

    worse = indices.copy()
    worse[0, 4] = np.argmin(exact[0])  # the worst row in the k-th place, reported with its true score
    assert wrong(np.take_along_axis(exact, worse, 1).astype(np.float32), worse)
    shifted = values.copy()
    shifted[0, 2] += 0.01  # the right row with a wrong value
    assert wrong(shifted, indices)
    nan = values.copy()
    nan[0, 3] = np.nan
    assert wrong(nan, indices)
    repeated = np.repeat(indices[:, :1], 5, axis=1)  # the best row k times
    assert wrong(np.take_along_axis(exact, repeated, 1).astype(np.float32), repeated)
    assert wrong(values[:, ::-1], indices[:, ::-1])  # the right rows, smallest first
    assert wrong(values[:, :4], indices[:, :4])  # k - 1 columns
    second = indices.copy()
    second[:, 4] = np.argsort(-exact, axis=1)[:, 6]  # a 7th row where the 5th belongs, in order
    assert wrong(np.take_along_axis(exact, second, 1).astype(np.float32), second)
    late = indices.copy()
    late[39, 4] = np.argmin(exact[39])  # in the last test row: not only the first rows are checked
    assert wrong(np.take_along_axis(exact, late, 1).astype(np.float32), late)


def test_selfbench_check_takes_a_near_tie_chosen_either_way():
    """A row left out that beats the chosen one by less than twice the bound (1.5e-5 of 1): float32 rounding may
    order such near ties either way, and the check takes it (docstring: more than twice that bound fails)."""
    test = np.array([[1.0, 0.0]], np.float32)
    train = np.array([[1.0, 0.0], [1.0 + 1.5e-5, 0.0], [0.5, 0.0]], np.float32)
    assert selfbench.matches_float64(test, train, 1, np.array([[1.0]], np.float32), np.array([[0]]))
    far = np.array([[1.0, 0.0], [1.0 + 3e-5, 0.0], [0.5, 0.0]], np.float32)  # beyond twice the bound: wrong
    assert not selfbench.matches_float64(test, far, 1, np.array([[1.0]], np.float32), np.array([[0]]))


def _float64_top_k(exact: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    indices = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(exact, indices, 1).astype(np.float32), indices


@pytest.mark.parametrize("m, n, d, k", [(48, 60_000, 40, 10), (8, 100_000, 256, 10), (256, 50_000, 16, 1000)])
def test_bench_memory_estimate_covers_what_numpy_allocates(m, n, d, k):
    config = selfbench.BenchConfig(m=m, n=n, d=d, k=k, repeats=1)
    tracemalloc.start()  # NumPy's arrays are traced; tracin's C++ kernel holds only its (m, k) results
    try:
        selfbench.run(config)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= tracin.cli._bench_bytes(config)


# -- on a Dask cluster ---------------------------------------------------------------------------
def test_scheduler_local_gives_the_local_results(stores, tmp_path):
    pytest.importorskip("distributed")
    paths, blocks, weights = stores
    local, spread = tmp_path / "local.npz", tmp_path / "spread.npz"
    white, _ = _saved_whitening(tmp_path / "white.npz", tracin.Gradients(blocks["train"], weights))
    whitened = ("-k", "5", "--side", "both", "--whitening", str(white), "-o")
    assert main(_score(paths, "-k", "5", "--side", "both", "-o", str(local))) == 0
    assert main(_score(paths, "-k", "5", "--side", "both", "--normalize", "-o", str(tmp_path / "cos-local.npz"))) == 0
    assert main(_score(paths, *whitened, str(tmp_path / "white-local.npz"))) == 0
    cli = [sys.executable, "-m", "tracin"]  # as a user runs it: the spawned workers import __main__ again
    for command in (
        _score(paths, "-k", "5", "--side", "both", "-o", str(spread)),
        _score(paths, "-k", "5", "--side", "both", "--normalize", "-o", str(tmp_path / "cos-spread.npz")),
        _score(paths, *whitened, str(tmp_path / "white-spread.npz")),  # the whitened test rows sent to the workers
        ["self-influence", str(paths["train"]), "-o", str(tmp_path / "rank.csv")],
    ):
        done = subprocess.run(
            [*cli, *command, "--scheduler", "local", "--workers", "2"], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        assert "LocalCluster of 2 workers" in done.stderr and "wrote" in done.stderr
    for got, expected in (
        (np.load(spread), np.load(local)),
        (np.load(tmp_path / "cos-spread.npz"), np.load(tmp_path / "cos-local.npz")),
        (np.load(tmp_path / "white-spread.npz"), np.load(tmp_path / "white-local.npz")),
    ):
        assert sorted(got.files) == sorted(expected.files)
        for name in expected.files:
            np.testing.assert_array_equal(got[name], expected[name])
    got = np.load(spread)
    exact = exact_scores(blocks["test"], blocks["train"], weights)
    np.testing.assert_array_equal(got["proponents_indices"], np.argsort(-exact, axis=1)[:, :5])
    rows = list(csv.DictReader(open(tmp_path / "rank.csv")))
    self_exact = sum(w * (b.astype(np.float64) ** 2).sum(1) for w, b in zip(weights, blocks["train"], strict=True))
    assert [int(r["train_row"]) for r in rows] == list(np.argsort(-self_exact))
    np.testing.assert_allclose([float(r["self_influence"]) for r in rows], np.sort(self_exact)[::-1], rtol=1e-6)


def test_scheduler_options_misused_are_one_line(stores, capsys, monkeypatch):
    pytest.importorskip("distributed")
    import tracin.cli

    paths, _, _ = stores
    assert main(_score(paths, "--workers", "2")) == 2  # usage errors
    assert "--workers needs --scheduler local" in _error_line(capsys.readouterr().err, "score")
    assert main(["self-influence", str(paths["train"]), "--scheduler", "tcp://127.0.0.1:1", "--workers", "2"]) == 2
    assert "needs --scheduler local, not tcp://127.0.0.1:1" in _error_line(capsys.readouterr().err, "self-influence")
    monkeypatch.setattr(tracin.cli, "SCHEDULER_TIMEOUT_S", 1)
    # review108 F4: '' was tried as an address ("cannot connect to a Dask scheduler at  (missing port ...)")
    for command, name in ((_score(paths), "score"), (["self-influence", str(paths["train"])], "self-influence")):
        assert main([*command, "--scheduler", ""]) == 2
        assert _error_line(capsys.readouterr().err, name) == (
            f"tracin {name}: error: --scheduler: expected a scheduler's address or local, got ''"
        )
    assert main(_score(paths, "--scheduler", "tcp://127.0.0.1:1")) == 1
    line = _error_line(capsys.readouterr().err, "score")
    assert "--scheduler: cannot connect to a Dask scheduler at tcp://127.0.0.1:1" in line
    with pytest.raises(SystemExit, match="2"):  # argparse: a usage error
        main(_score(paths, "--workers", "0"))
    assert "argument --workers: expected a positive integer no larger than" in capsys.readouterr().err


def test_workers_beyond_four_per_usable_core_are_a_usage_error(monkeypatch, capsys):
    """review152 F1: --workers 100000 (a typo) sat in Dask's LocalCluster setup for good, its memory growing
    and Ctrl-C ignored: refused by argparse (exit code 2) above 4 workers per usable core."""
    import tracin.cli

    monkeypatch.setattr(tracin.cli, "usable_cores", lambda: 3)
    parser = build_parser()
    command = ["score", "--test", "t", "--train", "r", "--scheduler", "local", "--workers"]
    assert parser.parse_args([*command, "12"]).workers == 12
    for value in ("13", "100000"):
        with pytest.raises(SystemExit, match="2"):
            parser.parse_args([*command, value])
        message = "argument --workers: expected a positive integer no larger than 12 (4 per usable core, 3 here)"
        assert f"{message}, got '{value}'" in capsys.readouterr().err


def test_workers_that_keep_dying_are_one_line(stores, capsys, monkeypatch):
    pytest.importorskip("distributed")
    import contextlib

    import tracin.distributed as td
    import tracin.distributed._cluster

    paths, _, _ = stores
    died = td.TaskFailedError("tracin.distributed top_k: the task on rows [0, 40) of train failed because ...")
    monkeypatch.setattr(tracin.distributed._cluster, "local_client", lambda n: contextlib.nullcontext("client"))

    def fail(*args, **kwargs):
        assert kwargs["client"] == "client"
        raise died

    for name in ("top_k", "self_influence"):
        monkeypatch.setattr(td, name, fail)
    for command in (
        _score(paths, "--scheduler", "local"),
        ["self-influence", str(paths["train"]), "--scheduler", "local"],
    ):
        assert main(command) == 1
        line = _error_line(capsys.readouterr().err, command[0])
        assert line.endswith(": error: tracin.distributed top_k: the task on rows [0, 40) of train failed because ...")


# -- progress bars -------------------------------------------------------------------------------
def test_bar_over_passes_counts_examples_not_examples_times_passes(capsys):
    bar = _progress.progress_bar(500, True, "export", passes=3)
    for _ in range(7):
        bar.update(200)  # counts cross pass boundaries
    bar.update(100)
    bar.close()
    err = capsys.readouterr().err
    assert "500/500" in err and "checkpoint 3/3" in err
    assert not re.search(r"/(1500|1\.5k|1\.50k)\b", err)  # no total of 1500 (examples x passes)


def test_automatic_bar_appears_only_after_the_delay(capsys, monkeypatch, terminal):
    bar = _progress.progress_bar(10, None, "quick work")
    bar.update(10)
    bar.close()
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(_progress, "AUTO_DELAY_S", 0.05)
    bar = _progress.progress_bar(10, None, "slow work")
    time.sleep(0.1)
    bar.update(10)
    bar.close()
    assert "slow work" in capsys.readouterr().err


def test_bar_of_whole_units_without_unit_scale(capsys):
    for scaled in (True, False):
        bar = _progress.progress_bar(6, True, "shards", unit="shard", unit_scale=scaled)
        bar.update(6)
        bar.close()
    err = capsys.readouterr().err
    assert "6.00/6.00" in err  # scaled counts get decimals ...
    assert re.search(r"\| 6/6 \[", err)  # ... whole units do not


def test_output_through_a_link_to_stdout_writes_to_the_pipe(stores, tmp_path):
    """-o a link to /dev/stdout with stdout a pipe: written to the pipe (it was refused: a new file was
    looked for in /proc/PID/fd, where the link leads)."""
    paths, blocks, weights = stores
    rank = ["self-influence", str(paths["train"]), "--top", "3", "-o"]
    expected = tmp_path / "expected.csv"
    assert main([*rank, str(expected)]) == 0
    link = tmp_path / "so.csv"
    link.symlink_to("/dev/stdout")
    command = [sys.executable, "-m", "tracin", *rank, str(link)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    # review108 F3: the "wrote so.csv" summary went to stdout, a last row of the CSV there: now on stderr
    assert done.returncode == 0 and done.stdout == expected.read_text(), done.stderr
    assert done.stderr == f"self-influence of 40 rows, 3 ranked: wrote {link}\n"
    npz = tmp_path / "so.npz"
    npz.symlink_to("/dev/stdout")
    done = subprocess.run(
        [sys.executable, "-m", "tracin", *_score(paths, "-k", "2", "-o", str(npz))], capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert b"wrote" not in done.stdout and done.stderr.decode().endswith(f": wrote {npz}\n")
    exact = exact_scores(blocks["test"], blocks["train"], weights)
    got = np.load(io.BytesIO(done.stdout))["proponents_indices"]
    np.testing.assert_array_equal(got, np.argsort(-exact, axis=1)[:, :2])


def test_output_inside_a_gradient_store_is_refused_before_scoring(stores, tmp_path, capsys, monkeypatch):
    """A results file among a store's files would make the store refuse to be written again (review24
    F1): refused, in the store's folder or any folder below it, before anything is scored."""
    paths, _, _ = stores
    monkeypatch.setattr(tracin, "top_k", lambda *a, **k: pytest.fail("scored before --output was checked"))
    (paths["train"] / "sub").mkdir()
    for output in (paths["train"] / "top.csv", paths["train"] / "sub" / "top.npz"):
        assert main(_score(paths, "-o", str(output))) == 1
        line = _error_line(capsys.readouterr().err, "score")
        assert f"--output: {output} is inside the gradient store {paths['train']}" in line
        assert not output.exists()


def test_an_output_the_system_refuses_says_why(stores, tmp_path, capsys, monkeypatch):
    """The system's reason (here a read-only file system, faked), not a fixed "permission denied"
    (review24 F2), for a new file in a folder and for an existing file."""
    import errno

    paths, _, _ = stores
    existing = tmp_path / "old.csv"
    existing.write_text("old\n")

    real_open, real_mkstemp = os.open, tempfile.mkstemp

    def refused(where) -> bool:
        if Path(where) in (tmp_path, existing):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return False

    monkeypatch.setattr(os, "open", lambda path, *a, **k: refused(path) or real_open(path, *a, **k))
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, dir=None, **k: refused(dir) or real_mkstemp(*a, dir=dir, **k))
    for output in (tmp_path / "new.csv", existing):
        assert main(_score(paths, "-o", str(output))) == 1
        line = _error_line(capsys.readouterr().err, "score")
        assert line.endswith(os.strerror(errno.EROFS) + ")"), line
    assert existing.read_text() == "old\n"


def test_a_fifo_named_manifest_above_the_output_is_not_read(stores, tmp_path):
    """Looking for a store above --output reads only regular manifest files: a FIFO named
    manifest.json (nothing writing to it) is passed over, not waited on forever (review25 F1)."""
    paths, _, _ = stores
    folder = tmp_path / "results"
    folder.mkdir()
    os.mkfifo(folder / "manifest.json")
    codes: list[int] = []
    command = _score(paths, "-o", str(folder / "top.csv"))
    worker = threading.Thread(target=lambda: codes.append(main(command)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert codes == [0] and (folder / "top.csv").exists()


# -- a standard stream closed --------------------------------------------------------------------
def _run_with_closed(stream: str, command: list[str]) -> subprocess.CompletedProcess:
    """`tracin COMMAND` started with stdout (">&-") or stderr ("2>&-") closed, as a shell does it; the
    other stream captured."""
    return subprocess.run(
        ["sh", "-c", f'exec "$@" {stream}', "sh", sys.executable, "-m", "tracin", *command],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_with_stderr_closed_stdout_holds_the_results_alone(stores):
    # review76 F2: print(file=sys.stderr) with stderr closed (None) wrote to stdout: the summary line was
    # appended to the CSV results, and errors went to stdout
    paths, blocks, weights = stores
    ranked = _run_with_closed("2>&-", ["self-influence", str(paths["train"]), "--top", "2"])
    assert ranked.returncode == 0
    rows = list(csv.reader(io.StringIO(ranked.stdout)))
    self_exact = sum(w * (b.astype(np.float64) ** 2).sum(1) for w, b in zip(weights, blocks["train"], strict=True))
    assert rows[0] == ["rank", "train_row", "train_id", "self_influence"]
    assert [int(r[1]) for r in rows[1:]] == list(np.argsort(-self_exact)[:2])
    scored = _run_with_closed("2>&-", _score(paths, "-k", "1"))
    assert scored.returncode == 0
    rows = list(csv.reader(io.StringIO(scored.stdout)))
    assert rows[0] == PAIRS_HEADER and len(rows) == 1 + 3
    exact = exact_scores(blocks["test"], blocks["train"], weights)
    assert [int(r[4]) for r in rows[1:]] == list(np.argmax(exact, axis=1))
    for command, code in ((["self-influence", str(paths["train"] / "nonexist")], 1), (["score", "--bogus"], 2)):
        failed = _run_with_closed("2>&-", command)
        assert (failed.returncode, failed.stdout) == (code, "")


def test_with_stdout_closed_results_are_one_error_line_and_files_are_written(stores, tmp_path):
    # review76 F3: stdout closed (None) gave AttributeError tracebacks or "argument 1 must have a "write"
    # method", exit code 1 also after an -o file was written
    paths, _, _ = stores
    closed = "cannot write the results to stdout: it is closed"
    for command, name, instead in (
        (["info", str(paths["train"])], "info", ""),
        (["self-influence", str(paths["train"])], "self-influence", "; give -o FILE to write them to a file"),
        (_score(paths), "score", "; give -o FILE to write them to a file"),
    ):
        done = _run_with_closed(">&-", command)
        assert (done.returncode, done.stderr) == (1, f"tracin {name}: error: {closed}{instead}\n")
    assert main(_score(paths, "--side", "both", "-o", str(tmp_path / "expected.npz"))) == 0
    assert main(["self-influence", str(paths["train"]), "-o", str(tmp_path / "expected.csv")]) == 0
    for command in (
        _score(paths, "--side", "both", "-o", str(tmp_path / "got.npz")),
        ["self-influence", str(paths["train"]), "-o", str(tmp_path / "got.csv")],
    ):
        done = _run_with_closed(">&-", command)
        assert done.returncode == 0 and done.stderr.count("\n") == 1 and ": wrote " in done.stderr, done.stderr
    got, expected = np.load(tmp_path / "got.npz"), np.load(tmp_path / "expected.npz")
    assert sorted(got.files) == sorted(expected.files)
    for name in expected.files:
        np.testing.assert_array_equal(got[name], expected[name])
    assert (tmp_path / "got.csv").read_text() == (tmp_path / "expected.csv").read_text()


def test_closed_streams_in_process_are_restored_after(stores, capsys, monkeypatch):
    paths, _, _ = stores
    monkeypatch.setattr(sys, "stdout", None)
    monkeypatch.setattr(sys, "stderr", None)
    assert main(["info", str(paths["train"])]) == 1
    assert (sys.stdout, sys.stderr) == (None, None)


@pytest.mark.parametrize("command", ["self-influence", "score", "score-local"])
def test_with_stdout_closed_results_for_it_are_refused_before_any_pass(command, stores, capsys, monkeypatch):
    # review77 G1: the refusal came from _stdout, entered only once the scores existed: the whole pass
    # (on a cluster with --scheduler) ran first
    import tracin.cli as cli

    paths, _, _ = stores
    argv = {
        "self-influence": ["self-influence", str(paths["train"])],
        "score": _score(paths),
        "score-local": _score(paths, "--scheduler", "local", "--workers", "1"),
    }[command]
    for spied in ("_open_store", "_cluster"):
        monkeypatch.setattr(cli, spied, lambda *a, **k: pytest.fail(f"{a} {k}: refused only after work"))
    for spied in ("self_influence", "top_k"):
        monkeypatch.setattr(tracin, spied, lambda *a, **k: pytest.fail("refused only after a pass"))
    monkeypatch.setattr(sys, "stdout", None)
    assert main(argv) == 1
    assert sys.stdout is None
    name = argv[0]
    closed = "cannot write the results to stdout: it is closed; give -o FILE to write them to a file"
    assert capsys.readouterr().err == f"tracin {name}: error: {closed}\n"
    # a bad -o is still the error named (a good one is written: test_with_stdout_closed_results_are_one_error_line...)
    assert main([*argv, "-o", str(paths["train"] / "in.csv")]) == 1
    assert "is inside the gradient store" in capsys.readouterr().err


@pytest.mark.parametrize(
    "metadata,expected",
    [
        ({"whitening": {"damping": 0.01}}, "unwhitened rows, with --whitening FILE (the whitening's Whitening.save"),
        ({"preconditioner": {"kind": "adam_update"}}, "exported with preconditioner None or 'adam'"),
    ],
)
def test_self_influence_of_rows_without_one_is_refused_in_command_line_terms(
    metadata, expected, tmp_path, rng, capsys, monkeypatch
):
    # review76 F7: the library's advice ("whitening=<the Whitening>", "the diagonal of scores(...)") reached
    # the command line, which has neither
    path = tmp_path / "rows"
    w = tracin.GradientStore.create(path, 5, [3], weights=[1.0], metadata=metadata)
    w.write(0, 0, rng.standard_normal((5, 3)).astype(np.float32))
    w.finalize()
    monkeypatch.setattr(tracin, "self_influence", lambda *a, **k: pytest.fail("refused only after a pass"))
    assert main(["self-influence", str(path)]) == 1
    line = _error_line(capsys.readouterr().err, "self-influence")
    assert line.startswith(f"tracin self-influence: error: path: gradient store {path} holds ") and expected in line
    assert "<the Whitening>" not in line and "scores(" not in line


def test_an_interrupt_while_the_local_cluster_starts_leaves_nothing_to_dasks_exit_hook(monkeypatch):
    # review76 F5: Ctrl-C inside LocalCluster(...) left the half-started cluster to Dask's exit hook
    # (close_clusters), whose close failed on it and printed a traceback of 29-50 lines after "interrupted"
    pytest.importorskip("distributed")
    import distributed.deploy.spec as spec

    import tracin.distributed._cluster as cluster_module

    made = []

    class Interrupted(cluster_module.LocalCluster):
        def sync(self, func, *args, **kwargs):
            if getattr(func, "__name__", "") == "_start" and not made:
                made.append(self)
                raise KeyboardInterrupt  # as Ctrl-C lands in the main thread's wait for the start
            return super().sync(func, *args, **kwargs)

        async def _close(self):  # as Dask's close of a cluster whose workers are still starting
            raise AssertionError("Status.init")

    monkeypatch.setattr(cluster_module, "LocalCluster", Interrupted)
    with pytest.raises(KeyboardInterrupt), cluster_module.local_client(1):
        pytest.fail("no client of an interrupted start")
    (half,) = made
    assert half in list(spec.SpecCluster._instances)
    spec.close_clusters()  # what runs at exit: it raised AssertionError (Status.init), printed at exit
    assert not half._loop_runner.is_started()


def test_score_with_a_whitened_test_store_names_its_whitening_in_refusals(tmp_path, stores, capsys):
    """review80 F5: with a whitened --test store (plain rows, whitened by a whitening fitted on adam_update rows),
    a --train of other optimizer states was "--test and --train were exported with different optimizer states",
    and a --train of plain rows got Python advice (Whitening.fit(train)). Both name --test's whitening now, with
    shell advice; the --train the whitening was fitted on scores."""
    _, blocks, weights = stores
    fitted_rows = tracin.Gradients(blocks["train"], weights, metadata=_records(kind="adam_update"))
    whitening = tracin.Whitening.fit(fitted_rows, damping=0.5, progress=False)
    white = whitening.apply(tracin.Gradients(blocks["test"], weights, metadata=_records()))
    test = _stored(tmp_path / "white", white)
    cases = {
        "states": (
            _records(states=("s0", "s9"), kind="adam_update"),
            "fitted on gradients exported differently from --train (the optimizer states of checkpoints [1] differ)",
        ),
        "plain": (_records(), "fitted on preconditioner='adam_update' gradients but --train holds "),
    }
    for name, (meta, expected) in cases.items():
        train = _stored(tmp_path / name, tracin.Gradients(blocks["train"], weights, metadata=meta))
        assert main(_score({"test": test, "train": train}, "-k", "2")) == 1
        line = _error_line(capsys.readouterr().err, "score")
        assert f"--test's whitening was {expected}" in line or f"--test is whitened by a whitening {expected}" in line
        assert "--test and --train" not in line and "Whitening.fit" not in line and "metadata" not in line, line
        assert line.endswith("or whiten the test rows with a whitening fitted on --train"), line
    assert main(_score({"test": test, "train": _stored(tmp_path / "same", fitted_rows)}, "-k", "2")) == 0


def test_an_output_name_that_is_not_valid_text_is_written_and_named_escaped(stores, tmp_path):
    """review108 F1: under a strict stdout encoding (PYTHONIOENCODING=utf-8, en_US.UTF-8 locales) an -o name
    whose bytes are not UTF-8 was written, then the "wrote" line failed: a codec error, exit code 1."""
    paths, blocks, weights = stores
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    folder = os.fsencode(tmp_path)
    for command, name in (
        (_score(paths, "-k", "1"), b"r\xff.csv"),
        (_score(paths, "-k", "1", "--side", "both"), b"r\xff.npz"),
        (["self-influence", str(paths["train"]), "--top", "2"], b"s\xff.csv"),
    ):
        out = os.path.join(folder, name)
        argv = [os.fsencode(sys.executable), b"-m", b"tracin", *map(os.fsencode, command), b"-o", out]
        done = subprocess.run(argv, env=env, capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr
        said = (done.stdout + done.stderr).decode()
        assert f": wrote {os.fsdecode(out)}".replace("\udcff", "\\udcff") in said and "codec" not in said
        assert os.path.getsize(out) > 0
    exact = exact_scores(blocks["test"], blocks["train"], weights)
    rows = list(csv.reader(io.StringIO(Path(os.fsdecode(os.path.join(folder, b"r\xff.csv"))).read_text())))
    assert [int(r[4]) for r in rows[1:]] == list(np.argmax(exact, axis=1))


def test_normalize_with_a_whitened_store_names_that_store_and_the_option(tmp_path, stores, capsys, monkeypatch):
    """review108 F2: --normalize with a whitened store said "the test side is whitened and the train side is
    not" whichever side was, and advised Python's normalize=False; now it names the option and drop --normalize."""
    paths, blocks, weights = stores
    white = tracin.Whitening.fit(tracin.Gradients(blocks["train"], weights), damping=0.5, progress=False).apply(
        tracin.Gradients(blocks["test"], weights)
    )
    w = tracin.GradientStore.create(
        tmp_path / "white", white.n_rows, list(white.dims), weights=list(white.weights), metadata=white.metadata
    )
    for c, m in enumerate(white.matrices):
        w.write(c, 0, np.asarray(m))
    w.finalize()
    for test, train, which in (
        (tmp_path / "white", paths["train"], "--test is whitened and --train is not"),
        (paths["test"], tmp_path / "white", "--train is whitened and --test is not"),
    ):
        assert main(_score({"test": test, "train": train}, "--normalize")) == 1
        line = _error_line(capsys.readouterr().err, "score")
        assert f"--normalize does not combine with whitened gradients (metadata['whitening']): {which}," in line
        assert line.endswith("drop --normalize to score them") and "normalize=" not in line, line
    assert main(_score({"test": tmp_path / "white", "train": paths["train"]}, "-k", "1")) == 0  # without it: scored
    capsys.readouterr()
    # review112 F6: with both stores whitened the rewrite said their cosines "would compare different spaces", false
    # for the same whitening. Two whitened stores are refused first by the pair check (with or without --normalize,
    # the whitening applies once, to the test rows), in command line words (r370 F5: it gave Python's advice,
    # Whitening.apply); with that check out of the way the rewrite says the same.
    both = {"test": tmp_path / "white", "train": tmp_path / "white"}
    said = {}
    for extra in (["--normalize"], []):
        assert main(_score(both, *extra)) == 1
        said[bool(extra)] = line = _error_line(capsys.readouterr().err, "score")
        assert "both whitened" in line and "different spaces" not in line and "Whitening.apply" not in line, line
    monkeypatch.setattr(tracin.scoring, "_check_same_gradient_space", lambda *a, **k: None)
    assert main(_score(both, "--normalize")) == 1
    line = _error_line(capsys.readouterr().err, "score")
    white = tmp_path / "white"
    assert line.endswith(
        f"--normalize does not combine with whitened gradients (metadata['whitening']), and --test {white} and "
        f"--train {white} are both whitened, which is refused without --normalize too: the whitening applies once, "
        "to the test rows; give a whitened --test and an unwhitened --train, or the unwhitened stores with "
        "--whitening, without --normalize"
    ), line
    assert "different spaces" not in line and "normalize=" not in line
    assert said[True] == line  # the pair check's refusal, rewritten, says the same


def test_the_readme_states_the_exit_codes_of_pipes_and_signals_and_that_output_files_are_whole():
    """review108 F5: only cli.py's docstring said that a closed pipe ends with 141, Ctrl-C 130, SIGTERM 143,
    SIGHUP 129 and that an -o file is written whole or not at all; the README's Command line section now does."""
    from tracin.cli import BROKEN_PIPE_EXIT

    readme = (CHECKOUT / "README.md").read_text()
    section = " ".join(readme.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0].split())
    assert (
        f"A closed pipe (`tracin info STORE | head -1`) ends a command quietly with exit code {BROKEN_PIPE_EXIT}"
        in (section)
    )
    codes = (
        f"Ctrl-C with exit code {128 + signal.SIGINT} (SIGTERM {128 + signal.SIGTERM}, SIGHUP {128 + signal.SIGHUP})"
    )
    assert codes in section
    assert "An `-o` file is written whole or not at all" in section
    assert "the one-line summary (with `-o`, ending `: wrote FILE`) goes to stderr" in section


# -- whitened TracIn (--whitening) ----------------------------------------------------------------
DAMPING = 0.5


def _whitened_reference(test: list, train: list, weights: list) -> tuple[np.ndarray, np.ndarray]:
    """float64 (m, n) whitened scores sum_c w_c t_c (R_c + lambda_c I)^-1 x_c^T and (n,) whitened self-influence,
    from the documented definition: R_c = G_c^T G_c / n of the train rows, lambda_c = DAMPING * trace(R_c) / d_c."""
    scores, self_scores = 0.0, 0.0
    for w, t, x in zip(weights, test, train, strict=True):
        g = x.astype(np.float64)
        r = g.T @ g / len(g)
        inverse = np.linalg.inv(r + DAMPING * np.trace(r) / len(r) * np.eye(len(r)))
        scores = scores + w * t.astype(np.float64) @ inverse @ g.T
        self_scores = self_scores + w * np.einsum("ij,jk,ik->i", g, inverse, g)
    return scores, self_scores


def _records(checkpoints=("a", "b"), states=("s0", "s1"), kind=None) -> dict:
    """Metadata as an export records it: torch, full rows, `kind` preconditioner, digests of two checkpoints."""
    return {
        "framework": "torch",
        "mode": "full",
        "preconditioner": None if kind is None else {"kind": kind},
        "fingerprints": {"data": "d", "checkpoints": list(checkpoints), "optimizer_states": list(states)},
        "checkpoint_sources": ["file", "file"],
        "optimizer_state_sources": ["file", "file"],
    }


def _stored(path: Path, gradients) -> Path:
    """`gradients` (Gradients, in memory) written to a finished store at `path`, metadata included."""
    w = tracin.GradientStore.create(
        path, gradients.n_rows, list(gradients.dims), weights=list(gradients.weights), metadata=gradients.metadata
    )
    for c, m in enumerate(gradients.matrices):
        w.write(c, 0, np.asarray(m))
    w.finalize()
    return path


def _saved_whitening(path: Path, rows) -> tuple[Path, tracin.Whitening]:
    whitening = tracin.Whitening.fit(rows, damping=DAMPING, progress=False)
    whitening.save(path)
    return path, whitening


def test_score_whitening_matches_the_float64_whitened_scores(stores, tmp_path, capsys):
    paths, blocks, weights = stores
    white, whitening = _saved_whitening(tmp_path / "white.npz", tracin.GradientStore.open(paths["train"]))
    npz, table = tmp_path / "top.npz", tmp_path / "top.csv"
    for out in (npz, table):
        assert main(_score(paths, "-k", "5", "--side", "both", "--whitening", str(white), "-o", str(out))) == 0
        assert "top-5 both (whitened) of 3 test rows over 40 train rows: wrote" in capsys.readouterr().err
    exact, _ = _whitened_reference(blocks["test"], blocks["train"], weights)
    got = np.load(npz)
    np.testing.assert_array_equal(got["proponents_indices"], np.argsort(-exact, axis=1)[:, :5])
    np.testing.assert_array_equal(got["opponents_indices"], np.argsort(exact, axis=1)[:, :5])
    scale = np.abs(exact).max()
    np.testing.assert_allclose(got["proponents_values"], -np.sort(-exact, axis=1)[:, :5], rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(got["opponents_values"], np.sort(exact, axis=1)[:, :5], rtol=0, atol=1e-5 * scale)
    unwhitened = exact_scores(blocks["test"], blocks["train"], weights)
    assert not np.array_equal(got["proponents_indices"], np.argsort(-unwhitened, axis=1)[:, :5])  # it whitened
    # the library's own path, bit for bit: top_k of Whitening.apply(test) against the train store as it is
    python = tracin.top_k(
        whitening.apply(tracin.GradientStore.open(paths["test"])),
        tracin.GradientStore.open(paths["train"]),
        k=5,
        side="both",
    )
    for side in ("proponents", "opponents"):
        for field in ("values", "indices"):
            np.testing.assert_array_equal(got[f"{side}_{field}"], getattr(getattr(python, side), field))
    rows = list(csv.DictReader(open(table)))
    assert [(r["test_id"], r["side"], r["train_id"]) for r in rows[:2]] == [
        ("test-0", "proponents", f"train-{i}") for i in np.argsort(-exact[0])[:2]
    ]
    assert [np.float32(r["influence"]) for r in rows[:5]] == got["proponents_values"][0].tolist()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_score_whitening_on_a_device_matches_the_float64_whitened_scores(stores, tmp_path, device):
    if device == "cuda" and not _cuda_available():
        pytest.skip("no CUDA device torch sees")
    paths, blocks, weights = stores
    white, _ = _saved_whitening(tmp_path / "white.npz", tracin.Gradients(blocks["train"], weights))
    out = tmp_path / "top.npz"
    assert main(_score(paths, "-k", "5", "--whitening", str(white), "--device", device, "-o", str(out))) == 0
    exact, _ = _whitened_reference(blocks["test"], blocks["train"], weights)
    got = np.load(out)
    np.testing.assert_array_equal(got["proponents_indices"], np.argsort(-exact, axis=1)[:, :5])
    expected = -np.sort(-exact, axis=1)[:, :5]
    np.testing.assert_allclose(got["proponents_values"], expected, rtol=0, atol=1e-5 * np.abs(exact).max())


def test_self_influence_whitening_matches_the_float64_whitened_self_influence(stores, tmp_path, capsys):
    paths, blocks, weights = stores
    white, whitening = _saved_whitening(tmp_path / "white.npz", tracin.Gradients(blocks["train"], weights))
    out = tmp_path / "rank.csv"
    assert main(["self-influence", str(paths["train"]), "--whitening", str(white), "-o", str(out)]) == 0
    assert "whitened self-influence of 40 rows, 40 ranked: wrote" in capsys.readouterr().err
    _, exact = _whitened_reference(blocks["test"], blocks["train"], weights)
    rows = list(csv.DictReader(open(out)))
    assert [int(r["train_row"]) for r in rows] == np.argsort(-exact).tolist()
    np.testing.assert_allclose([float(r["self_influence"]) for r in rows], np.sort(exact)[::-1], rtol=1e-6)
    python = tracin.self_influence(tracin.GradientStore.open(paths["train"]), whitening=whitening)
    assert [np.float32(r["self_influence"]) for r in rows] == np.sort(python)[::-1].tolist()


def test_a_whitening_fitted_on_another_store_is_warned_about_naming_the_option(stores, tmp_path, rng, capsys):
    """review298 F1: a whitening whose spec records another store (fitted_on: the demo's test store, say) than
    --train / path whitened silently with that store's R; now a one-line warning names both store ids."""
    paths, blocks, weights = stores
    other = _write_store(
        tmp_path / "other", [rng.standard_normal(m.shape).astype(np.float32) for m in blocks["train"]], weights
    )
    elsewhere, _ = _saved_whitening(tmp_path / "elsewhere.npz", tracin.GradientStore.open(other))
    here, _ = _saved_whitening(tmp_path / "here.npz", tracin.GradientStore.open(paths["train"]))
    ids = {
        name: tracin.GradientStore.open(path).store_id for name, path in (("other", other), ("train", paths["train"]))
    }
    runs = (
        ("score", _score(paths, "-o", str(tmp_path / "top.npz"), "--whitening"), "--train"),
        (
            "self-influence",
            ["self-influence", str(paths["train"]), "-o", str(tmp_path / "r.csv"), "--whitening"],
            "path",
        ),
    )
    for command, argv, option in runs:
        assert main([*argv, str(elsewhere)]) == 0
        warned = [
            line for line in capsys.readouterr().err.splitlines() if line.startswith(f"tracin {command}: warning: ")
        ]
        assert len(warned) == 1, warned
        assert f"fitted on another gradient store (id {ids['other']}) than {option} " in warned[0]
        assert f"(id {ids['train']})" in warned[0]
        assert main([*argv, str(here)]) == 0
        assert "warning" not in capsys.readouterr().err


def test_output_that_is_the_whitening_file_is_refused_and_the_whitening_kept(stores, tmp_path, capsys):
    """review138 F1: -o naming the --whitening file (or a link to it) replaced the saved whitening with the
    results and exited 0; it is refused before any work and the file still loads as the same whitening."""
    paths, blocks, weights = stores
    white, whitening = _saved_whitening(tmp_path / "white.npz", tracin.Gradients(blocks["train"], weights))
    link = tmp_path / "link.npz"
    os.link(white, link)
    before = white.read_bytes()
    for out in (white, link):
        assert main(_score(paths, "-k", "5", "--whitening", str(white), "-o", str(out))) == 1
        line = _error_line(capsys.readouterr().err, "score")
        assert f"--output {out} is the --whitening file" in line and "give another --output" in line
    assert white.read_bytes() == before
    named_csv, _ = _saved_whitening(tmp_path / "white.csv", tracin.Gradients(blocks["train"], weights))
    saved = named_csv.read_bytes()
    assert main(["self-influence", str(paths["train"]), "--whitening", str(named_csv), "-o", str(named_csv)]) == 1
    assert "is the --whitening file" in _error_line(capsys.readouterr().err, "self-influence")
    assert named_csv.read_bytes() == saved
    test = tracin.GradientStore.open(paths["test"])
    np.testing.assert_array_equal(
        tracin.Whitening.load(white).apply(test).matrices[0], whitening.apply(test).matrices[0]
    )


def test_help_names_the_whitening_option(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    parsers = _subparsers()
    for name in ("score", "self-influence"):
        text = " ".join(parsers[name].format_help().split())
        assert "--whitening FILE" in text and "Whitening.save" in text, name
    assert "--whitening" not in parsers["info"].format_help()
    assert "--whitening white.npz" in build_parser().format_help()
    readme = (CHECKOUT / "README.md").read_text()
    section = " ".join(readme.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0].split())
    assert (
        "--whitening white.npz" in section and "`--whitening FILE` takes a file written by `Whitening.save`" in section
    )


def test_whitening_files_that_do_not_load_are_named_by_the_option(stores, tmp_path, capsys):
    paths, blocks, weights = stores
    text = tmp_path / "notes.txt"
    text.write_text("not a whitening\n")
    cases = {
        "": "--whitening: expected a file written by tracin.Whitening.save, got ''",
        str(tmp_path / "gone.npz"): f"--whitening: no such file {tmp_path}/gone.npz (it takes a file written by "
        "tracin.Whitening.save, fitted on the train gradients: tracin.Whitening.fit(tracin.GradientStore.open(TRAIN))"
        f".save({str(tmp_path / 'gone.npz')!r}) in Python)",
        str(text): f"--whitening: {text} is not a saved tracin.Whitening (not a complete .npz archive)",
        str(tmp_path): f"--whitening: {tmp_path} is not a saved tracin.Whitening (not a regular file)",
    }
    for path, expected in cases.items():
        for name, argv in (("score", _score(paths)), ("self-influence", ["self-influence", str(paths["train"])])):
            assert main([*argv, "--whitening", path]) == (2 if path == "" else 1)
            assert _error_line(capsys.readouterr().err, name) == f"tracin {name}: error: {expected}"
    if os.geteuid() != 0:  # root reads any file
        locked, _ = _saved_whitening(tmp_path / "locked.npz", tracin.Gradients(blocks["train"], weights))
        locked.chmod(0)
        assert main([*_score(paths), "--whitening", str(locked)]) == 1
        line = _error_line(capsys.readouterr().err, "score")
        assert line.endswith(f"--whitening: cannot read {locked} (Permission denied)"), line


def test_whitening_with_options_it_does_not_combine_with_is_refused_before_any_work(
    stores, tmp_path, capsys, monkeypatch
):
    paths, blocks, weights = stores
    white, _ = _saved_whitening(tmp_path / "white.npz", tracin.Gradients(blocks["train"], weights))
    monkeypatch.setattr(tracin.Whitening, "load", lambda *a: pytest.fail("refused only after loading"))
    monkeypatch.setattr(tracin.GradientStore, "open", lambda *a, **k: pytest.fail("refused only after opening"))
    cases = [
        (
            _score(paths, "--normalize"),
            "--whitening and --normalize do not combine: the cosine of whitened --test rows and unwhitened --train "
            "rows compares different spaces; drop --normalize to score whitened TracIn",
        ),
        (
            ["self-influence", str(paths["train"]), "--scheduler", "local"],
            "--whitening computes on this machine (tracin.distributed.self_influence does not whiten): give "
            "--whitening or --scheduler, not both",
        ),
        (
            ["self-influence", str(paths["train"]), "--device", "cuda"],
            "--whitening computes in float64 on the CPU: give --whitening or --device cuda, not both",
        ),
    ]
    for argv, expected in cases:
        assert main([*argv, "--whitening", str(white)]) == 2  # options that do not combine: usage
        assert _error_line(capsys.readouterr().err, argv[0]) == f"tracin {argv[0]}: error: {expected}"


def test_whitening_with_an_already_whitened_store_is_refused(stores, tmp_path, capsys):
    paths, blocks, weights = stores
    white, whitening = _saved_whitening(tmp_path / "white.npz", tracin.Gradients(blocks["train"], weights))
    whitened = _stored(tmp_path / "whitened", whitening.apply(tracin.Gradients(blocks["test"], weights)))
    for option, pair in (
        ("--test", {"test": whitened, "train": paths["train"]}),
        ("--train", {"test": paths["test"], "train": whitened}),
    ):
        assert main(_score(pair, "--whitening", str(white))) == 1
        assert _error_line(capsys.readouterr().err, "score") == (
            f"tracin score: error: --whitening: {option} store {whitened} is already whitened "
            "(metadata['whitening']), and the whitening applies once, to the test rows: give the store of the "
            "unwhitened rows, or leave --whitening out"
        )
    assert main(["self-influence", str(whitened), "--whitening", str(white)]) == 1
    line = _error_line(capsys.readouterr().err, "self-influence")
    assert line.endswith(
        f"path: gradient store {whitened} holds whitened rows, whose squared norms are not the whitened "
        "self-influence; give the store of the unwhitened rows, with --whitening FILE (the whitening's "
        "Whitening.save file) for the whitened self-influence"
    ), line


def test_a_whitening_fitted_on_other_gradients_is_refused_naming_the_options(stores, tmp_path, capsys):
    """The library's CheckpointMismatchError / FittedKindError / records checks, in command line terms: a
    whitening fitted on other checkpoints than --test's (or path's), on another preconditioner or other
    optimizer states or parameters than --train's, or of other dims."""
    _, blocks, weights = stores
    plain = _stored(tmp_path / "rec-train", tracin.Gradients(blocks["train"], weights, metadata=_records()))
    test = _stored(tmp_path / "rec-test", tracin.Gradients(blocks["test"], weights, metadata=_records()))

    def whitening(name, metadata=None, mats=blocks["train"], w=weights):
        return _saved_whitening(tmp_path / f"{name}.npz", tracin.Gradients(mats, w, metadata=metadata))[0]

    update = whitening("update", _records(kind="adam_update"))
    refit = "give --whitening a whitening fitted on --train's gradients"
    score_cases = [
        (  # the whitening's checkpoints are not --test's: Whitening.apply's CheckpointMismatchError
            test,
            plain,
            whitening("other", _records(checkpoints=("a", "c"))),
            "--test and the gradients --whitening was fitted on were exported at different checkpoints (checkpoints "
            "[1] differ); give --whitening a whitening fitted on gradients exported as --test was (same checkpoints "
            "and optimizer states)",
        ),
        (  # LESS: plain test rows pair with adam_update ones, but --train is plain: FittedKindError
            test,
            plain,
            update,
            f"--whitening was fitted on preconditioner='adam_update' gradients but --train holds "
            f"preconditioner=None ones; {refit}",
        ),
        (  # adam_update --train of other optimizer states: CheckpointMismatchError of the fitted-on gradients
            test,
            _stored(
                tmp_path / "s9",
                tracin.Gradients(blocks["train"], weights, metadata=_records(states=("s0", "s9"), kind="adam_update")),
            ),
            update,
            f"--whitening was fitted on gradients exported differently from --train (the optimizer states of "
            f"checkpoints [1] differ); {refit}",
        ),
        (  # test rows with no records: only the fitted-on gradients' records meet --train's
            _stored(tmp_path / "bare", tracin.Gradients(blocks["test"], weights)),
            _stored(
                tmp_path / "b",
                tracin.Gradients(blocks["train"], weights, metadata={"framework": "torch", "params": [{"name": "b"}]}),
            ),
            whitening("a", {"framework": "torch", "params": [{"name": "a"}]}),
            "--whitening does not fit --train: the gradients --whitening was fitted on and train are gradients of "
            f"different parameters: ['a'] vs ['b']; {refit}",
        ),
        (
            test,
            plain,
            whitening("one", mats=blocks["train"][:1], w=weights[:1]),
            "--whitening applied to --test: test has 2 checkpoints but the whitening has 1 checkpoint; give --test "
            "rows exported as --train's were and --whitening a whitening fitted on --train's gradients "
            "(tracin.Whitening.fit, then save)",
        ),
        (  # --test is the odd one out: the whitening is fitted on --train's gradients (review248 F2)
            _stored(tmp_path / "narrow", tracin.Gradients([m[:, :3] for m in blocks["test"]], weights)),
            plain,
            whitening("train"),
            "--whitening applied to --test: test dims [3, 3] differ from the whitening's dims "
            f"{[m.shape[1] for m in blocks['train']]}; give --test rows exported as --train's were and --whitening "
            "a whitening fitted on --train's gradients (tracin.Whitening.fit, then save)",
        ),
    ]
    for test_store, train_store, white, expected in score_cases:
        assert main(_score({"test": test_store, "train": train_store}, "--whitening", str(white))) == 1
        assert _error_line(capsys.readouterr().err, "score") == f"tracin score: error: {expected}"
    assert main(_score({"test": test, "train": plain}, "--whitening", str(whitening("same", _records())))) == 0
    capsys.readouterr()
    # the same refusal for a --test store whitened by hand (Whitening.apply written to a store) names its whitening
    handmade = tracin.Whitening.load(tmp_path / "a.npz").apply(tracin.Gradients(blocks["test"], weights))
    assert main(_score({"test": _stored(tmp_path / "handmade", handmade), "train": tmp_path / "b"})) == 1
    assert _error_line(capsys.readouterr().err, "score") == (
        "tracin score: error: --test's whitening does not fit --train: the gradients --test's whitening was fitted on "
        "and train are gradients of different parameters: ['a'] vs ['b']; score --test against the gradients its "
        "whitening was fitted on, or whiten the test rows with a whitening fitted on --train"
    )
    self_cases = [
        (
            whitening("c", _records(checkpoints=("a", "c"))),
            "path and the gradients --whitening was fitted on were exported at different checkpoints (checkpoints [1] "
            "differ); give --whitening a whitening fitted on gradients exported as path was (same checkpoints and "
            "optimizer states)",
        ),
        (
            update,
            "--whitening applied to path: train gradients are preconditioner=None but the whitening was fitted on "
            "preconditioner='adam_update'; give --whitening a whitening fitted on path's gradients "
            "(tracin.Whitening.fit, then save)",
        ),
    ]
    for white, expected in self_cases:
        assert main(["self-influence", str(plain), "--whitening", str(white)]) == 1
        assert _error_line(capsys.readouterr().err, "self-influence") == f"tracin self-influence: error: {expected}"


# -- review138 F2-F7 -------------------------------------------------------------------------------
def test_output_that_is_a_hard_link_to_a_stores_file_is_refused_and_the_store_kept(stores, tmp_path, capsys):
    """review138 F2: -o a hard link to a store's .npy (a `cp -al` copy's) was rewritten in place, exit 0, and the
    store was then refused as malformed; one to a file the command reads, or holding a .npy array or a store's
    manifest, is refused before any work; a hard-linked output of other contents is still written in place."""
    paths, _, _ = stores
    other = tmp_path / "other"  # a store the command does not read
    _write_store(other, [np.ones((4, 3), np.float32)], [1.0])
    store_files = {p: p.read_bytes() for store in (paths["train"], paths["test"], other) for p in store.iterdir()}
    cases = [
        (_score(paths), paths["train"] / "checkpoint_000.npy", "a file of the --train gradient store"),
        (_score(paths), paths["test"] / "manifest.json", "a file of the --test gradient store"),
        (["self-influence", str(paths["train"])], paths["train"] / "ids.npy", "a file of the path gradient store"),
        (_score(paths), other / "checkpoint_000.npy", "holds a NumPy array (.npy)"),
        (["self-influence", str(paths["train"])], other / "manifest.json", "holds a gradient store's manifest"),
    ]
    for i, (argv, source, said) in enumerate(cases):
        link = tmp_path / f"link{i}.{'csv' if argv[0] == 'self-influence' else 'npz'}"
        os.link(source, link)
        assert main([*argv, "-o", str(link)]) == 1
        line = _error_line(capsys.readouterr().err, argv[0])
        assert f"--output {link} " in line and said in line and "give another --output" in line, line
    assert {p: p.read_bytes() for p in store_files} == store_files
    assert tracin.GradientStore.open(other).n_rows == 4
    shared = tmp_path / "shared.csv"  # an earlier ranking with a second name: rewritten under both
    shared.write_text("rank,train_row,train_id,self_influence\n")
    os.link(shared, tmp_path / "second-name.csv")
    assert main(["self-influence", str(paths["train"]), "--top", "2", "-o", str(shared)]) == 0
    assert len((tmp_path / "second-name.csv").read_text().splitlines()) == 3


def test_a_second_signal_while_the_first_is_reported_exits_quietly(monkeypatch, capsys, signals_as_in_a_terminal):
    """review138 F3: a second Ctrl-C just after the first, once the handlers were restored, ended the process
    with a KeyboardInterrupt traceback instead of the one line and exit code 130."""
    import tracin.cli

    report = tracin.cli._report_signal

    def impatient(*args, **kwargs):  # the second Ctrl-C lands while the first is reported
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        return report(*args, **kwargs)

    monkeypatch.setattr(tracin.cli, "cmd_info", lambda args: signal.raise_signal(signal.SIGINT))
    monkeypatch.setattr(tracin.cli, "_report_signal", impatient)
    try:
        code = main(["info", "x"])
    except KeyboardInterrupt:  # not pytest's own: that would end the session
        pytest.fail("the second Ctrl-C escaped main: a traceback")
    assert code == 130
    assert capsys.readouterr().err == "tracin info: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_second_signal_while_the_first_unwinds_lets_the_cleanup_finish(monkeypatch, capsys, signals_as_in_a_terminal):
    """fr138: a second Ctrl-C a few ms after the first was raised inside the cleanup the first ran (an -o's
    temporary file was left beside it in ~2 of 60 double Ctrl-Cs); within UNWIND_S of the first it is recorded."""
    import tracin.cli

    cleaned = []

    def command(args):
        try:
            signal.raise_signal(signal.SIGINT)
        finally:  # the impatient second Ctrl-C (and a SIGTERM) while the first unwinds
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
            cleaned.append(True)

    monkeypatch.setattr(tracin.cli, "cmd_info", command)
    assert main(["info", "x"]) == 130
    assert cleaned == [True] and capsys.readouterr().err == "tracin info: interrupted\n"
    steps = []

    def insists(args):  # a signal UNWIND_S after the first, whose exception was swallowed, is raised again
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
        monkeypatch.setattr(tracin.cli, "UNWIND_S", 0.0)
        signal.raise_signal(signal.SIGINT)
        steps.append("ran on")

    monkeypatch.setattr(tracin.cli, "cmd_info", insists)
    assert main(["info", "x"]) == 130 and steps == []


@pytest.mark.parametrize(("code", "ignored"), [(0, False), (1, False), (130, True), (143, True), (129, True)])
def test_the_program_ignores_signals_while_it_exits_after_one_ended_the_command(monkeypatch, code, ignored):
    """fr138: a second Ctrl-C during Python's finalization, which restores SIGINT's default action, killed the
    process by SIGINT (returncode -2) instead of exit code 130, in ~1 of 6 double Ctrl-Cs."""
    import tracin.cli

    set_to = {}
    monkeypatch.setattr(tracin.cli, "main", lambda argv=None: code)
    monkeypatch.setattr(tracin.cli.signal, "signal", lambda s, h: set_to.__setitem__(s, h))
    with pytest.raises(SystemExit) as e:
        tracin.cli.console()
    assert e.value.code == code
    expected = {signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: signal.SIG_IGN, signal.SIGHUP: signal.SIG_IGN}
    assert set_to == (expected if ignored else {})


def test_usage_mistakes_exit_2_and_problems_with_files_exit_1(stores, tmp_path, capsys, monkeypatch):
    """review138 F4: options that do not combine, an empty value or an -o name without the suffix exited 1, as
    a missing file does, while argparse's own usage errors exit 2; all of them exit 2 now, before any work."""
    paths, _, _ = stores
    monkeypatch.setattr(tracin.GradientStore, "open", lambda *a, **k: pytest.fail("opened a store"))
    train = str(paths["train"])
    for argv in (
        _score(paths, "-o", str(tmp_path / "out.json")),
        _score(paths, "--workers", "2"),
        _score(paths, "--scheduler", ""),
        _score(paths, "--whitening", "w.npz", "--normalize"),
        _score(paths, "--device", "cuda", "--scheduler", "local"),
        ["self-influence", train, "--whitening", "w.npz", "--scheduler", "local"],
        ["self-influence", train, "--whitening", "w.npz", "--device", "cuda"],
        ["self-influence", train, "--whitening", ""],
        ["self-influence", train, "--scheduler", "tcp://127.0.0.1:1", "--workers", "2"],
        ["self-influence", train, "-o", ""],
        ["self-influence", ""],
        ["info", ""],
        ["demo", "--checkpoints", "5", "--epochs", "2", "-o", str(tmp_path / "demo")],
        ["demo", "-o", ""],
    ):
        assert main(argv) == 2, argv
        _error_line(capsys.readouterr().err, argv[0])
        with pytest.raises(SystemExit) as e:  # argparse's own
            main([*argv[:1], "--no-such-option"])
        assert e.value.code == 2
        capsys.readouterr()
    assert not (tmp_path / "demo").exists()
    (tmp_path / "folder.csv").mkdir()
    for argv in (  # the command line is fine, the files are not
        ["info", str(tmp_path / "nowhere")],
        ["self-influence", str(tmp_path / "nowhere")],
        ["self-influence", train, "-o", str(tmp_path / "no" / "rank.csv")],
        ["self-influence", train, "-o", str(tmp_path / "folder.csv")],
    ):
        assert main(argv) == 1, argv
        _error_line(capsys.readouterr().err, argv[0])
    readme = (CHECKOUT / "README.md").read_text()
    section = " ".join(readme.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0].split())
    assert "exit code 2 for a command line wrong in itself" in section
    assert "exit code 2" in " ".join(tracin.cli.__doc__.split())


def test_a_folder_refusing_new_files_is_named_with_the_output_not_a_temporary_file(
    stores, tmp_path, capsys, monkeypatch
):
    """review138 F5: the error named the hidden temporary file tried ('.tracin-4c35tw88.tmp'), which the user
    never gave: it names --output's path, the folder and the system's reason."""
    paths, _, _ = stores
    rank = ["self-influence", str(paths["train"]), "-o"]

    def refused(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, ".tracin-4c35tw88.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    out = tmp_path / "new.csv"
    assert main([*rank, str(out)]) == 1
    line = _error_line(capsys.readouterr().err, "self-influence")
    assert line.endswith(f"--output: cannot create {out}: folder {tmp_path} refuses new files (Permission denied)")
    assert ".tracin-" not in line
    monkeypatch.undo()
    if Path("/proc/self").is_dir():  # Linux: no file can be created in /proc
        assert main([*rank, "/proc/new.csv"]) == 1
        line = _error_line(capsys.readouterr().err, "self-influence")
        assert line.endswith(
            "--output: cannot create /proc/new.csv: folder /proc refuses new files (No such file or directory)"
        )


def test_csv_ids_a_spreadsheet_would_run_are_written_as_they_are_and_documented(tmp_path, capsys):
    """review138 F6: ids starting with = + - @ are data, written and read back unchanged (numbers stay numbers);
    the README's Command line section says a spreadsheet would run them as formulas."""
    ids = ['=HYPERLINK("http://example.invalid/","x")', "+1+1", "-2", "@SUM(1,1)", "ok"]
    store = _write_store(tmp_path / "s", [np.eye(5, 4, dtype=np.float32) + 1], [1.0], ids=ids)
    assert main(["self-influence", str(store), "-o", str(tmp_path / "r.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "r.csv", newline="")))
    assert sorted(r["train_id"] for r in rows) == sorted(ids)
    assert all(float(r["self_influence"]) > 0 for r in rows)
    readme = (CHECKOUT / "README.md").read_text()
    section = " ".join(readme.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0].split())
    assert "run as a formula" in section and "`=`, `+`, `-` or `@`" in section


# `tracin ARGS...`, as the console script runs it; with "close" first: a real SIGINT to itself as the LocalCluster's
# close at the end of the command begins (after the command's own tasks).
CLUSTER_SCRIPT = """
import os, signal, sys
from distributed import SpecCluster
import tracin.cli as cli

if __name__ == "__main__":  # (the spawned worker processes import this script too)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, also where pytest runs with it ignored
    close, sent = SpecCluster._close, []

    async def interrupted_close(self):
        if sys.argv[1] == "close" and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return await close(self)

    SpecCluster._close = interrupted_close
    cli.console(sys.argv[2:])
"""


@pytest.mark.parametrize("when", ["dashboard", "close"])
def test_ctrl_c_with_a_local_scheduler_ends_soon_in_one_line_leaving_no_worker(stores, tmp_path, when):
    """fr261: a Ctrl-C just after `--scheduler local` printed its dashboard's line took 10.5 s to end the command
    when it landed as the cluster closed at the end (Dask's exit hook waited out its timeout for the close it had
    cancelled). Right after that line, and as the cluster closes: exit code 130 within seconds, the one line, and
    no worker process left."""
    pytest.importorskip("distributed")
    psutil = pytest.importorskip("psutil")
    paths, _, _ = stores
    script = tmp_path / "cluster.py"
    script.write_text(CLUSTER_SCRIPT)
    command = [sys.executable, str(script), when, *_score(paths, "-k", "3", "--scheduler", "local", "--workers", "2")]
    p = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        dashboard = p.stderr.readline()
        workers = [c.pid for c in psutil.Process(p.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        if when == "dashboard":
            p.send_signal(signal.SIGINT)
        interrupted = p.stderr.readline()
        reported = time.monotonic()
        rest = p.communicate(timeout=60)[1]
        ended = time.monotonic() - reported
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert dashboard.startswith("tracin.distributed: LocalCluster of 2 workers, dashboard "), dashboard
    assert (p.returncode, interrupted, rest) == (130, "tracin score: interrupted\n", "")
    assert ended < 5.0, ended  # 10 s and more before
    assert len(workers) == 2

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    assert [pid for pid in workers if alive(pid)] == []


def test_a_warning_of_several_lines_is_shown_as_one_line_once(capsys):
    """r288: a warning's line breaks and runs of spaces become single spaces (not escaped '\\n'), and the
    same warning shown again by one command is not repeated."""
    from tracin.cli import _show_warning

    shown: set[str] = set()
    for _ in range(2):
        _show_warning("score", shown, UserWarning("first line\n  second\tline"), UserWarning, "f.py", 1)
    assert capsys.readouterr().err == "tracin score: warning: first line second line\n"
