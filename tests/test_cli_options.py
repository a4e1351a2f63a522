"""Command-line options reach the library as given (r266 mutation testing: --threads was never checked
to arrive, and self-influence's order of equal scores was not pinned)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

import tracin
from tracin.cli import build_parser, main
from tracin.demo.training import MAX_EPOCHS


def _store(path, mat, weight=0.5):
    w = tracin.GradientStore.create(path, len(mat), [mat.shape[1]], weights=[weight])
    w.write(0, 0, mat)
    w.finalize()
    return str(path)


@pytest.fixture
def two(tmp_path, rng):
    test = _store(tmp_path / "test", rng.standard_normal((3, 4)).astype(np.float32))
    train = _store(tmp_path / "train", rng.standard_normal((6, 4)).astype(np.float32))
    return test, train


@pytest.mark.parametrize("command", ["score", "self-influence"])
def test_threads_option_is_the_librarys_num_threads(command, two, tmp_path, monkeypatch):
    library = "top_k" if command == "score" else "self_influence"
    real, seen = getattr(tracin, library), []
    monkeypatch.setattr(tracin, library, lambda *a, **k: seen.append(k) or real(*a, **k))
    args = ["score", "--test", two[0], "--train", two[1]] if command == "score" else ["self-influence", two[1]]
    assert main([*args, "--threads", "3", "-o", str(tmp_path / "out.csv")]) == 0
    assert [k["num_threads"] for k in seen] == [3]


def test_self_influence_ranks_equal_scores_by_row(tmp_path, rng):
    """Rows of equal self-influence are listed in row order (np.argsort(-scores, kind='stable'))."""
    rows = rng.standard_normal((3, 4)).astype(np.float32)
    mat = rows[[0, 1, 0, 2, 1, 0]]  # rows 0, 2, 5 and 1, 4 tie
    path = _store(tmp_path / "train", mat, weight=1.0)
    out = tmp_path / "rank.csv"
    assert main(["self-influence", path, "-o", str(out)]) == 0
    ranked = list(csv.DictReader(open(out)))
    got = [int(r["train_row"]) for r in ranked]
    assert [r["train_id"] for r in ranked] == [r["train_row"] for r in ranked]  # a store without ids: the row
    exact = (mat.astype(np.float64) ** 2).sum(1)
    assert got == np.argsort(-exact, kind="stable").tolist()
    assert [r for r in got if r in (0, 2, 5)] == [0, 2, 5] and [r for r in got if r in (1, 4)] == [1, 4]


@pytest.mark.parametrize("side", ["proponents", "opponents", "both"])
def test_score_csv_rows_name_the_side_and_rows_of_stores_without_ids(side, two, tmp_path, rng):
    """--side's name in the side column, and train_id / test_id falling back to the row numbers of stores
    without ids, each row's influence the float64 score of its pair (r266: a CSV labelled proponents for
    --side opponents, or train_id taken from the test row, passed)."""
    out = tmp_path / "top.csv"
    assert main(["score", "--test", two[0], "--train", two[1], "-k", "4", "--side", side, "-o", str(out)]) == 0
    test, train = (tracin.GradientStore.open(p) for p in two)
    exact = 0.5 * np.asarray(test.kernel_side().blocks[0], np.float64) @ np.asarray(train.kernel_side().blocks[0]).T
    rows = list(csv.DictReader(open(out)))
    assert {r["side"] for r in rows} == ({"proponents", "opponents"} if side == "both" else {side})
    assert len(rows) == 3 * 4 * (2 if side == "both" else 1)
    for r in rows:
        assert r["train_id"] == r["train_row"] and r["test_id"] == r["test_row"]
        assert float(r["influence"]) == pytest.approx(exact[int(r["test_row"]), int(r["train_row"])], rel=1e-5)
    for name, order in (("proponents", -exact), ("opponents", exact)):
        got = [[int(r["train_row"]) for r in rows if r["side"] == name and int(r["test_row"]) == t] for t in range(3)]
        if name == side or side == "both":
            assert got == np.argsort(order, axis=1, kind="stable")[:, :4].tolist()


@pytest.mark.parametrize(
    ("option", "taken", "refused", "expected"),
    [
        ("--noise", "0", "1", "a number in [0, 1)"),
        ("--seed", "0", "-1", "an integer >= 0"),
        ("--epochs", str(MAX_EPOCHS), str(MAX_EPOCHS + 1), f"a positive integer no larger than {MAX_EPOCHS}"),
    ],
)
def test_demo_options_take_their_bounds_and_refuse_one_past(option, taken, refused, expected, capsys):
    """Each bound of the demo's options is taken and one past it is argparse's usage error (r310: --noise 1,
    which DemoConfig refuses only after the extras are imported, --seed 0 or --epochs MAX_EPOCHS refused, passed)."""
    parser = build_parser()
    args = parser.parse_args(["demo", option, taken])
    assert getattr(args, option.lstrip("-")) == type(getattr(args, option.lstrip("-")))(taken)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["demo", option, refused])
    assert e.value.code == 2
    assert f"argument {option}: expected {expected}, got '{refused}'" in capsys.readouterr().err


def test_demo_takes_as_many_checkpoints_as_epochs(tmp_path, monkeypatch):
    """--checkpoints equal to --epochs (one per epoch) is run, one more refused (r310: `>=` passed)."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    import tracin.demo

    configs = []
    monkeypatch.setattr(tracin.demo, "run_demo", lambda config, progress: configs.append(config))
    out = str(tmp_path / "out")
    assert main(["demo", "--epochs", "3", "--checkpoints", "3", "-o", out, "--no-progress"]) == 0
    assert [(c.training.epochs, c.training.checkpoints) for c in configs] == [(3, 3)]
    assert main(["demo", "--epochs", "3", "--checkpoints", "4", "-o", out, "--no-progress"]) == 2
    assert len(configs) == 1


