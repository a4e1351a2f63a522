"""The demo end to end at its fixed seed (a quality regression in TracIn's mislabel detection fails
here), the command lines it prints, and the pieces it is built from, against float64 references."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from tracin.cli import build_parser, main
from tracin.demo import DemoConfig, DemoResult, run_demo
from tracin.demo.data import load_noisy_digits
from tracin.demo.detection import detection_curve, found_at, perfect_curve
from tracin.demo.framework import checkpoint_path, trainer
from tracin.demo.mlp import batch_gradient, cross_entropy, forward, init_params, per_example_factors
from tracin.demo.outputs import LEDGER, DemoFiles
from tracin.demo.recipe import RULE, checkpoints_to_trace
from tracin.demo.report import NOTHING_FLIPPED, write_report
from tracin.demo.run import LOSS, PERFECT, RANDOM, TRACIN, TRACIN_ALL
from tracin.demo.training import TrainingConfig
from tracin.store import GradientStore

QUIET = {"progress": False, "log": lambda *_: None}  # run_demo without bar or log lines


@pytest.fixture(scope="module")
def demo_and_grid(tmp_path_factory):
    """The demo with its default settings (NumPy): its output folder, result and every line it printed,
    and what its proponents/opponents figure was drawn from (plot_influence_grid's arguments)."""
    import tracin.demo.run as demo_run

    out = tmp_path_factory.mktemp("demo") / "out"
    lines: list[str] = []
    drawn = []
    plot = demo_run.plot_influence_grid
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo_run, "plot_influence_grid", lambda *a: drawn.append(a) or plot(*a))
        result = run_demo(DemoConfig(output=out), progress=False, log=lines.append)
    return (out, result, lines), drawn[0]


@pytest.fixture(scope="module")
def default_demo(demo_and_grid):
    """(output folder, result, printed lines) of the demo with its default settings."""
    return demo_and_grid[0]


def test_detection_curve_counts_flipped_examples_in_score_order():
    flipped = np.array([False, True, False, True])
    curve = detection_curve(np.array([0.1, 0.9, 0.5, 0.2]), flipped)
    # order by score: 1 (flipped), 2, 3 (flipped), 0
    np.testing.assert_allclose(curve, [0, 0.5, 0.5, 1.0, 1.0])
    assert found_at(curve, 0.25) == 0.5
    # a fraction of 100 rows that float arithmetic puts just under a whole count (0.29 * 100 = 28.999...)
    assert found_at(np.linspace(0.0, 1.0, 101), 0.29) == pytest.approx(0.29)


def test_detection_curve_breaks_score_ties_by_row_and_finds_nothing_without_flips():
    """Tied scores are inspected in row order (the docstring's rule, so a curve does not depend on the sort
    algorithm); a training set without flipped labels has a curve of 0, not NaN."""
    scores = np.tile([0.0, 2.0, 1.0], 20)  # 20-row ties, interleaved: a non-stable sort reorders them
    flipped = np.zeros(60, dtype=bool)
    flipped[[1, 4, 5, 20, 57]] = True
    order = [i for value in (2.0, 1.0, 0.0) for i in range(60) if scores[i] == value]  # ties in row order
    want = np.concatenate([[0], np.cumsum(flipped[order])]) / 5
    np.testing.assert_array_equal(detection_curve(scores, flipped), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(detection_curve(scores, np.zeros(60, dtype=bool)), np.zeros(61))


def test_perfect_curve_bounds_every_ranking():
    rng = np.random.default_rng(0)
    flipped = rng.random(50) < 0.3
    best = perfect_curve(50, int(flipped.sum()))
    np.testing.assert_allclose(best, np.minimum(np.arange(51) / flipped.sum(), 1.0))
    for _ in range(20):
        assert np.all(detection_curve(rng.random(50), flipped) <= best + 1e-12)
    np.testing.assert_allclose(detection_curve(flipped.astype(float), flipped), best)  # the oracle ranking
    np.testing.assert_array_equal(perfect_curve(4, 0), np.zeros(5))  # nothing to find


def test_noisy_digits_flip_exactly_the_asked_fraction_to_other_classes():
    data = load_noisy_digits(0.2, seed=3)
    assert data.flipped.sum() == 280 and data.flip_rate == 0.2
    assert np.all(data.y_train[data.flipped] != data.y_train_clean[data.flipped])
    assert np.array_equal(data.y_train[~data.flipped], data.y_train_clean[~data.flipped])
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    np.testing.assert_array_equal(data.y_train_clean, y[data.train_index])
    np.testing.assert_allclose(data.x_train, x[data.train_index] / 16.0, rtol=1e-6)
    with pytest.raises(ValueError, match="noise must be in"):
        load_noisy_digits(1.5, seed=0)


def _numerical_gradient(f, params: dict, eps: float = 1e-6) -> dict:
    """Central differences of the scalar f(params) in float64, one array per parameter."""
    grads = {}
    for name, value in params.items():
        g = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            plus, minus = ({**params, name: value.copy()} for _ in range(2))
            plus[name][i] += eps
            minus[name][i] -= eps
            g[i] = (f(plus) - f(minus)) / (2 * eps)
        grads[name] = g
    return grads


def test_mlp_gradients_match_float64_finite_differences():
    rng = np.random.default_rng(1)
    params = {k: v.astype(np.float64) for k, v in init_params(6, 5, 10, seed=2).items()}
    x, y = rng.random((3, 6)), np.array([0, 7, 3])

    def loss(p, rows=slice(None)):
        return cross_entropy(forward(p, x[rows])[1], y[rows]).mean()

    expected = _numerical_gradient(loss, params)
    for name, g in batch_gradient(params, x, y).items():
        np.testing.assert_allclose(g, expected[name], rtol=1e-4, atol=1e-7, err_msg=name)
    for i in range(3):  # per example: [weight; bias] = right x left
        expected = _numerical_gradient(lambda p, i=i: loss(p, slice(i, i + 1)), params)
        for (w, b), (left, right) in zip((("w1", "b1"), ("w2", "b2")), per_example_factors(params, x, y), strict=True):
            full = np.outer(right[i], left[i])
            np.testing.assert_allclose(full[:-1], expected[w], rtol=1e-4, atol=1e-7, err_msg=f"{w}, row {i}")
            np.testing.assert_allclose(full[-1], expected[b], rtol=1e-4, atol=1e-7, err_msg=f"{b}, row {i}")


def _reference_self_influence(checkpoints, x, y, load) -> np.ndarray:
    """sum_c lr_c * |g_c(z)|^2 in float64 from the checkpoints' parameters (load: path -> mlp params)."""
    total = np.zeros(len(x))
    for path, lr in checkpoints:
        params = {k: v.astype(np.float64) for k, v in load(path).items()}
        for left, right in per_example_factors(params, x.astype(np.float64), y):
            total += lr * (left**2).sum(1) * (right**2).sum(1)
    return total


def _load_torch(path):
    import torch

    state = torch.load(path, weights_only=True)
    return {
        "w1": state["0.weight"].numpy().T,
        "b1": state["0.bias"].numpy(),
        "w2": state["2.weight"].numpy().T,
        "b2": state["2.bias"].numpy(),
    }


def _saver(directory, framework):
    """A save(epoch, write) for the trainers that writes checkpoints straight into `directory`."""

    def save(epoch, write):
        directory.mkdir(parents=True, exist_ok=True)
        path = checkpoint_path(directory, epoch, framework)
        write(path)
        return path

    return save


@pytest.mark.parametrize("framework", ["numpy", "jax", "torch"])
def test_every_framework_trains_the_same_network_and_exports_exact_gradients(framework, tmp_path):
    pytest.importorskip(framework)
    config = TrainingConfig(epochs=4, checkpoints=2, hidden=16)
    data = load_noisy_digits(0.2, seed=0, n_train=200)
    _, train = trainer(framework)
    model = train(data, config, _saver(tmp_path / "checkpoints", framework), lambda _: None)
    assert [lr for _, lr in model.checkpoints] == pytest.approx([0.1, 0.01])
    if framework != "numpy":  # the same start, batches and SGD as NumPy: the same network up to rounding
        _, numpy_train = trainer("numpy")
        reference = numpy_train(data, config, _saver(tmp_path / "reference", "numpy"), lambda _: None)
        np.testing.assert_allclose(model.logits(data.x_test), reference.logits(data.x_test), rtol=1e-3, atol=1e-4)

    load = _load_torch if framework == "torch" else lambda p: dict(np.load(p))
    import tracin

    for traced in (2, 1):  # every checkpoint, then the first only
        store = model.export(data.x_train, data.y_train, tmp_path / f"grads{traced}", progress=False, traced=traced)
        expected = _reference_self_influence(model.checkpoints[:traced], data.x_train, data.y_train, load)
        got = tracin.self_influence(GradientStore.open(store.path))
        np.testing.assert_allclose(got, expected, rtol=1e-4)

    for c, (path, _) in enumerate(model.checkpoints):  # each checkpoint's outputs, as the figure shows them
        saved = {k: v.astype(np.float64) for k, v in load(path).items()}
        expected = forward(saved, data.x_test.astype(np.float64))[1]
        np.testing.assert_allclose(model.logits_at(c, data.x_test), expected, rtol=1e-4, atol=1e-4)

    # held-out accuracy is recorded after every epoch; the last one is the final model's
    assert model.held_out_accuracy.shape == (4,)
    final = load(model.checkpoints[-1][0])
    logits = forward({k: v.astype(np.float64) for k, v in final.items()}, data.x_test.astype(np.float64))[1]
    assert model.held_out_accuracy[-1] == pytest.approx(np.mean(logits.argmax(1) == data.y_test))


def test_numpy_export_records_one_fingerprint_per_checkpoint_of_two_layers(tmp_path, capsys):
    from tracin._export.fingerprint import digest_arrays
    from tracin.report import checkpoint_diagnostics

    _, train = trainer("numpy")
    data = load_noisy_digits(0.2, seed=0, n_train=100)
    config = TrainingConfig(epochs=4, checkpoints=2, hidden=8)
    model = train(data, config, _saver(tmp_path / "checkpoints", "numpy"), lambda _: None)
    for traced in (1, 2):
        store = model.export(data.x_train, data.y_train, tmp_path / f"grads{traced}", progress=False, traced=traced)
        saved = [np.load(path) for path, _ in model.checkpoints[:traced]]
        expected = [digest_arrays(s[k] for k in ("w1", "b1", "w2", "b2")) for s in saved]
        assert store.metadata["fingerprints"]["checkpoints"] == expected
        assert len(set(expected)) == traced  # the checkpoints differ
        assert main(["info", str(store.path)]) == 0
        assert f"checkpoints     {traced} x 2 layers  ({2 * traced} factor pairs" in capsys.readouterr().out
    diag = checkpoint_diagnostics(GradientStore.open(tmp_path / "grads2"))
    assert diag.terms.shape == (100, 2)  # grouped per checkpoint, not per layer


def test_the_recipe_traces_up_to_the_first_checkpoint_at_or_after_the_held_out_peak():
    saved = [14, 29, 44, 59]  # 0-based epochs after which checkpoints were saved
    curve = np.linspace(0.5, 0.9, 60)
    assert checkpoints_to_trace(saved, curve) == 4  # still rising at the end: trace all
    for best, expected in ((0, 1), (14, 1), (15, 2), (29, 2), (30, 3), (59, 4)):
        peaked = np.full(60, 0.5)
        peaked[best] = 0.95
        assert checkpoints_to_trace(saved, peaked) == expected, best
    tied = np.full(60, 0.5)
    tied[[20, 50]] = 0.9  # the first of equal peaks counts
    assert checkpoints_to_trace(saved, tied) == 2
    with pytest.raises(ValueError, match="checkpoint_epochs must be a non-empty ascending sequence"):
        checkpoints_to_trace([29, 14], curve)
    with pytest.raises(ValueError, match="checkpoint_epochs must be a non-empty ascending sequence"):
        checkpoints_to_trace([14, 14, 29], curve)  # two checkpoints of one epoch: strictly ascending
    with pytest.raises(ValueError, match="held_out_accuracy must be a non-empty 1-D sequence"):
        checkpoints_to_trace(saved, [])


def test_unknown_or_missing_framework_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="framework must be one of numpy, jax, torch, got 'tensorflow'"):
        trainer("tensorflow")


