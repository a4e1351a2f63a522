"""What the command line says of a NumPy file or a folder given where a gradient store goes, in detail
(r347 mutation testing of cli._numpy_file_advice / _folder_advice: the suggested folder, the np.load call, the
'...' after three names, the .NPZ suffix's case, a zip that is no .npz, an interrupted create holding .npy files
and a folder holding both stores and .npy files were not pinned; nor was the self-influence hint kept to
self-influence)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import tracin
from tracin.cli import main
from tracin.store._format import CREATING


def _store(path, rows=4, dims=3):
    w = tracin.GradientStore.create(path, rows, [dims], weights=[0.5])
    w.write(0, 0, np.ones((rows, dims), np.float32))
    w.finalize()
    return str(path)


def _error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tracin {command}: error: "), err
    return lines[0][len(f"tracin {command}: error: ") :]


@pytest.mark.parametrize(
    "name,folder",
    [("grads.npy", "grads"), ("grads.v2.npy", "grads.v2"), ("grads", "grads-store")],
)
def test_an_npy_file_names_the_folder_to_make_and_how_to_load_it(name, folder, tmp_path, capsys):
    """np.save's file: the Python it suggests loads it memory-mapped and writes the store to the file's name less
    its suffix, or NAME-store where it has none (the folder must not be the file itself)."""
    path = tmp_path / name
    with open(path, "wb") as f:
        np.save(f, np.zeros((5, 4), np.float32))
    assert main(["info", str(path)]) == 1
    said = _error(capsys.readouterr().err, "info")
    assert said.startswith(f"{path} is a NumPy array file (np.save), not a gradient store"), said
    assert f"g = np.load({str(path)!r}, mmap_mode='r'); " in said, said
    assert f"tracin.GradientStore.create({str(tmp_path / folder)!r}, n_rows=len(g), dims=[g.shape[1]])" in said, said


@pytest.mark.parametrize("name", ["grads.npz", "GRADS.NPZ", "Grads.Npz"])
def test_an_npz_archive_of_any_suffix_case_is_named_an_archive(name, tmp_path, capsys):
    """np.savez's archive, its suffix in any case: the advice names an array of it ([NAME]), not the plain
    '(not a directory)'."""
    path = tmp_path / name
    with open(path, "wb") as f:
        np.savez(f, g=np.zeros((5, 4), np.float32))
    assert main(["score", "--test", str(path), "--train", _store(tmp_path / "train", dims=4)]) == 1
    said = _error(capsys.readouterr().err, "score")
    assert said.startswith(f"--test: {path} is a NumPy archive (np.savez), not a gradient store"), said
    assert f"g = np.load({str(path)!r})[NAME]; " in said, said
    assert f"tracin.GradientStore.create({str(tmp_path / name[:-4])!r}, n_rows=len(g)" in said, said


def test_a_zip_that_is_no_npz_keeps_the_plain_message(tmp_path, capsys):
    """A zip archive not named .npz (a .zip of exports, say) is not called a NumPy archive."""
    path = tmp_path / "grads.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("g.npy", b"")
    assert main(["self-influence", str(path)]) == 1
    said = _error(capsys.readouterr().err, "self-influence")
    assert "(not a directory)" in said and "NumPy" not in said, said


@pytest.mark.parametrize("count", [3, 4])
def test_a_folder_names_at_most_three_npy_files_then_dots(count, tmp_path, capsys):
    """Three .npy files are all named; a fourth is left as ', ...' (three named, in name order)."""
    folder = tmp_path / "npys"
    folder.mkdir()
    for c in reversed(range(count)):
        np.save(folder / f"ckpt{c}.npy", np.zeros((2, 2), np.float32))
    assert main(["info", str(folder)]) == 1
    said = _error(capsys.readouterr().err, "info")
    shown = "ckpt0.npy, ckpt1.npy, ckpt2.npy" + (", ..." if count > 3 else "")
    assert said.startswith(f"{folder} holds .npy files ({shown}) but no manifest.json"), said


@pytest.mark.parametrize("count", [3, 4])
def test_a_folder_names_at_most_three_stores_then_dots(count, tmp_path, capsys):
    folder = tmp_path / "grads"
    folder.mkdir()
    for c in range(count):
        _store(folder / f"s{c}")
    assert main(["info", str(folder)]) == 1
    said = _error(capsys.readouterr().err, "info")
    shown = ", ".join(str(folder / f"s{c}") for c in range(3)) + (", ..." if count > 3 else "")
    assert said == f"{folder} is no gradient store but holds some: {shown}; give one of those", said


def test_a_folder_holding_stores_and_npy_files_names_the_stores(tmp_path, capsys):
    """grads/ holding the stores and a stray .npy: the stores are what to give."""
    folder = tmp_path / "grads"
    folder.mkdir()
    np.save(folder / "stray.npy", np.zeros((2, 2), np.float32))
    train = _store(folder / "train")
    assert main(["self-influence", str(folder)]) == 1
    said = _error(capsys.readouterr().err, "self-influence")
    assert said == f"path: {folder} is no gradient store but holds some: {train}; give one of those", said


def test_a_subfolder_without_a_manifest_is_not_called_a_store(tmp_path, capsys):
    """Only folders holding a manifest.json are named as stores: beside an empty one, the .npy advice."""
    folder = tmp_path / "grads"
    (folder / "logs").mkdir(parents=True)
    np.save(folder / "ckpt0.npy", np.zeros((2, 2), np.float32))
    assert main(["info", str(folder)]) == 1
    said = _error(capsys.readouterr().err, "info")
    assert said.startswith(f"{folder} holds .npy files (ckpt0.npy) but no manifest.json"), said


def test_an_interrupted_create_holding_npy_files_is_called_interrupted(tmp_path, capsys):
    """A create killed part-way leaves its marker beside checkpoint .npy files: that is what is said, not advice to
    make a store of the .npy files."""
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / CREATING).write_bytes(b"")
    np.save(folder / "checkpoint_000.npy", np.zeros((2, 2), np.float32))
    for argv, option in (
        (["info", str(folder)], ""),
        (["aggregate", "--test", str(folder), "--train", "r"], "--test: "),
    ):
        assert main(argv) == 1
        said = _error(capsys.readouterr().err, argv[0])
        assert said.startswith(f"{option}no gradient store at {folder} yet"), said
        assert "interrupted GradientStore.create" in said and ".npy files" not in said, said


@pytest.mark.parametrize("command", ["info", "score", "aggregate"])
def test_only_self_influence_given_test_or_train_gets_its_one_store_hint(command, tmp_path, capsys):
    """The 'self-influence reads one store' hint is self-influence's: info given --test (an option it lacks) is
    told what argparse says, not about self-influence."""
    argv = {"info": ["info", "x", "--test", "t"], "score": ["score", "--test", "t", "--train", "r", "--train2", "r"]}
    argv["aggregate"] = ["aggregate", "--test", "t", "--train", "r", "--trains", "r"]
    with pytest.raises(SystemExit) as e:
        main(argv[command])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unrecognized arguments: " in err, err
    assert "self-influence reads one store" not in err, err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_a_fifo_given_for_a_store_is_not_read(tmp_path):
    """A FIFO (or `--test <(...)`'s pipe, a terminal) given where a store goes: the NumPy-file check read its first
    bytes and waited forever for a writer (r347); it is now refused as before, '(not a directory)', at once."""
    fifo = tmp_path / "grads"
    os.mkfifo(fifo)
    for argv, head in ((["info", str(fifo)], ""), (["score", "--test", str(fifo), "--train", str(fifo)], "--test: ")):
        try:
            done = subprocess.run(
                [sys.executable, "-m", "tracin", *argv], capture_output=True, text=True, timeout=60, cwd=tmp_path
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"tracin {argv[0]} waited on the FIFO")
        assert done.returncode == 1, done.stderr
        assert done.stderr == f"tracin {argv[0]}: error: {head}no gradient store at {fifo} (not a directory)\n"


@pytest.mark.parametrize("command", ["info", "self-influence"])
def test_a_stores_own_npy_file_names_the_store_not_a_new_one(command, tmp_path, capsys, monkeypatch):
    """A checkpoint's .npy file inside a store (grads/train/checkpoint_000.npy, one tab-completion too far) is
    named a file of that store, to be given instead: making a one-checkpoint store of it, as for a user's own
    .npy file, would drop the other checkpoints, the weights and the ids."""
    store = tmp_path / "train"
    _store(store)
    (inside,) = [f for f in os.listdir(store) if f.endswith(".npy")]
    monkeypatch.chdir(tmp_path)
    assert main([command, os.path.join("train", inside)]) == 1
    said = _error(capsys.readouterr().err, command)
    expected = f"{os.path.join('train', inside)} is a file of the gradient store train: give that folder"
    assert said == expected or said == f"path: {expected}", said


@pytest.mark.parametrize("where", ["mine.npy", os.path.join("sub", "g.npy")])
def test_a_users_own_npy_file_in_or_below_a_store_is_advised_to_become_a_store(where, tmp_path, capsys):
    """Only a file the store wrote, in its own folder, is called the store's: a user's own .npy file kept in the
    store's folder or a folder below is told how to make a store of it (review370 F4)."""
    store = tmp_path / "train"
    _store(store)
    path = store / where
    path.parent.mkdir(exist_ok=True)
    np.save(path, np.zeros((5, 3), np.float32))
    assert main(["info", str(path)]) == 1
    said = _error(capsys.readouterr().err, "info")
    assert said.startswith(f"{path} is a NumPy array file (np.save), not a gradient store"), said


def test_a_link_to_a_stores_file_names_the_store_it_points_into(tmp_path, capsys):
    """A symbolic link to a store's checkpoint file got the make-a-store advice, which drops the other checkpoints,
    the weights and the ids (fr375 F2): the store the link points into is named."""
    store = tmp_path / "train"
    _store(store)
    (inside,) = [f for f in os.listdir(store) if f.endswith(".npy")]
    link = tmp_path / "mine.npy"
    link.symlink_to(store / inside)
    assert main(["info", str(link)]) == 1
    assert (
        _error(capsys.readouterr().err, "info") == f"{link} is a file of the gradient store {store}: give that folder"
    )


@pytest.mark.parametrize("name", ["checkpoint_007.npy", "ids.npy"])
def test_a_file_named_like_a_stores_own_that_it_does_not_list_is_the_users(name, tmp_path, capsys):
    """A file in a store's folder named like a store's own but not among its files (a checkpoint it does not
    have; ids.npy in a store without ids) was called the store's (fr375 F3): it is the user's, told how to make a
    store of it."""
    store = tmp_path / "train"
    _store(store)
    path = store / name
    np.save(path, np.zeros((4, 3), np.float32))
    assert main(["info", str(path)]) == 1
    said = _error(capsys.readouterr().err, "info")
    assert said.startswith(f"{path} is a NumPy array file (np.save), not a gradient store"), said