@pytest.mark.parametrize("crlf", ["test", "train"])
def test_score_csv_quotes_carriage_return_ids_of_either_side_alone(crlf, tmp_path, rng):
    """Ids ending in \r on one side only (a CRLF id file for the train set, a plain one for the test set) still
    keep every row whole (r310: ids of the test side alone checked for \r passed: the CSV test used one store)."""
    ids = {
        side: [f"{side}-{i}\r" if side == crlf else f"{side}-{i}" for i in range(n)]
        for side, n in (("test", 2), ("train", 5))
    }
    mats = {side: rng.standard_normal((len(ids[side]), 4)).astype(np.float32) for side in ids}
    paths = {}
    for side in ids:
        w = tracin.GradientStore.create(tmp_path / side, len(mats[side]), [4], weights=[1.0], ids=ids[side])
        w.write(0, 0, mats[side])
        w.finalize()
        paths[side] = str(tmp_path / side)
    out = tmp_path / "top.csv"
    assert main(["score", "--test", paths["test"], "--train", paths["train"], "-k", "3", "-o", str(out)]) == 0
    rows = list(csv.reader(open(out, newline="")))
    assert len(rows) == 1 + 2 * 3 and all(len(row) == 7 for row in rows), rows
    exact = mats["test"].astype(np.float64) @ mats["train"].astype(np.float64).T
    for row in rows[1:]:
        t, i = int(row[0]), int(row[4])
        assert (row[1], row[5]) == (ids["test"][t], ids["train"][i])
        assert float(row[6]) == pytest.approx(exact[t, i], rel=1e-5)


@pytest.mark.parametrize(("workers", "started"), [(["--workers", "3"], 3), ([], 5)])
def test_workers_option_is_the_local_clusters_size(workers, started, two, monkeypatch, capsys):
    """--workers N starts N workers, none given one per usable core (r310: --workers ignored passed, as the
    cluster test runs --workers 2 on a 2-core machine). The cluster is not started: its size is recorded."""
    pytest.importorskip("distributed")
    import tracin.cli
    import tracin.distributed._cluster as cluster

    sizes = []

    def no_cluster(n):
        sizes.append(n)
        raise OSError("no cluster in this test")

    monkeypatch.setattr(tracin.cli, "usable_cores", lambda: 5)
    monkeypatch.setattr(cluster, "local_client", no_cluster)
    assert main(["self-influence", two[1], "--scheduler", "local", *workers]) == 1
    assert sizes == [started]
    assert "no cluster in this test" in capsys.readouterr().err


def test_out_of_memory_is_a_one_line_error(two, monkeypatch, capsys):
    """A MemoryError (NumPy's 'Unable to allocate') is one error line with exit code 1, no traceback (r310:
    MemoryError left out of _run's one-line errors passed)."""

    def no_memory(*a, **k):
        raise MemoryError("Unable to allocate 3.00 GiB for an array with shape (40000, 20000) and data type float32")

    monkeypatch.setattr(tracin, "self_influence", no_memory)
    assert main(["self-influence", two[1]]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "tracin self-influence: error: Unable to allocate 3.00 GiB for an array with shape "
        "(40000, 20000) and data type float32"
    ]


