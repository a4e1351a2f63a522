"""The library's refusals of a --test and --train that do not go together reach the shell naming both options and
their stores, with command line advice (r370 F5): two whitened stores, and every mismatch of the stores' records."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from tests.test_cli import _records
from tracin.cli import main

_TAIL = "give stores exported the same way (model, checkpoints, layers, mode, projection"


def _store(path, mat, metadata=None, weights=(0.5,)):
    w = tracin.GradientStore.create(path, len(mat), [mat.shape[1]], weights=list(weights), metadata=metadata)
    w.write(0, 0, np.asarray(mat, dtype=np.float32))
    w.finalize()
    return str(path)


def _error(capsys, command):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"tracin {command}: error: ")]
    assert len(lines) == 1, lines
    return lines[0].removeprefix(f"tracin {command}: error: ")


@pytest.mark.parametrize("command", ["score", "aggregate"])
@pytest.mark.parametrize("normalize", [False, True])
def test_two_whitened_stores_get_shell_advice_naming_both(command, normalize, tmp_path, rng, capsys):
    """Both stores whitened (Whitening.apply's output): _pair's plain ValueError reached the shell with Python's
    advice ('whiten only the test side (Whitening.apply)'), naming neither option; now both, and the options."""
    train = tracin.Gradients([rng.standard_normal((8, 4)).astype(np.float32)], [0.5])
    whitening = tracin.Whitening.fit(train, damping=0.5, progress=False)
    paths = {}
    for name, n in (("test", 3), ("train", 8)):
        white = whitening.apply(tracin.Gradients([rng.standard_normal((n, 4)).astype(np.float32)], [0.5]))
        paths[name] = _store(tmp_path / f"white {name}", white.matrices[0], white.metadata, white.weights)
    args = [command, "--test", paths["test"], "--train", paths["train"], "-o", str(tmp_path / "out.csv")]
    assert main(args + (["--normalize"] if normalize else [])) == 1
    said = _error(capsys, command)
    both = f"--test {paths['test']} and --train {paths['train']} are both whitened"
    assert both in said, said
    assert said.startswith("--normalize does not combine" if normalize else both), said
    assert "give a whitened --test and an unwhitened --train, or the unwhitened stores with --whitening" in said
    assert said.endswith(", without --normalize") == normalize, said
    assert "Whitening.apply" not in said and "test side" not in said and "normalize=" not in said, said
    assert not (tmp_path / "out.csv").exists()


_FULL = {"mode": "full"}
_CASES = {  # the two stores' metadata -> the library's words for them
    "mode": ({"mode": "full"}, {"mode": "last_layer"}, "test gradients are mode='full' but train gradients are mode="),
    "preconditioner": (
        {**_FULL, "preconditioner": None},
        {**_FULL, "preconditioner": {"kind": "adam"}},
        "test gradients are preconditioner=None but train gradients are preconditioner='adam'",
    ),
    "adam_update test": (
        {**_FULL, "preconditioner": {"kind": "adam_update"}},
        {**_FULL, "preconditioner": None},
        "test gradients are preconditioner='adam_update', which is for train rows only",
    ),
    "adam_update train": (
        {**_FULL, "preconditioner": {"kind": "adam"}},
        {**_FULL, "preconditioner": {"kind": "adam_update"}},
        "train gradients are preconditioner='adam_update', which pairs with plain test rows",
    ),
    "hyperparameters": (
        {**_FULL, "preconditioner": {"kind": "adam", "b2": 0.99}},
        {**_FULL, "preconditioner": {"kind": "adam", "b2": 0.999}},
        "test and train were preconditioned with other settings",
    ),
    "frameworks": (
        {**_FULL, "framework": "torch", "params": [{"name": "w", "shape": [2, 2]}]},
        {**_FULL, "framework": "jax", "params": [{"name": "w", "shape": [4]}]},
        "test ('torch') and train ('jax') lay out their rows differently",
    ),
    "params": (
        {**_FULL, "framework": "torch", "params": [{"name": "a", "shape": [4]}]},
        {**_FULL, "framework": "torch", "params": [{"name": "b", "shape": [4]}]},
        "test and train are gradients of different parameters",
    ),
    "projected train": (
        {"projection": None},
        {"projection": tracin.Projection(4, seed=0).to_dict()},
        "projection mismatch: test is not projected",
    ),
    "projected test": (
        {"projection": tracin.Projection(4, seed=0).to_dict()},
        {"projection": None},
        "projection mismatch: train is not projected",
    ),
    "projection seeds": (
        {"projection": tracin.Projection(4, seed=1).to_dict()},
        {"projection": tracin.Projection(4, seed=0).to_dict()},
        "projection mismatch (projected gradients are only comparable under the same projection): seed",
    ),
    "projection segment layouts": (
        {"projection": {**tracin.Projection(4, seed=0, per_layer=True).to_dict(), "segments": [2, 2]}},
        {"projection": {**tracin.Projection(4, seed=0, per_layer=True).to_dict(), "segments": [4]}},
        "projection mismatch: test gradients and train gradients are projected over different segment layouts",
    ),
}


@pytest.mark.parametrize("command", ["score", "aggregate"])
@pytest.mark.parametrize("case", sorted(_CASES))
def test_stores_whose_records_do_not_match_name_both_options(case, command, tmp_path, rng, capsys):
    """scoring._check_same_gradient_space's refusals (mode, preconditioner, its settings, frameworks, parameters,
    projection) reached the shell in the library's words alone ('test gradients are preconditioner=None but train
    gradients are ...'), naming neither --test nor --train: now both, with their stores, as for other mismatches."""
    test_meta, train_meta, words = _CASES[case]
    te = _store(tmp_path / "te", rng.standard_normal((3, 4)), test_meta)
    tr = _store(tmp_path / "tr", rng.standard_normal((5, 4)), train_meta)
    assert main([command, "--test", te, "--train", tr, "-o", str(tmp_path / "out.csv")]) == 1
    said = _error(capsys, command)
    assert said.startswith(f"--test {te} and --train {tr} do not match: {words}"), said
    if "adam_update" in case:  # the library's advice (export the test rows with preconditioner=None) alone: the
        # "same way" tail contradicted it (fr377 F1)
        assert said.endswith("export test rows with preconditioner=None") or "pairs with plain test rows" in said
        assert "exported the same way" not in said, said
    else:
        tail = _TAIL + (", preconditioner)" if case in ("preconditioner", "hyperparameters") or "adam" in case else ")")
        assert said.endswith(tail), said
    assert not (tmp_path / "out.csv").exists()