def test_demo_finds_flipped_labels_better_than_loss_and_random(default_demo):
    out, result, _ = default_demo
    assert result.framework == "numpy"  # the lightest framework is the default
    assert result.train_accuracy_noisy > 0.97  # the model fits the noisy labels
    assert result.test_accuracy > 0.8
    found = result.found
    # The recipe's effect at the default seed (measured 0.911; all checkpoints 0.850, final loss 0.646).
    # 0.89 rather than the 0.90 goal leaves room for other BLAS builds' rounding over 150 epochs.
    assert found[TRACIN][0.2] >= 0.89 > found[TRACIN_ALL][0.2], found
    assert found[TRACIN][0.2] >= found[TRACIN_ALL][0.2] + 0.03, found
    assert found[TRACIN][0.2] >= found[LOSS][0.2] + 0.15, found
    for fraction in (0.1, 0.2):
        assert found[RANDOM][fraction] == pytest.approx(fraction)
        assert found[TRACIN][fraction] >= found[LOSS][fraction] + 0.05, found
        assert found[TRACIN][fraction] >= 3 * fraction, found  # random finds `fraction`
        assert found[TRACIN][fraction] <= found[PERFECT][fraction]
    assert found[PERFECT][0.1] == pytest.approx(0.1 / result.flip_rate)
    rows = list(csv.DictReader(open(out / "self_influence_ranking.csv")))
    assert len(rows) == 1400
    scores = [float(r["self_influence"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert sum(r["flipped"] == "True" for r in rows) == result.n_flipped


def test_the_ranking_names_each_rows_digit_in_load_digits(default_demo):
    """report.md: `digits_row` is the row's index in sklearn.datasets.load_digits(): its image and true label."""
    from sklearn.datasets import load_digits

    out, _, _ = default_demo
    x, y = load_digits(return_X_y=True)
    data = load_noisy_digits(0.2, seed=0)
    rows = list(csv.DictReader(open(out / "self_influence_ranking.csv")))
    at, train = (np.array([int(r[k]) for r in rows]) for k in ("digits_row", "train_row"))
    assert len(set(at.tolist())) == len(rows)
    np.testing.assert_array_equal(y[at], [int(r["true_label"]) for r in rows])
    np.testing.assert_array_equal((x[at] / 16.0).astype(np.float32), data.x_train[train])


def test_the_readme_quotes_what_the_demo_prints(default_demo):
    _, result, lines = default_demo
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    quoted = re.search(
        r"at its defaults it prints ([\d.]+)% of the flipped labels found at 20% inspected "
        r"\(all checkpoints: ([\d.]+)%; final-model loss: ([\d.]+)%, where NumPy's OpenBLAS runs its AVX-512 "
        r"kernels; its AVX2 kernels round training differently: ([\d.]+)% and ([\d.]+)%, "
        r"the recipe's ([\d.]+)% alike\)",
        readme,
    )
    assert quoted, "the README's sentence on the demo's figures"
    recipe, all_avx512, loss_avx512, all_avx2, loss_avx2, recipe_again = quoted.groups()
    assert recipe_again == recipe
    # OpenBLAS's AVX-512 and AVX2 kernels round 150 epochs of training differently (measured: all
    # checkpoints 85.0 / 84.3%, loss 64.6 / 65.7%, the recipe 91.1% on both): the figures quoted for
    # either, each with one flipped label (1/280) of room for other BLAS builds
    quotes = {TRACIN: [recipe], TRACIN_ALL: [all_avx512, all_avx2], LOSS: [loss_avx512, loss_avx2]}
    for name, texts in quotes.items():
        printed = next(line for line in lines if line.startswith(f"| {name} |")).split("|")[3].strip()
        assert printed == f"{result.found[name][0.2]:.1%}"
        gaps = [abs(float(text) / 100 - result.found[name][0.2]) for text in texts]
        assert min(gaps) <= 1 / result.n_flipped, (name, texts, printed)


def test_demo_reports_the_real_flip_rate(default_demo):
    out, result, lines = default_demo
    data = load_noisy_digits(0.2, seed=0)
    assert (result.n_flipped, result.n_train) == (int(data.flipped.sum()), 1400)
    rate = f"{data.flip_rate:.1%}"
    assert any(f"{result.n_flipped} of their labels flipped ({rate})" in line for line in lines)
    report = (out / "report.md").read_text()
    assert f"{result.n_flipped} of the 1400 training labels ({rate})" in report
    assert f"With {rate} of the labels flipped" in report
    assert "How to read influence scores" in report and "proponent" in report and "opponent" in report
    final = np.load(out / "checkpoints" / "checkpoint_0150.npz")  # the last checkpoint is the final model
    logits = forward({k: v.astype(np.float64) for k, v in final.items()}, data.x_train.astype(np.float64))[1]
    fitted = np.mean(logits.argmax(1)[data.flipped] == data.y_train[data.flipped])
    assert result.flipped_fitted == pytest.approx(fitted, abs=2 / result.n_flipped)
    assert f"(it predicts the given wrong label for {result.flipped_fitted:.0%} of the flipped examples)" in report


def _summary(n_flipped, fitted, found):
    return DemoResult(
        "numpy",
        1400,
        n_flipped,
        found,
        0.9,
        0.85,
        1.0,
        {},
        ["tracin info x"],
        np.array([0.5, 0.6]),
        [1, 2],
        2,
        2,
        fitted,
    )


def test_the_report_states_only_what_was_measured(tmp_path):
    methods = (TRACIN, TRACIN_ALL, LOSS, RANDOM, PERFECT)
    config = DemoConfig(output=tmp_path, training=TrainingConfig(epochs=2, checkpoints=2))
    found = {name: {0.1: 0.3, 0.2: 0.5, 0.3: 0.7} for name in methods}
    text = write_report(tmp_path / "r.md", _summary(280, 0.25, found), config).read_text()
    assert "(it predicts the given wrong label for 25% of the flipped examples)" in text  # not "most"
    assert "memorised most" not in text and "won or tied" not in text
    assert "| TracIn self-influence (recipe) | 30.0% | 50.0% | 70.0% |" in text and "mislabel_detection.png" in text
    nothing = {name: {0.1: 0.0, 0.2: 0.0, 0.3: 0.0} for name in methods}
    text = write_report(tmp_path / "q.md", _summary(0, float("nan"), nothing), config).read_text()
    assert NOTHING_FLIPPED in text and "predicts the given wrong label" not in text and "nan" not in text
    assert "| TracIn" not in text and "mislabel_detection.png" not in text  # no table of 0.0% to find nothing


def test_demo_without_flipped_labels_says_there_is_nothing_to_find(tmp_path):
    run_demo(_small(tmp_path), **QUIET)  # with flipped labels: a detection figure
    assert (tmp_path / "mislabel_detection.png").exists()
    lines: list[str] = []
    result = run_demo(  # 0.0003 of the 1400 labels rounds to none: the report said "(noise 0)"
        DemoConfig(output=tmp_path, noise=0.0003, training=TrainingConfig(epochs=2, checkpoints=1), examples=1, k=2),
        progress=False,
        log=lines.append,
    )
    assert result.n_flipped == 0 and np.isnan(result.flipped_fitted)
    assert NOTHING_FLIPPED in lines and not any(line.startswith("|") for line in lines)
    assert NOTHING_FLIPPED in (tmp_path / "report.md").read_text() and "noise 0" not in NOTHING_FLIPPED
    # no figure of flat lines, listed as written: the earlier run's goes too
    assert "detection" not in result.files and not (tmp_path / "mislabel_detection.png").exists()
    assert not any("mislabel_detection" in line for line in lines)
    assert "mislabel_detection.png" not in json.loads((tmp_path / LEDGER).read_text())["files"]
    said = " ".join(lines + (tmp_path / "report.md").read_text().split("\n"))
    assert "noisy training labels" not in said and "accuracy on the training labels" in said  # review34 F3
    assert "for 2 epochs, saving 1 checkpoint" in said and "Here 1 checkpoint was saved, after epoch 2;" in said
    assert "uses the one checkpoint." in said and "1 checkpoints" not in said


def test_demo_counts_in_the_singular(tmp_path):
    lines: list[str] = []
    run_demo(
        DemoConfig(output=tmp_path, noise=0.001, training=TrainingConfig(epochs=1, checkpoints=1), examples=1, k=2),
        progress=False,
        log=lines.append,
    )
    said = " ".join(lines + (tmp_path / "report.md").read_text().split("\n"))
    assert "for 1 epoch, saving 1 checkpoint" in said and "trained with numpy for 1 epoch on" in said
    assert "share of the 1 flipped label found" in said and "(over the one checkpoint " in said
    assert not re.search(r"\b1 (epochs|checkpoints|flipped labels)\b", said)


def test_demo_next_commands_keep_a_folder_named_like_an_option_a_path(tmp_path, monkeypatch):
    from tracin.demo.run import _next_commands

    monkeypatch.chdir(tmp_path)
    for command in _next_commands(Path("-dash")):
        argv = shlex.split(command)
        paths = [a for a in argv if "grads" in a]
        assert paths and all(a.startswith(f".{os.sep}-dash{os.sep}grads{os.sep}") for a in paths), command
    assert _next_commands(Path("out"))[0] == f"tracin info {Path('out', 'grads', 'train')}"


def test_checkpoints_are_saved_after_the_epochs_of_an_even_spacing():
    """i * epochs // checkpoints for i = 1..checkpoints (linspace's float rounding saved some a epoch early:
    150 epochs, 55 checkpoints after epoch 29 instead of 30; review34 F6)."""
    for epochs, checkpoints in ((150, 55), (150, 65), (150, 110), (30, 22), (150, 10), (7, 3)):
        got = TrainingConfig(epochs=epochs, checkpoints=checkpoints).checkpoint_epochs()
        assert got == {i * epochs // checkpoints - 1 for i in range(1, checkpoints + 1)}
        assert len(got) == checkpoints and max(got) == epochs - 1
    assert 29 in TrainingConfig(epochs=150, checkpoints=55).checkpoint_epochs()
    assert 14 in TrainingConfig(epochs=30, checkpoints=22).checkpoint_epochs()


def test_demo_traces_the_checkpoints_up_to_the_held_out_peak(default_demo):
    out, result, lines = default_demo
    epochs = result.checkpoint_epochs
    assert epochs == list(range(15, 151, 15))  # a checkpoint every 10% of the 150 epochs
    assert result.held_out_accuracy.shape == (150,)
    best = int(np.argmax(result.held_out_accuracy)) + 1
    assert result.best_epoch == best
    last = epochs[result.traced - 1]
    assert last >= best and (result.traced == 1 or epochs[result.traced - 2] < best)
    tracing = (
        f"checkpoint 1 of 10 (epoch {last})"
        if result.traced == 1
        else f"checkpoints 1-{result.traced} of 10 (epochs {epochs[0]}-{last})"
    )
    peak, end = f"{result.held_out_accuracy.max():.1%}", f"{result.held_out_accuracy[-1]:.1%}"
    said = f"test accuracy peaked at {peak} (epoch {best}), {end} at the end: tracing {tracing}"
    assert said in lines and any(f"on the test set {end}" in line for line in lines)  # held-out = test set
    data = load_noisy_digits(0.2, seed=0)
    for epoch in (epochs[0], last, epochs[-1]):  # the recorded curve is each saved model's accuracy
        saved = np.load(out / "checkpoints" / f"checkpoint_{epoch:04d}.npz")
        params = {k: v.astype(np.float64) for k, v in saved.items()}
        accuracy = np.mean(forward(params, data.x_test.astype(np.float64))[1].argmax(1) == data.y_test)
        assert result.held_out_accuracy[epoch - 1] == pytest.approx(accuracy)
    traced = GradientStore.open(out / "grads" / "train")
    every = GradientStore.open(out / "grads" / "train_all_checkpoints")
    assert (traced.n_checkpoints, every.n_checkpoints) == (2 * result.traced, 20)  # two layers per checkpoint
    assert GradientStore.open(out / "grads" / "test").n_checkpoints == 2 * result.traced
    report = (out / "report.md").read_text()
    assert RULE in report and f"best after epoch {best}" in report
    assert "![per-checkpoint diagnostics](checkpoint_diagnostics.png)" in report


def test_the_held_out_figure_states_the_recipe_and_shows_only_the_legend_entries_drawn(tmp_path, monkeypatch):
    # review1 nits: the title said "up to the held-out peak" (the checkpoint traced may lie after it), and
    # with every checkpoint traced the legend listed "checkpoints not traced", with no markers
    from matplotlib.figure import Figure

    from tracin.demo.plots import plot_held_out_accuracy

    drawn = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: drawn.append(fig) or savefig(fig, path, **kw))
    accuracy = np.array([0.5, 0.8, 0.9, 0.7, 0.6])
    for epochs, traced, not_traced in (([1, 4], 1, True), ([1, 4], 2, False), ([4], 1, False)):
        plot_held_out_accuracy(accuracy, epochs, traced, tmp_path / "acc.png")
        ax = drawn[-1].axes[0]
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert ("checkpoints not traced" in labels) == not_traced, (epochs, traced, labels)
        assert "checkpoints traced" in labels
        assert ax.get_title() == "Traced: the checkpoints up to the first one at or after the held-out peak"


def test_the_figure_shows_the_predictions_of_the_model_traced(demo_and_grid):
    # its rows were titled with the final model's prediction (epoch 150) and one chosen as the first
    # digit the final model got wrong, while their proponents and opponents are scored at the traced
    # checkpoints (up to epoch 15), where the model predicted that digit right
    (out, result, _), (examples, *_, traced_epoch) = demo_and_grid
    last = result.checkpoint_epochs[result.traced - 1]
    assert traced_epoch == last < 150
    data = load_noisy_digits(0.2, seed=0)

    def predicted(epoch):
        saved = np.load(out / "checkpoints" / f"checkpoint_{epoch:04d}.npz")
        params = {k: v.astype(np.float64) for k, v in saved.items()}
        return forward(params, data.x_test.astype(np.float64))[1].argmax(1)

    traced, final = predicted(last), predicted(150)
    rows = [0, 1, 2, 3]
    if np.all(traced[rows] == data.y_test[rows]):  # the last row: the first digit the traced model gets wrong
        rows[-1] = int(np.flatnonzero(traced != data.y_test)[0])
    assert len(examples) == 4
    for ex, row in zip(examples, rows, strict=True):
        np.testing.assert_array_equal(ex.image, data.x_test[row])
        assert (ex.label, ex.predicted, ex.final) == (data.y_test[row], traced[row], final[row])
    assert examples[-1].predicted != examples[-1].label  # the figure shows a mistake of the traced model
    report = " ".join((out / "report.md").read_text().split())
    assert f"the prediction of the model at epoch {last} (the last checkpoint traced" in report
    assert "where the final model (epoch 150) predicts another label, that label" in report


def test_proponents_push_the_wrong_rows_loss_at_its_true_label_down(demo_and_grid):
    # report.md said a proponent "pulled the model towards this prediction": on a row the traced model
    # gets wrong that is backwards, the scores being of the loss at the true label
    (out, result, _), (examples, *_, traced_epoch) = demo_and_grid
    data = load_noisy_digits(0.2, seed=0)
    saved = np.load(out / "checkpoints" / f"checkpoint_{traced_epoch:04d}.npz")
    params = {k: v.astype(np.float64) for k, v in saved.items()}
    wrong = examples[-1]
    x = wrong.image[None].astype(np.float64)
    lr = TrainingConfig().learning_rate  # one SGD step of the training's learning rate

    def measured(p):  # (the loss at the true label, the logit margin true - predicted)
        logits = forward(p, x)[1][0]
        return cross_entropy(logits[None], np.array([wrong.label]))[0], logits[wrong.label] - logits[wrong.predicted]

    def after_a_step_on(row):
        grads = batch_gradient(params, data.x_train[row][None], data.y_train[row][None])
        return measured({k: params[k] - lr * grads[k] for k in params})

    loss, margin = measured(params)
    pro_loss, pro_margin = after_a_step_on(int(wrong.proponents[0]))
    opp_loss, opp_margin = after_a_step_on(int(wrong.opponents[0]))
    assert pro_loss < loss and pro_margin > margin  # towards the true label
    assert opp_loss > loss and opp_margin < margin  # away from it, here towards the wrong prediction
    report = " ".join((out / "report.md").read_text().split())
    assert "over the traced checkpoints" in report and "saved checkpoints" not in report
    assert "it pushed the model towards the test example's true label" in report
    assert "this prediction" not in report


def test_demo_writes_figures_and_stores_that_open(default_demo):
    out, result, _ = default_demo
    for name in (
        "mislabel_detection.png",
        "proponents_opponents.png",
        "held_out_accuracy.png",
        "checkpoint_diagnostics.png",
    ):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train, test = GradientStore.open(out / "grads" / "train"), GradientStore.open(out / "grads" / "test")
    assert (train.n_rows, test.n_rows) == (1400, 397)
    assert train.complete and test.complete
    import tracin

    # the stores hold what the demo ranked: the CSV's first rows are the store's highest self-influence
    top = np.argsort(-tracin.self_influence(train), kind="stable")[:5]
    rows = list(csv.DictReader(open(out / "self_influence_ranking.csv")))[:5]
    assert [int(r["train_row"]) for r in rows] == top.tolist()


def test_the_printed_next_commands_run_as_printed(default_demo, tmp_path):
    out, result, lines = default_demo
    printed = [line.strip() for line in lines if line.startswith("  tracin ")]
    assert printed == result.next_commands and len(printed) == 4
    assert [shlex.split(c)[1] for c in printed] == ["info", "self-influence", "score", "aggregate"]
    report = (out / "report.md").read_text()
    assert f"cd {shlex.quote(str(out.resolve()))}\ntracin info grads/train\n" in report
    for command in printed:
        argv = shlex.split(command)
        done = subprocess.run(
            [sys.executable, "-m", "tracin", *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, (command, done.stderr)
        assert "error" not in done.stderr.lower(), (command, done.stderr)
        if argv[1] == "info":
            assert "1400" in done.stdout
        if argv[1] == "aggregate":  # the rows that hurt the test set most: the flipped labels (r344)
            ranking = {r["train_row"]: r["flipped"] for r in csv.DictReader(open(out / "self_influence_ranking.csv"))}
            harmful = [r["train_row"] for r in csv.DictReader(done.stdout.splitlines())]
            assert len(harmful) == 20 and sum(ranking[i] == "True" for i in harmful) >= 18, done.stdout


def test_demo_with_a_path_that_needs_quoting_prints_runnable_commands(tmp_path):
    out = tmp_path / "my demo"
    lines: list[str] = []
    run_demo(
        DemoConfig(output=out, training=TrainingConfig(epochs=2, checkpoints=1), examples=1, k=2),
        progress=False,
        log=lines.append,
    )
    assert any(line.endswith(": tracing checkpoint 1 of 1 (epoch 2)") for line in lines)
    info = next(line.strip() for line in lines if line.startswith("  tracin info"))
    argv = shlex.split(info)
    assert Path(argv[2]) == out / "grads" / "train"
    done = subprocess.run([sys.executable, "-m", "tracin", *argv[1:]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _report_block(report: str) -> list[str]:
    """The lines of report.md's code block under '## Next'."""
    after = report.split("## Next", 1)[1]
    return after.split("```\n", 1)[1].split("```", 1)[0].splitlines()


def test_the_reports_next_commands_run_from_any_folder(tmp_path, monkeypatch):
    # review1 F2: `-o out` wrote `tracin info out/grads/train` into out/report.md, which failed run from
    # inside out (or from anywhere but where the demo ran): "no gradient store at out/grads/train"
    monkeypatch.chdir(tmp_path)
    run_demo(_small(Path("my out")), **QUIET)
    block = _report_block((tmp_path / "my out" / "report.md").read_text())
    assert block[0] == f"cd {shlex.quote(str(tmp_path / 'my out'))}" and len(block) == 5
    script = 'tracin() { "$PYTHON" -m tracin "$@"; }\nset -e\n' + "\n".join(block) + "\n"
    info = script.split("tracin self-influence")[0]  # the cd and `tracin info` only (fewer interpreters)
    for cwd, lines in ((Path("/"), script), (tmp_path / "my out", info), (tmp_path / "my out" / "grads", info)):
        done = subprocess.run(
            ["bash", "-c", lines],
            cwd=cwd,
            env={**os.environ, "PYTHON": sys.executable},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, (cwd, done.stderr)
        assert "1400" in done.stdout  # tracin info's rows


def test_demo_reruns_into_the_same_folder(tmp_path):
    config = DemoConfig(output=tmp_path, training=TrainingConfig(epochs=2, checkpoints=1), examples=1, k=2)
    run_demo(config, progress=False, log=lambda *_: None)
    again = run_demo(
        DemoConfig(output=tmp_path, seed=1, training=config.training, examples=1, k=2),
        progress=False,
        log=lambda *_: None,
    )
    assert GradientStore.open(again.files["train store"]).n_rows == 1400


def _small(out, checkpoints=1, epochs=2):
    return DemoConfig(output=out, training=TrainingConfig(epochs=epochs, checkpoints=checkpoints), examples=1, k=2)


def test_the_demo_keeps_the_callers_backend_and_opens_no_pyplot_figure(tmp_path):
    # its figures are drawn without pyplot: a notebook's backend and figures stay as they were
    script = f"""
import matplotlib
matplotlib.use("svg")  # stands in for a notebook's or a desktop's backend
import matplotlib.pyplot as plt
from tracin.demo import DemoConfig, run_demo
from tracin.demo.training import TrainingConfig
plt.figure()
config = DemoConfig(output={str(tmp_path / "out")!r}, training=TrainingConfig(epochs=2, checkpoints=1), examples=1, k=2)
run_demo(config, progress=False, log=lambda *_: None)
print(matplotlib.get_backend(), plt.get_fignums())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "svg [1]"
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert len(pngs) >= 3 and all((tmp_path / "out" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs), pngs


def _clear(out, paths):
    with DemoFiles(out) as files:
        files.clear(paths)


def _own_store(path, rows=30):
    writer = GradientStore.create(path, rows, [8], [0.1])
    writer.write(0, 0, np.ones((rows, 8), np.float32))
    return writer.finalize()


def test_a_recorded_file_the_user_changed_stays_and_is_forgotten(tmp_path):
    """clear(): a file an earlier run recorded that changed since is left alone and dropped from the
    record (it is the user's now); one the user removed is dropped too."""
    report, diagnostics = tmp_path / "report.md", tmp_path / "checkpoint_diagnostics.png"
    with DemoFiles(tmp_path) as files:
        files.put(report, lambda p: p.write_text("demo's"))
        files.put(diagnostics, lambda p: p.write_bytes(b"png"))
    report.write_text("the user's notes")
    diagnostics.unlink()
    _clear(tmp_path, [])
    assert report.read_text() == "the user's notes"
    assert json.loads((tmp_path / LEDGER).read_text()) == {"files": {}}


def test_a_link_at_a_recorded_temporary_name_is_not_the_demos(tmp_path):
    """A symbolic link where the record names an interrupted run's temporary (null) is left alone:
    the demo replaces or removes only what it wrote, never a link."""
    (tmp_path / "checkpoints").mkdir()
    temporary = tmp_path / "checkpoints" / ".checkpoint_0001.tracin-demo-tmp.pt"
    (tmp_path / "mine.pt").write_bytes(b"user")
    temporary.symlink_to(tmp_path / "mine.pt")
    (tmp_path / LEDGER).write_text(json.dumps({"files": {"checkpoints/.checkpoint_0001.tracin-demo-tmp.pt": None}}))
    _clear(tmp_path, [])
    assert temporary.is_symlink() and (tmp_path / "mine.pt").read_bytes() == b"user"
    assert json.loads((tmp_path / LEDGER).read_text()) == {"files": {}}


def test_demo_replaces_its_own_stores_and_checkpoints_and_refuses_anyone_elses(tmp_path):
    mine = tmp_path / "project"
    _own_store(mine / "grads" / "train")  # a user's store where the demo writes, no demo run before
    with pytest.raises(ValueError, match=r"train was not written by tracin demo .* \(-o / DemoConfig.output\)"):
        run_demo(_small(mine), **QUIET)
    assert GradientStore.open(mine / "grads" / "train").n_rows == 30 and not (mine / "checkpoints").exists()

    out = tmp_path / "out"
    run_demo(_small(out, checkpoints=3, epochs=3), **QUIET)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"checkpoint_000{e}.npz" for e in (1, 2, 3)]
    assert f"`{LEDGER}`: the demo's record" in (out / "report.md").read_text()
    run_demo(_small(out, checkpoints=1, epochs=3), **QUIET)  # the stale checkpoints of the first run go
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_0003.npz"]
    assert GradientStore.open(out / "grads" / "train_all_checkpoints").n_checkpoints == 2  # 1 checkpoint x 2 layers

    shutil.rmtree(out / "grads" / "test")  # the user put their own store in place of the demo's
    _own_store(out / "grads" / "test")
    (out / "checkpoints" / "notes.txt").write_text("kept")
    with pytest.raises(ValueError, match="test was not written by tracin demo"):
        run_demo(_small(out), **QUIET)
    assert GradientStore.open(out / "grads" / "test").n_rows == 30  # nothing removed before the refusal
    assert GradientStore.open(out / "grads" / "train").n_rows == 1400
    assert (out / "checkpoints" / "checkpoint_0003.npz").exists()

    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    np.savez(other / "checkpoints" / "checkpoint_0002.npz", w=np.ones(3))  # a user's own checkpoint
    with pytest.raises(ValueError, match="checkpoint_0002.npz was not written by tracin demo"):
        run_demo(_small(other), **QUIET)
    assert np.load(other / "checkpoints" / "checkpoint_0002.npz")["w"].tolist() == [1, 1, 1]
    (other / "checkpoints" / "checkpoint_0002.npz").unlink()
    (other / "grads" / "train").mkdir(parents=True)
    (other / "grads" / "train" / "notes.txt").write_text("mine")  # not a store at all
    with pytest.raises(ValueError, match="train was not written by tracin demo"):
        run_demo(_small(other), **QUIET)
    assert (other / "grads" / "train" / "notes.txt").read_text() == "mine"
    (other / LEDGER).write_text("{}")
    with pytest.raises(ValueError, match="is not the record tracin demo keeps of its files"):
        run_demo(_small(other), **QUIET)


@pytest.mark.parametrize("record", ["fifo", "nested", "huge"])
def test_a_hostile_record_is_refused_in_one_line_without_hanging(tmp_path, record):
    """review223 F1: a FIFO as the record hung DemoFiles, deep nesting raised RecursionError, and any size
    was read whole. Each is now 'not the record' (the FIFO is never opened)."""
    ledger = tmp_path / LEDGER
    if record == "fifo":
        os.mkfifo(ledger)
    else:
        ledger.write_text("[" * 100_000 + "]" * 100_000 if record == "nested" else " " * (2 << 20) + "{}")
    with pytest.raises(ValueError, match="is not the record tracin demo keeps of its files"):
        DemoFiles(tmp_path)


def test_a_recorded_path_turned_into_a_fifo_or_a_link_is_not_read(tmp_path):
    """review223 F2: clear() hashed recorded paths with read_bytes: a FIFO as report.md hung the rerun, a
    store manifest linked to /dev/zero filled the memory. Neither is opened now: both are refused."""
    report, store = tmp_path / "report.md", tmp_path / "grads" / "train"
    with DemoFiles(tmp_path) as files:
        files.put(report, lambda p: p.write_text("old"))
        files.store(store, _own_store)
    report.unlink()
    os.mkfifo(report)
    (store / "manifest.json").unlink()
    (store / "manifest.json").symlink_to("/dev/zero")
    with DemoFiles(tmp_path) as files:
        with pytest.raises(ValueError, match="report.md"):
            files.clear([report])
        with pytest.raises(ValueError, match="train"):
            files.clear([store])


def test_the_leftovers_of_an_interrupted_demo_run_are_its_own(tmp_path):
    store, checkpoint = tmp_path / "grads" / "train", tmp_path / "checkpoints" / "checkpoint_0001.pt"

    def interrupted(path):
        if path.suffix == ".pt":
            path.write_bytes(b"partial")
        else:
            GradientStore.create(path, 10, [4], [1.0])  # never finished
        raise KeyboardInterrupt

    with DemoFiles(tmp_path) as files:
        with pytest.raises(KeyboardInterrupt):
            files.store(store, interrupted)
        with pytest.raises(KeyboardInterrupt):
            files.put(checkpoint, interrupted)
    assert not store.exists() and not checkpoint.exists()  # written under other names, renamed when done
    (partial,) = (tmp_path / "grads").iterdir()
    assert json.loads((tmp_path / LEDGER).read_text()) == {"files": {f"grads/{partial.name}": None}}
    _clear(tmp_path, [store, checkpoint])
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted([LEDGER, "grads", "checkpoints"])
    assert json.loads((tmp_path / LEDGER).read_text()) == {"files": {}}


def test_a_second_demo_run_into_the_same_folder_at_once_is_refused(tmp_path):
    # both ran, failing with raw OS errors on each other's files, and could leave a store unrecorded
    with DemoFiles(tmp_path):  # a run in progress
        with pytest.raises(ValueError, match=f"another tracin demo is writing to {re.escape(str(tmp_path))}; "):
            run_demo(_small(tmp_path), **QUIET)
        assert list(tmp_path.iterdir()) == []
    run_demo(_small(tmp_path), **QUIET)  # the folder is free once that run is over
    with DemoFiles(tmp_path) as files:  # and once this one is
        assert "grads/train" in files.entries


def test_a_killed_runs_temporary_file_goes_and_a_users_file_at_such_a_name_stays(tmp_path):
    # a run killed while writing a file left its temporary unrecorded: reruns with other settings never
    # removed it (one more per killed run), and a user's file at a temporary name was unlinked unasked
    checkpoint = tmp_path / "checkpoints" / "checkpoint_0002.npz"
    killed = (
        "import os, signal\nfrom pathlib import Path\nfrom tracin.demo.outputs import DemoFiles\n"
        "def write(path):\n    path.write_bytes(b'partial')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"DemoFiles(Path({str(tmp_path)!r})).put(Path({str(checkpoint)!r}), write)\n"
    )
    assert subprocess.run([sys.executable, "-c", killed]).returncode == -9
    assert [p.name for p in checkpoint.parent.iterdir()] == [".checkpoint_0002.tracin-demo-tmp.npz"]
    _clear(tmp_path, [tmp_path / "checkpoints" / "checkpoint_0005.npz"])  # a run with other settings
    assert list(checkpoint.parent.iterdir()) == [] and json.loads((tmp_path / LEDGER).read_text()) == {"files": {}}

    (tmp_path / ".report.tracin-demo-tmp.md").write_text("mine")
    with pytest.raises(ValueError, match=r"\.report\.tracin-demo-tmp\.md was not written by tracin demo"):
        _clear(tmp_path, [tmp_path / "report.md"])
    assert (tmp_path / ".report.tracin-demo-tmp.md").read_text() == "mine"


def test_a_rerun_interrupted_while_removing_the_demos_store_can_be_run_again(tmp_path, monkeypatch):
    # the store's manifest was removed first and the record kept its digest: every later run refused
    # the demo's own half-removed store as "changed since"
    run_demo(_small(tmp_path), **QUIET)
    unlink = os.unlink

    def interrupted_after_the_manifest(path, *args, **kwargs):
        unlink(path, *args, **kwargs)
        if str(path).endswith("manifest.json"):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "unlink", interrupted_after_the_manifest)
    with pytest.raises(KeyboardInterrupt):
        run_demo(_small(tmp_path), **QUIET)
    monkeypatch.setattr(os, "unlink", unlink)
    run_demo(_small(tmp_path), **QUIET)
    assert sorted(p.name for p in (tmp_path / "grads").iterdir()) == ["test", "train", "train_all_checkpoints"]
    assert GradientStore.open(tmp_path / "grads" / "train").n_rows == 1400


def test_a_store_put_where_an_interrupted_run_was_exporting_is_not_the_demos(tmp_path, monkeypatch):
    # the record marked grads/train null ("being written"), so a user's store put there later was
    # taken for the demo's and deleted by the next run
    import tracin.demo.with_numpy as with_numpy

    export = with_numpy.NumpyMLP.export

    def interrupted(self, *args, **kwargs):
        export(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(with_numpy.NumpyMLP, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_demo(_small(tmp_path), **QUIET)
    monkeypatch.setattr(with_numpy.NumpyMLP, "export", export)
    shutil.rmtree(tmp_path / "grads" / "train", ignore_errors=True)
    _own_store(tmp_path / "grads" / "train")
    with pytest.raises(ValueError, match="train was not written by tracin demo"):
        run_demo(_small(tmp_path), **QUIET)
    assert GradientStore.open(tmp_path / "grads" / "train").n_rows == 30
    shutil.rmtree(tmp_path / "grads" / "train")
    run_demo(_small(tmp_path), **QUIET)  # the interrupted run's own leftovers go
    assert sorted(p.name for p in (tmp_path / "grads").iterdir()) == ["test", "train", "train_all_checkpoints"]


def test_a_rerun_keeps_a_users_files_inside_the_demos_store(tmp_path):
    # only the manifest's digest was compared, then the store folder was removed with all it held
    store = tmp_path / "grads" / "train"

    def write(path):
        writer = GradientStore.create(path, 3, [2], ids=[7, 8, 9])
        writer.write(0, 0, np.ones((3, 2), np.float32))
        writer.finalize()

    with DemoFiles(tmp_path) as files:
        files.store(store, write)
    (store / "my_top20.csv").write_text("row,score\n")
    (store / "notes").mkdir()
    with pytest.raises(ValueError, match=r"train holds files tracin demo did not write \(my_top20.csv, notes\)"):
        _clear(tmp_path, [store])
    assert (store / "my_top20.csv").exists() and GradientStore.open(store).ids.tolist() == [7, 8, 9]
    (store / "my_top20.csv").unlink()
    (store / "notes").rmdir()
    _clear(tmp_path, [store])  # the store's own files (ids.npy among them) are the demo's
    assert not store.exists() and json.loads((tmp_path / LEDGER).read_text()) == {"files": {}}


def test_the_demo_does_not_overwrite_a_users_files_or_write_through_links(tmp_path):
    # with -o . (or a project folder) the user's report.md and ranking were overwritten, and a link
    # at report.md or at the record's temporary file was written through
    project = tmp_path / "project"
    project.mkdir()
    (project / "report.md").write_text("MY REPORT\n")
    with pytest.raises(ValueError, match=r"report.md was not written by tracin demo .*\(-o / DemoConfig.output\)"):
        run_demo(_small(project), **QUIET)
    assert (project / "report.md").read_text() == "MY REPORT\n"
    assert sorted(p.name for p in project.iterdir()) == ["report.md"]  # nothing written before the refusal

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{LEDGER}.tmp").symlink_to(victim)  # a stale temporary of the record, as a link
    run_demo(_small(out), **QUIET)
    assert victim.read_text() == "precious" and not os.path.lexists(out / f"{LEDGER}.tmp")
    recorded = json.loads((out / LEDGER).read_text())["files"]
    assert {"report.md", "self_influence_ranking.csv", "mislabel_detection.png"} <= set(recorded)
    (out / "report.md").unlink()
    (out / "report.md").symlink_to(victim)
    with pytest.raises(ValueError, match="report.md was not written by tracin demo .it is a symbolic link"):
        run_demo(_small(out), **QUIET)
    assert victim.read_text() == "precious"


def test_a_record_naming_paths_the_demo_never_writes_is_refused(tmp_path):
    # keys of a received .tracin-demo.json were joined to the output folder unchecked: '../x', an
    # absolute path or a path through a link in it made the next run delete the user's files elsewhere
    victim, home = tmp_path / "victim.txt", tmp_path / "home"
    victim.write_bytes(b"")
    home.mkdir()
    (home / "keep.txt").write_text("hello\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "docs").symlink_to(home)
    empty, hello = hashlib.sha256(b"").hexdigest(), hashlib.sha256(b"hello\n").hexdigest()
    for key, digest in (
        ("../victim.txt", empty),
        (str(victim), empty),
        ("checkpoints/../../victim.txt", empty),
        ("docs/keep.txt", hello),
        ("report.md", None),  # null only marks the demo's temporary names
        ("report.md", "not a digest"),
    ):
        (out / LEDGER).write_text(json.dumps({"files": {key: digest}}))
        with pytest.raises(
            ValueError, match=f"{re.escape(LEDGER)} is not the record .* it names {re.escape(repr(key))}"
        ):
            run_demo(_small(out), **QUIET)
        assert victim.exists() and (home / "keep.txt").read_text() == "hello\n"
    assert sorted(p.name for p in out.iterdir()) == [LEDGER, "docs"]  # nothing written before the refusal


def test_reruns_keep_other_files_and_explain_folders_without_a_record(tmp_path):
    # a checkpoint name the demo never writes was refused, and an older tracin's demo output (no
    # record) was called "not written by tracin demo" with no word of why
    out = tmp_path / "out"
    run_demo(_small(out), **QUIET)
    np.savez(out / "checkpoints" / "checkpoint_best.npz", w=np.ones(2))
    run_demo(_small(out), **QUIET)
    assert np.load(out / "checkpoints" / "checkpoint_best.npz")["w"].tolist() == [1, 1]
    (out / LEDGER).unlink()  # as the demo of an older tracin left its folder
    with pytest.raises(ValueError, match=f"has no {re.escape(LEDGER)}.* from an older tracin version, remove"):
        run_demo(_small(out), **QUIET)


def test_a_file_or_a_dangling_link_at_grads_or_checkpoints_is_refused_before_training(tmp_path):
    # the run trained and wrote its checkpoints, then failed on the store with a bare Errno 17
    out = tmp_path / "out"
    out.mkdir()
    (out / "grads").write_text("user's notes")
    with pytest.raises(ValueError, match=r"out/grads is a file, not a folder; .*\(-o / DemoConfig.output\)"):
        run_demo(_small(out), **QUIET)
    assert sorted(p.name for p in out.iterdir()) == ["grads"]
    (out / "grads").unlink()
    (out / "checkpoints").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"out/checkpoints is a symbolic link to .*nowhere, which is not a folder"):
        run_demo(_small(out), **QUIET)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]


def test_output_folders_that_cannot_be_made_are_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"output folder \(-o / DemoConfig.output\) .*file/out cannot be created"):
        run_demo(_small(tmp_path / "file" / "out"), progress=False, log=lambda *_: None)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dangling is a symbolic link to .*nowhere, which does not exist"):
        run_demo(_small(tmp_path / "dangling"), progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match=r"output folder \(-o / DemoConfig.output\) .*file is a file"):
        run_demo(_small(tmp_path / "file"), progress=False, log=lambda *_: None)


def test_an_existing_output_folder_that_refuses_files_is_named_before_training(tmp_path, monkeypatch, capsys):
    # review1 F5: an existing read-only folder passed the check, the demo trained to its first checkpoint
    # and failed with "[Errno 30] Read-only file system: '.../checkpoints'", naming neither -o nor the folder
    import errno
    import tempfile

    out = tmp_path / "read-only"
    out.mkdir()
    mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == out.resolve():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    lines: list[str] = []
    said = rf"output folder \(-o / DemoConfig.output\) .*read-only cannot be written: {os.strerror(errno.EROFS)}"
    with pytest.raises(ValueError, match=said):
        run_demo(_small(out), progress=False, log=lines.append)
    assert lines == [] and list(out.iterdir()) == []  # refused before anything was trained or written
    assert main(["demo", "--epochs", "2", "--checkpoints", "1", "-o", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tracin demo: error: the output folder (-o / DemoConfig.output)")
    assert "cannot be written" in err
    assert len(err.splitlines()) == 1 and list(out.iterdir()) == []
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    run_demo(_small(out), **QUIET)  # writable again: runs, and leaves no probe file behind
    assert not [p for p in out.iterdir() if "probe" in p.name]


def test_a_gradient_store_or_an_empty_name_is_refused_as_output_folder(tmp_path, monkeypatch, capsys):
    # -o grads/train wrote the demo's files in among the store's; -o '' wrote into the current folder
    out = tmp_path / "out"
    run_demo(_small(out), **QUIET)
    store = out / "grads" / "train"
    before = sorted(p.name for p in store.iterdir())
    with pytest.raises(ValueError, match=r"output folder \(-o / DemoConfig.output\) .*train is a gradient store"):
        run_demo(_small(store), **QUIET)
    assert main(["demo", "--epochs", "2", "--checkpoints", "1", "-o", str(store), "--no-progress"]) == 1
    assert "is a gradient store (it holds manifest.json)" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"-o / DemoConfig.output\) .*sub is inside the gradient store .*train;"):
        run_demo(_small(store / "new" / "sub"), **QUIET)  # was written there
    assert sorted(p.name for p in store.iterdir()) == before
    assert GradientStore.open(store).n_rows == 1400
    with pytest.raises(ValueError, match="output must name a folder .*got ''"):
        DemoConfig(output="")
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--epochs", "2", "--checkpoints", "1", "-o", "", "--no-progress"]) == 2  # usage
    assert "tracin demo: error: -o/--output must name a folder, got ''" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    web = tmp_path / "web"  # another program's manifest.json above the folder is no store
    web.mkdir()
    (web / "manifest.json").write_text('{"name": "a web app"}')
    run_demo(_small(web / "demo"), **QUIET)


def test_the_demos_bars_show_in_a_terminal_but_not_in_a_log(tmp_path, capsys, monkeypatch):
    # `tracin demo > log 2>&1` collected every frame of its bars
    command = ["demo", "--epochs", "2", "--checkpoints", "1", "-o", str(tmp_path / "out")]
    assert main(command) == 0
    assert "train: " not in capsys.readouterr().err  # captured: not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(command) == 0
    assert re.search(r"train: 100%\|.*\| 2/2 \[", capsys.readouterr().err)
    assert main([*command, "--no-progress"]) == 0
    assert "train: " not in capsys.readouterr().err


def test_missing_demo_extras_are_named_before_training(tmp_path, monkeypatch, capsys):
    # without matplotlib the demo trained and exported, then failed at its first figure
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # tqdm is needed where bars are drawn
    for module in ("matplotlib", "sklearn.datasets", "tqdm"):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, module, None)  # importing it fails
            assert main(["demo", "--epochs", "2", "--checkpoints", "1", "-o", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert "tracin demo: error: the demo needs the demo extra: pip install 'tracin[demo]'" in err, err
        assert module in err and not (tmp_path / "out").exists()
        assert ("or pass --no-progress" in err) == (module == "tqdm")  # the way to run without it
    with monkeypatch.context() as patch:  # tqdm draws only the progress bars
        patch.setitem(sys.modules, "tqdm", None)
        assert main(["demo", "--epochs", "2", "--checkpoints", "1", "-o", str(tmp_path / "out"), "--no-progress"]) == 0
        patch.setattr(sys.stderr, "isatty", lambda: False)  # none drawn into a log: tqdm not needed
        assert main(["demo", "--epochs", "2", "--checkpoints", "1", "-o", str(tmp_path / "out")]) == 0


def test_demo_command_line_options(tmp_path, capsys):
    assert (
        main(
            [
                "demo",
                "--epochs",
                "10",
                "--checkpoints",
                "2",
                "--noise",
                "0.1",
                "--seed",
                "1",
                "-o",
                str(tmp_path / "out"),
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "saving 2 checkpoints" in out and "report.md" in out and "140 of their labels flipped (10.0%)" in out
    assert len(list((tmp_path / "out" / "checkpoints").glob("checkpoint_*.npz"))) == 2  # numpy by default
    assert main(["demo", "--epochs", "3", "--checkpoints", "5", "-o", str(tmp_path / "bad")]) == 2  # usage
    assert "--checkpoints (5) must be at most --epochs (3)" in capsys.readouterr().err


def test_demo_with_fewer_epochs_than_the_default_checkpoints_saves_one_per_epoch(tmp_path, capsys):
    # review1 F3: `tracin demo --epochs 5` was refused: "--checkpoints (10) must be at most --epochs (5)",
    # a default the user never set
    assert main(["demo", "--epochs", "2", "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "saving 2 checkpoints" in capsys.readouterr().out
    assert len(list((tmp_path / "out" / "checkpoints").glob("checkpoint_*.npz"))) == 2
    help_text = build_parser()._subparsers._group_actions[0].choices["demo"].format_help()
    assert "(default: 10, or --epochs if fewer)" in " ".join(help_text.split())


def test_no_docstring_of_the_demo_says_the_recipe_stops_at_the_held_out_peak():
    # review5 F5: recipe.py's module docstring still said "Tracing only up to the held-out peak" after d938812
    # (the checkpoint traced last is the first saved at or after the peak, which may lie after it)
    import tracin.demo.recipe as recipe

    for path in Path(recipe.__file__).parent.glob("*.py"):
        assert "up to the held-out peak" not in " ".join(path.read_text().split()), path
    assert "up to the first one saved at or after the held-out peak" in " ".join(recipe.__doc__.split())


def test_the_default_checkpoints_are_one_rule_for_the_api_and_the_command_line(tmp_path, monkeypatch, capsys):
    # review5 F3: DemoConfig(training=TrainingConfig(epochs=5)) was refused, "checkpoints must be between 1 and
    # epochs (5), got 10", for a default never set, while `tracin demo --epochs 5` saved 5 checkpoints
    import tracin.demo

    for epochs, saved in ((1, 1), (5, 5), (10, 10), (11, 10), (150, 10)):
        assert TrainingConfig(epochs=epochs).checkpoints == saved == min(10, epochs)
        assert DemoConfig(output=tmp_path, training=TrainingConfig(epochs=epochs)).training.checkpoints == saved
    assert TrainingConfig().checkpoints == 10 and TrainingConfig(epochs=5, checkpoints=2).checkpoints == 2
    assert TrainingConfig(epochs=5).checkpoint_epochs() == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match=r"checkpoints must be between 1 and epochs \(5\), got 6"):
        TrainingConfig(epochs=5, checkpoints=6)
    with pytest.raises(ValueError, match="checkpoints must be a positive integer, got 0"):
        TrainingConfig(epochs=5, checkpoints=0)
    ran = []
    monkeypatch.setattr(tracin.demo, "run_demo", lambda config, progress: ran.append(config))
    for epochs in (3, 150):  # the command line builds the TrainingConfig the API would, seed aside
        assert main(["demo", "--epochs", str(epochs), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
        assert ran.pop().training == TrainingConfig(epochs=epochs, seed=0)
    assert main(["demo", "--epochs", "3", "--checkpoints", "4", "-o", str(tmp_path / "out")]) == 2  # usage
    assert "--checkpoints (4) must be at most --epochs (3)" in capsys.readouterr().err


def test_bad_demo_settings_are_refused_before_the_previous_run_is_touched(tmp_path, capsys):
    out = tmp_path / "out"
    run_demo(
        DemoConfig(output=out, training=TrainingConfig(epochs=2, checkpoints=1), examples=1, k=2),
        progress=False,
        log=lambda *_: None,
    )
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for option, value, said in (
        ("--seed", "-1", "argument --seed: expected an integer >= 0, got '-1'"),
        ("--noise", "1.5", "argument --noise: expected a number in [0, 1), got '1.5'"),
        ("--noise", "nan", "argument --noise: expected a number in [0, 1), got 'nan'"),
    ):
        with pytest.raises(SystemExit) as exit:
            main(["demo", option, value, "--epochs", "2", "--checkpoints", "1", "-o", str(out), "--no-progress"])
        assert exit.value.code == 2 and said in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert GradientStore.open(out / "grads" / "train").n_rows == 1400
    for settings, said in (
        (dict(seed=-1), "seed must be an integer >= 0, got -1"),
        (dict(seed=True), "seed must be an integer >= 0, got True"),
        (dict(noise=1.0), r"noise must be a number in \[0, 1\), got 1.0"),
        (dict(noise=float("nan")), r"noise must be a number in \[0, 1\), got nan"),
        (dict(k=0), "k must be a positive integer at most 20, got 0"),
        (dict(examples=0), "examples must be a positive integer at most 20, got 0"),
        (dict(examples=21), "examples must be a positive integer at most 20, got 21"),  # review34 F5: no limit
        (dict(k=2000), "k must be a positive integer at most 20, got 2000"),
        (dict(framework="tensorflow"), "framework must be one of numpy, jax, torch or None"),
    ):
        with pytest.raises(ValueError, match=said):
            DemoConfig(output=out, **settings)
    for settings, said in (
        (dict(seed=-3), "seed must be an integer >= 0, got -3"),
        (dict(epochs=0), "epochs must be a positive integer at most 10000, got 0"),
        (dict(learning_rate=float("inf")), r"learning_rate must be a number in \(0, inf\), got inf"),
        (dict(momentum=1.0), r"momentum must be a number in \[0, 1\), got 1.0"),
        (dict(decay_at=-0.1), r"decay_at must be a number in \[0, 1\], got -0.1"),
    ):
        with pytest.raises(ValueError, match=said):
            TrainingConfig(**settings)
    assert TrainingConfig(seed=np.int64(3), epochs=np.int32(4), checkpoints=2).checkpoint_epochs() == {1, 3}


def test_demo_command_line_framework_option(tmp_path, capsys):
    pytest.importorskip("torch")
    assert (
        main(
            [
                "demo",
                "--framework",
                "torch",
                "--epochs",
                "2",
                "--checkpoints",
                "1",
                "-o",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "training an MLP with torch" in capsys.readouterr().out
    assert len(list((tmp_path / "checkpoints").glob("checkpoint_*.pt"))) == 1
    assert GradientStore.open(tmp_path / "grads" / "test").n_rows == 397


def test_an_output_folder_whose_name_is_not_valid_text_is_reported_escaped(tmp_path):
    """review108 F1: `tracin demo -o $'d\\xff'` under a strict stdout encoding wrote its files, then failed
    (exit code 1) on a codec error: writing report.md and printing the "wrote" and next-command lines."""
    out = os.path.join(os.fsencode(tmp_path), b"d\xff")
    argv = [os.fsencode(sys.executable), b"-m", b"tracin", b"demo", b"--epochs", b"2", b"--checkpoints", b"1"]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([*argv, b"-o", out, b"--no-progress"], env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = done.stdout.decode()
    shown = os.fsdecode(out).replace("\udcff", "\\udcff")
    assert f"wrote {shown}{os.sep}" in printed and f"  tracin info '{shown}{os.sep}grads{os.sep}train'" in printed
    block = _report_block((Path(os.fsdecode(out)) / "report.md").read_text(errors="surrogateescape"))
    assert block[0] == f"cd {shlex.quote(os.fsdecode(out))}"  # the folder as it is named: the commands run
    script = 'tracin() { "$PYTHON" -m tracin "$@"; }\nset -e\n' + "\n".join(block[:2]) + "\n"
    done = subprocess.run(
        [b"bash", b"-c", os.fsencode(script)], env={**os.environ, "PYTHON": sys.executable}, capture_output=True
    )
    assert done.returncode == 0 and b"1400" in done.stdout, done.stderr


def test_absurd_epochs_are_refused_naming_the_cap(tmp_path, capsys):
    """review108: `tracin demo --epochs 99999999999999999999999` trained for ever; --epochs and
    TrainingConfig(epochs=) now stop at MAX_EPOCHS, named in the refusal, before anything is written."""
    from tracin.demo.training import MAX_EPOCHS

    for epochs in ("99999999999999999999999", str(MAX_EPOCHS + 1)):
        with pytest.raises(SystemExit, match="2"):  # argparse: a usage error
            main(["demo", "--epochs", epochs, "-o", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert f"argument --epochs: expected a positive integer no larger than {MAX_EPOCHS}, got '{epochs}'" in err
    assert not (tmp_path / "out").exists()
    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    assert demo.parse_args(["--epochs", str(MAX_EPOCHS)]).epochs == MAX_EPOCHS
    assert f"training epochs, at most {MAX_EPOCHS} (default: 150)" in " ".join(demo.format_help().split())
    assert TrainingConfig(epochs=MAX_EPOCHS).checkpoints == 10
    with pytest.raises(
        ValueError, match=f"epochs must be a positive integer at most {MAX_EPOCHS}, got {MAX_EPOCHS + 1}"
    ):
        TrainingConfig(epochs=MAX_EPOCHS + 1)


def test_a_framework_that_is_installed_but_fails_to_import_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """review128 F2: an ImportError that is not a ModuleNotFoundError (a torch wheel missing its .so, a
    jax / jaxlib mismatch) was a 30-line traceback from `tracin demo --framework torch`."""
    import importlib

    import tracin.demo.framework as framework

    import_module = importlib.import_module

    def broken(name, *args):
        if name.endswith((".with_torch", ".with_jax")):
            raise ImportError("libtorch_cpu.so: cannot open shared object file\nmore lines")
        return import_module(name, *args)

    monkeypatch.setattr(framework, "available", lambda: list(framework.FRAMEWORKS))  # as if both were installed
    monkeypatch.setattr(importlib, "import_module", broken)
    for name, packages in (("torch", "torch"), ("jax", "jax jaxlib")):
        with pytest.raises(ValueError) as raised:
            trainer(name)
        assert str(raised.value) == (
            f"framework {name!r} is installed but fails to import (libtorch_cpu.so: cannot open shared object "
            f"file); reinstall it: pip uninstall -y {packages} && pip install 'tracin[{name}]'"
        )
    argv = ["demo", "--framework", "torch", "--epochs", "2", "-o", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "framework 'torch' is installed but fails to import (libtorch_cpu.so" in captured.err
    assert not (tmp_path / "out").exists()  # refused before the output folder is made


def test_a_store_whose_writing_fails_leaves_no_partial_folder(tmp_path):
    """review128 F3: a store export that raised (a full disk) left its half-written folder and its
    record behind until the next run into that folder."""
    store = tmp_path / "grads" / "train"

    def disk_full(path):
        writer = GradientStore.create(path, 10, [4], [1.0])
        writer.write(0, 0, np.ones((5, 4), np.float32))  # half the rows written
        raise OSError(28, "No space left on device")

    with DemoFiles(tmp_path) as files:
        with pytest.raises(OSError, match="No space left on device"):
            files.store(store, disk_full)
        assert files.entries == {}
    assert list((tmp_path / "grads").iterdir()) == []
    assert json.loads((tmp_path / LEDGER).read_text()) == {"files": {}}
    with DemoFiles(tmp_path) as files:  # the next store is written as if nothing had failed
        files.store(store, _own_store)
    assert GradientStore.open(store).n_rows == 30


def test_a_failed_stores_folder_that_could_not_be_removed_stays_recorded_for_the_next_run(tmp_path, monkeypatch):
    """A failed store export whose half-written folder could not be removed (rmtree's errors are ignored) keeps
    its null record, so the next run removes the leftover (r310: the record always forgotten passed)."""
    import tracin.demo.outputs as outputs

    def disk_full(path):
        writer = GradientStore.create(path, 10, [4], [1.0])
        writer.write(0, 0, np.ones((5, 4), np.float32))
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(outputs.shutil, "rmtree", lambda *a, **k: None)  # a folder rmtree could not remove
        with DemoFiles(tmp_path) as files:
            with pytest.raises(OSError, match="No space left on device"):
                files.store(tmp_path / "grads" / "train", disk_full)
            [left] = (tmp_path / "grads").iterdir()
            assert files.entries == {f"grads/{left.name}": None}
    _clear(tmp_path, [])
    assert list((tmp_path / "grads").iterdir()) == []
    assert json.loads((tmp_path / LEDGER).read_text()) == {"files": {}}


def test_a_killed_runs_temporary_record_does_not_stop_the_next_run(tmp_path):
    """A run killed while saving its record leaves .tracin-demo.json.tmp; the next run replaces it (r310: the
    leftover's removal dropped passed, every later save failed with FileExistsError)."""
    (tmp_path / (LEDGER + ".tmp")).write_text('{"files": {"report.md": nu')  # cut short by the kill
    report = tmp_path / "report.md"
    with DemoFiles(tmp_path) as files:
        files.put(report, lambda p: p.write_text("demo's"))
    assert report.read_text() == "demo's" and not (tmp_path / (LEDGER + ".tmp")).exists()
    assert list(json.loads((tmp_path / LEDGER).read_text())["files"]) == ["report.md"]


def test_a_demo_whose_store_export_fails_midway_leaves_only_finished_files(tmp_path, monkeypatch):
    import tracin.demo.with_numpy as with_numpy

    def disk_full_midway(self, x, y, path, progress, traced):
        writer = GradientStore.create(path, len(x), [(128, 65), (10, 129)], [0.1, 0.1], factored=True)
        writer.write(0, 0, (np.ones((7, 128), np.float32), np.ones((7, 65), np.float32)))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(with_numpy.NumpyMLP, "export", disk_full_midway)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left on device"):
        run_demo(_small(out), **QUIET)
    assert list((out / "grads").iterdir()) == []
    recorded = json.loads((out / LEDGER).read_text())["files"]
    assert sorted(recorded) == ["checkpoints/checkpoint_0002.npz"] and None not in recorded.values()


def _layers_bytes(framework):
    """Bytes of one example's float32 gradient at one checkpoint in the demo's stores, from its MLP
    (64 -> 128 -> 10): jax stores every weight and bias, numpy and torch each layer's factors."""
    if framework == "jax":
        return 4 * ((64 + 1) * 128 + (128 + 1) * 10)  # 38440
    return 4 * ((128 + 64 + 1) + (10 + 128 + 1))  # 1328


@pytest.mark.parametrize("framework", ["numpy", "jax", "torch"])
def test_the_disk_estimate_per_example_is_what_the_stores_hold(framework, tmp_path):
    """The free-space check's bytes per example and checkpoint, against the arrays a store holds."""
    from tracin.demo.framework import row_bytes

    pytest.importorskip(framework)
    data = load_noisy_digits(0.2, 0)
    config = TrainingConfig(epochs=2, checkpoints=2)
    _, train = trainer(framework)
    model = train(data, config, _saver(tmp_path / "checkpoints", framework), lambda _: None)
    model.export(data.x_train[:3], data.y_train[:3], tmp_path / "store", False, 2)
    stored = sum(np.load(f, mmap_mode="r").nbytes for f in (tmp_path / "store").glob("*.npy"))
    assert stored == 3 * 2 * _layers_bytes(framework)
    assert row_bytes(framework, [(64, 128), (128, 10)]) == _layers_bytes(framework)


def test_the_demo_refuses_to_start_without_the_disk_space_it_needs(tmp_path, monkeypatch, capsys):
    """review128 F5: `--framework jax` writes ~600 MB at its defaults, and a run that filled the disk
    failed only after training. Now the free space is checked before training (for the least the run
    writes: one checkpoint traced) and again once the recipe has chosen, before any store is written."""
    import tracin.demo.run as demo_run

    usage = shutil.disk_usage
    free = iter([0])

    def disk_usage(path):
        return usage(path)._replace(free=next(free))

    monkeypatch.setattr(demo_run.shutil, "disk_usage", disk_usage)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as raised:
        run_demo(_small(out, checkpoints=2, epochs=4), **QUIET)
    row = _layers_bytes("numpy")
    params = 4 * ((64 + 1) * 128 + (128 + 1) * 10)
    least = row * 1400 * 2 + row * (1400 + 397) + 2 * params + 4 * 2**20  # all checkpoints, one traced
    assert str(raised.value) == (
        f"not enough free disk space: the demo needs about {least / 1e6:,.1f} MB free in {out}, mostly for "
        f"gradient stores (numpy: per-layer factors, {row} bytes per example and checkpoint), and 0.0 MB are free "
        "there: free some space, choose another output folder (-o / DemoConfig.output), or save fewer "
        "checkpoints (--checkpoints)"
    )
    assert list(out.iterdir()) == []  # nothing trained, nothing written

    free = iter([least, 1])  # enough to train, then too little for the stores the recipe traces
    argv = ["demo", "--epochs", "4", "--checkpoints", "2", "-o", str(out), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("tracin demo: error: not enough free disk space: ") and err.count("\n") == 1
    assert "0.0 MB are free there" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_0002.npz", "checkpoint_0004.npz"]
    assert not (out / "grads").exists() or list((out / "grads").iterdir()) == []


def test_python_m_tracin_demo_runs_the_demo_command(tmp_path):
    """review152 F4: `python -m tracin.demo` failed ("No module named tracin.demo.__main__"); it is
    `tracin demo` (as `python -m tracin demo` is): the same lines printed, options and errors."""
    runs = {}
    for name, module in (("package", ["tracin.demo"]), ("command", ["tracin", "demo"])):
        (tmp_path / name).mkdir()
        argv = [sys.executable, "-m", *module, "--epochs", "2", "--checkpoints", "1", "--no-progress"]
        runs[name] = subprocess.run([*argv, "-o", "out"], cwd=tmp_path / name, capture_output=True, timeout=300)
        assert runs[name].returncode == 0, runs[name].stderr
        assert GradientStore.open(tmp_path / name / "out" / "grads" / "train").n_rows == 1400
        runs[f"{name} error"] = subprocess.run([*argv, "--noise", "2"], capture_output=True, timeout=300)
        assert runs[f"{name} error"].returncode == 2
    assert runs["package"].stdout == runs["command"].stdout and b"saving 1 checkpoint\n" in runs["package"].stdout
    assert runs["package error"].stderr == runs["command error"].stderr
    assert runs["package error"].stderr.splitlines()[-1].startswith(b"tracin demo: error: argument --noise:")


def test_the_training_bar_counts_whole_epochs(tmp_path, capsys):
    """review285 F1: the train bar showed '0.00/150' and '37.0/150' (tqdm's unit scaling); epochs are whole."""
    run_demo(
        DemoConfig(output=tmp_path, noise=0.001, training=TrainingConfig(epochs=3, checkpoints=1), examples=1, k=2),
        progress=True,
        log=lambda *_: None,
    )
    shown = capsys.readouterr().err.replace("\r", "\n")
    assert re.search(r"train: .*\b3/3 \[", shown), shown
    assert not re.search(r"\d\.\d+/3\b", shown)


def test_the_reports_detection_sentence_reads_the_first_fraction_inspected(tmp_path):
    """The sentence under the table gives each method's share found at the smallest fraction inspected (10%), from
    result.found (r297 M54: the largest, 30%, was used and no test read the sentence's numbers)."""
    config = DemoConfig(output=tmp_path, training=TrainingConfig(epochs=2, checkpoints=2))
    shares = {TRACIN: 0.41, TRACIN_ALL: 0.32, LOSS: 0.23, RANDOM: 0.1, PERFECT: 0.5}
    found = {name: {0.1: share, 0.2: share + 0.1, 0.3: share + 0.2} for name, share in shares.items()}
    text = " ".join(write_report(tmp_path / "r.md", _summary(280, 0.25, found), config).read_text().split())
    assert "inspecting 10% of the training set can find at most 50.0% of them" in text
    assert "TracIn self-influence with the recipe found 41.0% (over all 2 checkpoints 32.0%)" in text
    assert "ranking by the final model's loss 23.0%, and inspecting at random finds 10.0% on average" in text