def test_a_store_without_an_id_is_not_warned_about_as_another_whitenings(two, tmp_path, monkeypatch, capsys):
    """A store written before stores had ids (store_id None) cannot be compared with the store a whitening records:
    no warning (r310: the store_id None check dropped passed; every such store warned 'fitted on another store')."""
    white = tmp_path / "white.npz"
    tracin.Whitening.fit(tracin.GradientStore.open(two[1]), damping=1e-3, progress=False).save(white)
    monkeypatch.setattr(tracin.GradientStore, "store_id", property(lambda self: None))
    assert main(["self-influence", two[1], "--whitening", str(white), "-o", str(tmp_path / "r.csv")]) == 0
    assert "warning" not in capsys.readouterr().err


# -- a NumPy user's first mistakes (r344): every message names the option, the path and what to do ----------
def _line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tracin {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".bin"])
def test_a_numpy_file_given_for_a_store_says_how_to_make_a_store_of_it(suffix, two, tmp_path, rng, capsys):
    """Gradients saved with np.save (or np.savez) given where a store folder goes: the error names the option,
    says the file is a NumPy array and not a store, and names the call that makes a store of it (it said only
    '(not a directory)'). A file that holds no NumPy array keeps the plain message."""
    grads = tmp_path / f"grads{suffix}"
    if suffix == ".npz":
        np.savez(grads, g=rng.standard_normal((5, 4)).astype(np.float32))
    else:
        with open(grads, "wb") as f:  # .bin: np.save's bytes under another name
            np.save(f, rng.standard_normal((5, 4)).astype(np.float32))
    test, train = two
    for command, option in (
        (["info", str(grads)], None),
        (["score", "--test", str(grads), "--train", train], "--test"),
        (["score", "--test", test, "--train", str(grads)], "--train"),
        (["self-influence", str(grads)], "path"),
    ):
        assert main(command) == 1
        line = _line(capsys.readouterr().err, command[0])
        head = f"tracin {command[0]}: error: " + ("" if option is None else f"{option}: ")
        assert line.startswith(head + f"{grads} is a NumPy "), line
        assert "not a gradient store" in line and "tracin.GradientStore.create(" in line, line
    other = tmp_path / "notes.txt"
    other.write_text("x")
    assert main(["self-influence", str(other)]) == 1
    line = _line(capsys.readouterr().err, "self-influence")
    assert "(not a directory)" in line and "NumPy" not in line


def _nan_store(path, mat, row):
    _store(path, mat)
    data = np.load(next(path.glob("*.npy")), mmap_mode="r+")
    data[row] = np.nan
    data.flush()
    return str(path)


def test_stores_that_do_not_match_or_hold_nan_name_the_options_and_paths(tmp_path, rng, capsys):
    """Library refusals reached the shell in the library's words ('test dims [3] differ from train dims [4]',
    'train checkpoint 0 contains NaN ...'), naming neither option nor store: they now name both, and what to do."""
    test = _store(tmp_path / "test", rng.standard_normal((3, 4)).astype(np.float32))
    train = _store(tmp_path / "train", rng.standard_normal((6, 4)).astype(np.float32))
    narrow = _store(tmp_path / "narrow", rng.standard_normal((3, 3)).astype(np.float32))
    w = tracin.GradientStore.create(tmp_path / "two", 3, [4, 4], weights=[0.5, 0.5])
    for c in range(2):
        w.write(c, 0, rng.standard_normal((3, 4)).astype(np.float32))
    w.finalize()
    nan_train = _nan_store(tmp_path / "nan train", rng.standard_normal((6, 4)).astype(np.float32), 4)
    nan_test = _nan_store(tmp_path / "nan test", rng.standard_normal((3, 4)).astype(np.float32), 1)
    for t, tr, words in (
        (narrow, train, "test dims [3] differ from train dims [4]"),
        (str(tmp_path / "two"), train, "test has 2 checkpoints but train has 1 checkpoint"),
    ):
        assert main(["score", "--test", t, "--train", tr]) == 1
        line = _line(capsys.readouterr().err, "score")
        assert f"--test {t} and --train {tr} do not match: {words}" in line, line
        assert line.endswith("give stores exported the same way (model, checkpoints, layers, mode, projection)")
    for command, option, path, row in (
        (["score", "--test", test, "--train", nan_train], "--train", nan_train, 4),
        (["score", "--test", nan_test, "--train", train], "--test", nan_test, 1),
        (["self-influence", nan_train], "path", nan_train, 4),
    ):
        assert main(command) == 1
        line = _line(capsys.readouterr().err, command[0])
        assert f"{option} {path}: checkpoint 0 holds NaN or Inf values, first in rows [{row}]" in line, line
        assert "export those examples again" in line