_FITTED_ON = {  # what differs in the records of the gradients the --train store's whitening was fitted on
    "preconditioner": (
        {"preconditioner": {"kind": "adam"}},
        None,
        "--train is whitened by a whitening fitted on preconditioner='adam' gradients but --test holds "
        "preconditioner=None ones; ",
    ),
    "checkpoints": (
        {"fingerprints": {"data": "d", "checkpoints": ["a", "c"], "optimizer_states": ["s0", "s1"]}},
        None,
        "--train's whitening was fitted on gradients exported differently from --test (checkpoints [1] differ); ",
    ),
    "optimizer states": (
        {
            "preconditioner": {"kind": "adam"},
            "fingerprints": {"data": "d", "checkpoints": ["a", "b"], "optimizer_states": ["x", "s1"]},
        },
        "adam",
        "--train's whitening was fitted on gradients exported differently from --test (the optimizer states of "
        "checkpoints [0] differ); ",
    ),
    "mode": (
        {"mode": "last_layer"},
        None,
        "--train's whitening does not fit --test: the gradients --train's whitening was fitted on are "
        "mode='last_layer' but ",
    ),
}


@pytest.mark.parametrize("command", ["score", "aggregate"])
@pytest.mark.parametrize("case", sorted(_FITTED_ON))
def test_a_whitened_train_store_fitted_on_other_gradients_is_named_as_train(case, command, tmp_path, rng, capsys):
    """A whitened --train store (Whitening.apply's output as the train side, which the library scores as it would
    the whitened test side) whose whitening was fitted on gradients exported otherwise than --test's: the refusal
    said '--test is whitened ... but --train holds' (the sides swapped), '--test and --train were exported at
    different checkpoints' (neither store was), or the library's words alone; now it names --train's whitening."""
    changed, test_kind, said_first = _FITTED_ON[case]
    weights = [0.5, 2.0]
    blocks = [rng.standard_normal((6, 3)).astype(np.float32) for _ in weights]
    fitted_on = tracin.Gradients(blocks, weights)
    fitted_on.metadata.update(_records(kind=test_kind))  # the whitened rows keep these records
    white = tracin.Whitening.fit(fitted_on, damping=0.5, progress=False).apply(fitted_on)
    metadata = dict(white.metadata)
    metadata["whitening"] = {**metadata["whitening"], "space": {**metadata["whitening"]["space"], **changed}}
    tr = tmp_path / "white train"
    w = tracin.GradientStore.create(tr, 6, [3, 3], weights=weights, metadata=metadata)
    for c, m in enumerate(white.matrices):
        w.write(c, 0, np.asarray(m))
    w.finalize()
    te = tmp_path / "te"
    w = tracin.GradientStore.create(te, 2, [3, 3], weights=weights, metadata=_records(kind=test_kind))
    for c in range(2):
        w.write(c, 0, rng.standard_normal((2, 3)).astype(np.float32))
    w.finalize()
    assert main([command, "--test", str(te), "--train", str(tr), "-o", str(tmp_path / "out.csv")]) == 1
    said = _error(capsys, command)
    assert said.startswith(said_first), said
    assert said.endswith(
        "; whiten --train's unwhitened store with a whitening fitted on it, or give the unwhitened --train with "
        "--whitening (a whitening fitted on it)"
    ), said
    assert "--test is whitened" not in said and "Whitening.fit" not in said and "side's" not in said, said