def test_a_missing_whitening_file_says_how_to_write_one(two, tmp_path, capsys):
    """`--whitening white.npz` as the README shows it, without the file: the error says what file it wants
    and how to write one (it said only 'no such file white.npz')."""
    test, train = two
    missing = tmp_path / "white.npz"
    assert main(["score", "--test", test, "--train", train, "--whitening", str(missing)]) == 1
    line = _line(capsys.readouterr().err, "score")
    assert line.startswith(f"tracin score: error: --whitening: no such file {missing}")
    assert "tracin.Whitening.fit(tracin.GradientStore.open(" in line and ".save(" in line, line


def _two_checkpoint_store(path, mats, weights):
    w = tracin.GradientStore.create(path, len(mats[0]), [m.shape[1] for m in mats], weights=weights)
    for c, m in enumerate(mats):
        w.write(c, 0, m)
    w.finalize()
    return str(path)


@pytest.mark.parametrize("normalize", [False, True])
def test_aggregate_ranks_train_rows_by_their_influence_on_the_whole_test_set(normalize, tmp_path, rng, capsys):
    """`tracin aggregate` (there was no command for a target set's influence, tracin.aggregate): each train row's
    influence summed over the --test rows, ranked highest first (equal sums in row order), against float64 NumPy;
    --top keeps the first N; without -o the CSV goes to stdout."""
    weights = [0.5, 0.1]
    test = [rng.standard_normal((4, d)).astype(np.float32) for d in (6, 3)]
    train = [rng.standard_normal((30, d)).astype(np.float32) for d in (6, 3)]
    train = [np.concatenate([m, m[:5]]) for m in train]  # rows 30..34 repeat rows 0..4: equal sums
    paths = [_two_checkpoint_store(tmp_path / name, m, weights) for name, m in (("te", test), ("tr", train))]

    def rows64(m):
        m = m.astype(np.float64)
        return m / np.linalg.norm(m, axis=1, keepdims=True) if normalize else m

    exact = sum(w * (rows64(a) @ rows64(b).T).sum(0) for w, a, b in zip(weights, test, train, strict=True))
    extra = ["--normalize"] if normalize else []
    out = tmp_path / "utility.csv"
    assert main(["aggregate", "--test", paths[0], "--train", paths[1], "-o", str(out), *extra]) == 0
    assert capsys.readouterr().err.strip().endswith(f"wrote {out}")
    ranked = list(csv.DictReader(open(out)))
    assert list(ranked[0]) == ["rank", "train_row", "train_id", "influence"]
    assert [int(r["rank"]) for r in ranked] == list(range(1, 36))
    got = np.array([int(r["train_row"]) for r in ranked])
    values = np.array([float(r["influence"]) for r in ranked])
    pairs = list(zip(weights, test, train, strict=True))
    scale = sum(w * (np.abs(rows64(a)) @ np.abs(rows64(b)).T).sum(0) for w, a, b in pairs)
    np.testing.assert_allclose(values, exact[got], rtol=0, atol=1e-5 * scale.max())
    assert np.all(np.diff(values) <= 0)  # highest first
    order = np.argsort(-np.round(exact, 9), kind="stable")  # ties (the repeated rows) in row order
    assert got.tolist() == order.tolist()
    assert main(["aggregate", "--test", paths[0], "--train", paths[1], "--top", "3", *extra]) == 0
    captured = capsys.readouterr()
    listed = list(csv.DictReader(captured.out.splitlines()))
    assert [int(r["train_row"]) for r in listed] == order[:3].tolist()
    assert captured.err.strip() == (
        f"aggregate{' (cosine scores)' if normalize else ''} influence of 4 test rows on 35 train rows, 3 ranked"
    )