_UNREADABLE = {  # a side's metadata['projection'] -> the library's words for it
    "another generator": (
        {**tracin.Projection(4, seed=0).to_dict(), "generator": 999},
        "projection spec from generator version 999; this tracin generates version 1 and cannot reproduce it: use "
        "the tracin that wrote it, or export again with this one",
    ),
    "not a spec": ("gaussian", "metadata['projection'] is not a projection spec tracin can read"),
}


@pytest.mark.parametrize("command", ["score", "aggregate"])
@pytest.mark.parametrize("side", ["test", "train"])
@pytest.mark.parametrize("case", sorted(_UNREADABLE))
def test_a_store_whose_projection_record_cannot_be_read_is_named_by_its_option(
    case, side, command, tmp_path, rng, capsys
):
    """A store whose metadata['projection'] tracin cannot read was named by its path alone ('test gradients (gradient
    store /abs/te): ...'), not by the option that gave it: now by the option and the path as given."""
    spec, words = _UNREADABLE[case]
    meta = {"test": {"projection": None}, "train": {"projection": None}}
    meta[side] = {"projection": spec}
    te = _store(tmp_path / "te", rng.standard_normal((3, 4)), meta["test"])
    tr = _store(tmp_path / "tr", rng.standard_normal((5, 4)), meta["train"])
    assert main([command, "--test", te, "--train", tr, "-o", str(tmp_path / "out.csv")]) == 1
    said = _error(capsys, command)
    assert said.startswith(f"--{side} {te if side == 'test' else tr}: {words}"), said
    assert "gradient store" not in said and "do not match" not in said, said
    assert not (tmp_path / "out.csv").exists()


def test_a_store_path_holding_the_separator_is_named_whole(tmp_path, rng, capsys):
    """The option-named refusal cut the library's message at the first '): ' after its prefix, inside a path such
    as 'odd): name/te': the path as given, then the library's words, whole."""
    spec, words = _UNREADABLE["another generator"]
    te = _store(tmp_path / "odd): name" / "te", rng.standard_normal((3, 4)), {"projection": spec})
    tr = _store(tmp_path / "tr", rng.standard_normal((5, 4)), {"projection": None})
    assert main(["score", "--test", te, "--train", tr, "-o", str(tmp_path / "out.csv")]) == 1
    assert _error(capsys, "score") == f"--test {te}: {words}"