def test_aggregate_refusals_name_their_options(tmp_path, rng, capsys):
    """aggregate's mistakes as score's: a .npy for a store, stores that do not match, an -o of another suffix."""
    test = _store(tmp_path / "test", rng.standard_normal((3, 4)).astype(np.float32))
    narrow = _store(tmp_path / "narrow", rng.standard_normal((6, 3)).astype(np.float32))
    np.save(tmp_path / "g.npy", np.zeros((3, 4), np.float32))
    assert main(["aggregate", "--test", str(tmp_path / "g.npy"), "--train", narrow]) == 1
    assert "--test: " in _line(capsys.readouterr().err, "aggregate")
    assert main(["aggregate", "--test", test, "--train", narrow]) == 1
    assert f"--test {test} and --train {narrow} do not match" in _line(capsys.readouterr().err, "aggregate")
    assert main(["aggregate", "--test", test, "--train", test, "-o", str(tmp_path / "x.npz")]) == 2
    assert "--output must end in .csv" in _line(capsys.readouterr().err, "aggregate")
    help_text = build_parser().format_help()
    assert "aggregate" in help_text and "tracin aggregate --test" in help_text


@pytest.mark.parametrize("joined", [False, True], ids=["spaced", "equals"])
def test_self_influence_given_test_and_train_says_it_reads_one_store(two, capsys, joined):
    """`tracin self-influence --test T --train S` (score's options) suggested --threads; it now says self-influence
    reads one store, given as its path. Written `--test=T --train=S`, argparse said only that the path is missing."""
    test, train = two
    argv = [f"--test={test}", f"--train={train}"] if joined else ["--test", test, "--train", train]
    with pytest.raises(SystemExit) as e:
        main(["self-influence", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "did you mean --threads" not in err
    assert "self-influence reads one store, given as its path: tracin self-influence STORE" in err, err


def test_aggregate_opponents_ranks_the_most_harmful_train_rows_first(tmp_path, rng, capsys):
    """--side opponents: the train rows whose summed influence on the test set is lowest (most negative) first,
    equal sums in row order, against float64 NumPy (a target set's most harmful rows: data cleaning)."""
    test = rng.standard_normal((5, 4)).astype(np.float32)
    train = rng.standard_normal((20, 4)).astype(np.float32)
    train = np.concatenate([train, train[:3]])
    paths = _store(tmp_path / "te", test), _store(tmp_path / "tr", train)
    exact = 0.5 * (test.astype(np.float64) @ train.astype(np.float64).T).sum(0)
    assert main(["aggregate", "--test", paths[0], "--train", paths[1], "--side", "opponents", "--top", "6"]) == 0
    captured = capsys.readouterr()
    listed = list(csv.DictReader(captured.out.splitlines()))
    assert [int(r["train_row"]) for r in listed] == np.argsort(np.round(exact, 9), kind="stable")[:6].tolist()
    np.testing.assert_allclose([float(r["influence"]) for r in listed], np.sort(exact)[:6], rtol=1e-5, atol=1e-5)
    assert captured.err.strip() == "aggregate influence of 5 test rows on 23 train rows, 6 ranked, lowest first"


def test_a_folder_that_is_not_a_store_says_what_it_holds(two, tmp_path, rng, capsys):
    """A folder of np.save files (one per checkpoint), or the folder above the stores (grads/ for grads/train):
    the error said only '(no manifest.json)'; it now says what the folder holds and what to give instead."""
    test, train = two
    npys = tmp_path / "npys"
    npys.mkdir()
    for c in range(2):
        np.save(npys / f"ckpt{c}.npy", rng.standard_normal((5, 4)).astype(np.float32))
    above = tmp_path  # holds the stores test and train of `two`
    for folder, words in (
        (npys, [f"{npys} holds .npy files (ckpt0.npy, ckpt1.npy) but no manifest.json", "GradientStore.create("]),
        (above, [f"{above} is no gradient store but holds some: {above / 'test'}, {above / 'train'}"]),
    ):
        for command, option in (
            (["info", str(folder)], None),
            (["score", "--test", str(folder), "--train", train], "--test"),
            (["self-influence", str(folder)], "path"),
            (["aggregate", "--test", test, "--train", str(folder)], "--train"),
        ):
            assert main(command) == 1
            line = _line(capsys.readouterr().err, command[0])
            assert line.startswith(f"tracin {command[0]}: error: " + ("" if option is None else f"{option}: ")), line
            assert all(w in line for w in words), line
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["info", str(empty)]) == 1
    assert _line(capsys.readouterr().err, "info").endswith("(no manifest.json)")
