"""The demo pipeline, from noisy data to the report and the command lines to try next."""

from __future__ import annotations

import csv
import os
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import tracin

from .._progress import progress_bar
from ..report import checkpoint_diagnostics, plot_checkpoint_diagnostics
from ..store import GradientStore
from ..store._files import enclosing_store
from ..store._format import MANIFEST, printable
from .data import NoisyDigits, load_noisy_digits
from .detection import detection_curve, found_at, perfect_curve, random_curve
from .framework import FRAMEWORKS, FULL_ROWS, Train, checkpoint_path, parameters, row_bytes, trainer
from .mlp import cross_entropy
from .outputs import OUTPUTS, STORES, WHERE, DemoFiles
from .plots import GridExample, plot_detection, plot_held_out_accuracy, plot_influence_grid
from .recipe import checkpoints_to_trace
from .report import NOTHING_FLIPPED, counted, summary_rows, write_report
from .training import TrainingConfig, check_integer, check_real

INSPECTED = (0.1, 0.2, 0.3)  # fractions of the training set reported in the summary
MAX_EXAMPLES, MAX_K = 20, 20  # a figure row per example, a column per proponent and opponent
DIAGNOSED = 0.2  # the top fraction of the ranking the per-checkpoint diagnostics look at
TRACIN, TRACIN_ALL = "TracIn self-influence (recipe)", "TracIn self-influence, all checkpoints"
LOSS, RANDOM, PERFECT = "loss (final model)", "random", "perfect detector"
CLASSES = 10  # digits: the MLP's outputs
DISK_MARGIN = 4 * 2**20  # bytes kept free beyond the stores and checkpoints: figures, report, ranking, record (2 MB
# at --examples 20 -k 20, 0.5 MB at the defaults)


@dataclass(frozen=True)
class DemoConfig:
    """noise: fraction of training labels flipped; seed: the data split and the labels flipped (the
    model's initial weights and batch order follow training.seed: `tracin demo --seed` sets both);
    framework: "numpy" | "jax" | "torch", or None for the lightest installed (NumPy); examples (at most
    MAX_EXAMPLES): test digits shown with their k (at most MAX_K) proponents / opponents."""

    noise: float = 0.2
    seed: int = 0
    output: Path = Path("tracin-demo-output")
    training: TrainingConfig = field(default_factory=TrainingConfig)
    framework: str | None = None
    examples: int = 4
    k: int = 5

    def __post_init__(self) -> None:
        check_real("noise", self.noise, lambda v: 0 <= v < 1, "[0, 1)")
        if not isinstance(self.output, (str, os.PathLike)) or not str(self.output):  # Path("") is "."
            raise ValueError(f"output must name a folder (a non-empty str or Path), got {self.output!r}")
        check_integer("seed", self.seed, 0)
        if not isinstance(self.training, TrainingConfig):
            raise TypeError(f"training must be a TrainingConfig, got {type(self.training).__name__}")
        if self.framework is not None and self.framework not in FRAMEWORKS:
            raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)} or None, got {self.framework!r}")
        check_integer("examples", self.examples, 1, MAX_EXAMPLES)
        check_integer("k", self.k, 1, MAX_K)


@dataclass
class DemoResult:
    """found[method][fraction]: fraction of the flipped labels found after inspecting that fraction
    of the training set, methods TRACIN, TRACIN_ALL, LOSS, RANDOM, PERFECT; next_commands: shell lines
    to try; held_out_accuracy: float64 (epochs,) after each epoch; checkpoint_epochs: 1-based epoch of
    each checkpoint saved; best_epoch: 1-based epoch of best held-out accuracy; traced: how many
    checkpoints (the first ones) the recipe traced; flipped_fitted: fraction of the flipped training
    examples whose given (wrong) label the final model predicts (NaN when none is flipped)."""

    framework: str
    n_train: int
    n_flipped: int
    found: dict[str, dict[float, float]]
    train_accuracy_noisy: float
    test_accuracy: float
    seconds: float
    files: dict[str, Path]
    next_commands: list[str]
    held_out_accuracy: np.ndarray
    checkpoint_epochs: list[int]
    best_epoch: int
    traced: int
    flipped_fitted: float

    @property
    def flip_rate(self) -> float:
        return self.n_flipped / self.n_train


def run_demo(config: DemoConfig = DemoConfig(), progress: bool = True, log=print) -> DemoResult:
    """Runs the whole demo and writes its outputs (checkpoints, gradient stores grads/train and
    grads/test, figures, report, ranking) to config.output. The files and stores of an earlier run
    there are replaced; ones the demo did not write at the paths it writes (outputs.DemoFiles keeps
    the record) are refused with a ValueError before anything is removed, and so is a second run
    into the same folder while one is running."""
    start = time.perf_counter()
    framework, train = trainer(config.framework)
    data = load_noisy_digits(config.noise, config.seed)
    with DemoFiles(_output_folder(Path(config.output))) as owned:
        return _run(config, progress, log, start, framework, train, data, owned)


def _run(
    config: DemoConfig,
    progress: bool,
    log,
    start: float,
    framework: str,
    train: Train,
    data: NoisyDigits,
    owned: DemoFiles,
) -> DemoResult:
    """run_demo once `owned` holds the output folder."""
    out = owned.out
    stores = {name: out / "grads" / folder for name, folder in STORES.items()}
    epochs = sorted(int(e) for e in config.training.checkpoint_epochs())
    saved = {e: checkpoint_path(out / "checkpoints", e, framework) for e in epochs}
    named = {name: out / file for name, file in OUTPUTS.items()}
    owned.clear([*stores.values(), *saved.values(), *named.values()])
    hidden, n_train, n_test = config.training.hidden, len(data.x_train), len(data.x_test)
    layers = [(data.x_train.shape[1], hidden), (hidden, CLASSES)]
    row = row_bytes(framework, layers)
    every_store = row * n_train * len(epochs)  # grads/train_all_checkpoints

    def stores_of(traced: int) -> int:  # bytes of all three stores when the recipe traces `traced` checkpoints
        return every_store + row * traced * (n_train + n_test)

    # before training the least the run writes (one checkpoint traced); once the recipe chose, what it writes
    checkpoint_bytes = len(epochs) * 4 * parameters(layers)  # float32 weights and biases
    _check_free_space(stores["train"].parent, stores_of(1) + checkpoint_bytes, framework, layers)
    flipped = data.flipped
    log(
        f"digits: {len(flipped)} train, {flipped.sum()} of their labels flipped ({data.flip_rate:.1%}), "
        f"{len(data.x_test)} test"
    )

    log(
        f"training an MLP with {framework} for {counted(config.training.epochs, 'epoch')}, "
        f"saving {counted(config.training.checkpoints, 'checkpoint')}"
    )
    bar = progress_bar(config.training.epochs, progress, "train", unit="epoch", unit_scale=False)
    model = train(data, config.training, lambda e, write: owned.put(saved[e], write), lambda _: bar.update())
    bar.close()
    train_logits, test_logits = model.logits(data.x_train), model.logits(data.x_test)
    train_loss = cross_entropy(train_logits, data.y_train)
    train_pred = train_logits.argmax(1)
    train_acc = float((train_pred == data.y_train).mean())
    test_pred = test_logits.argmax(1)
    test_acc = float((test_pred == data.y_test).mean())
    noisy = "noisy " if flipped.any() else ""
    log(f"accuracy on the {noisy}training labels {train_acc:.1%}, on the test set {test_acc:.1%}")

    traced = checkpoints_to_trace(epochs, model.held_out_accuracy)
    best_epoch = int(np.argmax(model.held_out_accuracy)) + 1
    if traced == 1:
        tracing = f"checkpoint 1 of {len(epochs)} (epoch {epochs[0] + 1})"
    else:
        tracing = f"checkpoints 1-{traced} of {len(epochs)} (epochs {epochs[0] + 1}-{epochs[traced - 1] + 1})"
    log(  # the held-out set of the recipe is the test set
        f"test accuracy peaked at {model.held_out_accuracy.max():.1%} (epoch {best_epoch}), "
        f"{model.held_out_accuracy[-1]:.1%} at the end: tracing {tracing}"
    )

    _check_free_space(stores["train"].parent, stores_of(traced), framework, layers)

    def export(x: np.ndarray, y: np.ndarray, store: str, checkpoints: int) -> GradientStore:
        owned.store(stores[store], lambda path: model.export(x, y, path, progress, checkpoints))
        return GradientStore.open(stores[store])

    train_grads = export(data.x_train, data.y_train, "train", traced)
    test_grads = export(data.x_test, data.y_test, "test", traced)
    every = export(data.x_train, data.y_train, "train, all checkpoints", len(epochs))
    self_influence = tracin.self_influence(train_grads)

    n, n_flipped = len(flipped), int(flipped.sum())
    curves = {
        TRACIN: detection_curve(self_influence, flipped),
        TRACIN_ALL: detection_curve(tracin.self_influence(every), flipped),
        LOSS: detection_curve(train_loss, flipped),
        RANDOM: random_curve(n, n_flipped),
        PERFECT: perfect_curve(n, n_flipped),
    }
    found = {name: {f: found_at(c, f) for f in INSPECTED} for name, c in curves.items()}

    # the figure explains the model whose gradients were traced: its prediction is that of the last
    # traced checkpoint (the final model's is shown beside it where it differs)
    traced_pred = model.logits_at(traced - 1, data.x_test).argmax(1)
    shown = _shown_test_rows(traced_pred, data.y_test, config.examples)
    both = tracin.top_k(test_grads, train_grads, k=config.k, side="both")
    examples = [
        GridExample(
            data.x_test[t],
            int(data.y_test[t]),
            int(traced_pred[t]),
            int(test_pred[t]),
            both.proponents.indices[t],
            both.proponents.values[t],
            both.opponents.indices[t],
            both.opponents.values[t],
        )
        for t in shown
    ]
    diagnostics = checkpoint_diagnostics(
        every, top=max(1, round(DIAGNOSED * n)), layers_per_checkpoint=every.n_checkpoints // len(epochs)
    )
    labels = [f"ep {e + 1}" for e in epochs]
    files = {
        "held-out accuracy": owned.put(
            named["held-out accuracy"],
            lambda path: plot_held_out_accuracy(model.held_out_accuracy, epochs, traced, path),
        ),
        "checkpoint diagnostics": owned.put(
            named["checkpoint diagnostics"],
            lambda path: plot_checkpoint_diagnostics(diagnostics, path, labels=labels, traced=traced),
        ),
    }
    if n_flipped:  # with no label flipped there is nothing to detect, and no figure of it
        files["detection"] = owned.put(named["detection"], lambda path: plot_detection(curves, path, data.flip_rate))
    files |= {
        "influence": owned.put(
            named["influence"],
            lambda path: plot_influence_grid(
                examples, data.x_train, data.y_train, data.y_train_clean, path, epochs[traced - 1] + 1
            ),
        ),
        "ranking": owned.put(named["ranking"], lambda path: _write_ranking(path, self_influence, train_loss, data)),
        "train store": stores["train"],
        "test store": stores["test"],
        "train store, all checkpoints": stores["train, all checkpoints"],
    }
    seconds = time.perf_counter() - start
    result = DemoResult(
        framework,
        n,
        n_flipped,
        found,
        train_acc,
        test_acc,
        seconds,
        files,
        _next_commands(out),
        model.held_out_accuracy,
        [e + 1 for e in epochs],
        best_epoch,
        traced,
        float(np.mean(train_pred[flipped] == data.y_train[flipped])) if n_flipped else float("nan"),
    )
    files["report"] = owned.put(named["report"], lambda path: write_report(path, result, config))
    if n_flipped:
        log(
            f"share of the {counted(n_flipped, 'flipped label')} found among the training examples ranked highest "
            "by each method:"
        )
        for row in summary_rows(result):
            log(row)
    else:
        log(NOTHING_FLIPPED)
    checkpoints = f"{out / 'checkpoints'} ({counted(len(saved), 'checkpoint')})"  # not in files
    # paths escaped as `tracin info` shows them: a name that is not valid text must not fail the log line
    log(printable(f"wrote {', '.join(str(p) for p in files.values())}, {checkpoints}"))
    log("next, try the command line on the gradient stores the demo wrote:")
    for command in result.next_commands:
        log(f"  {printable(command)}")
    return result


def _output_folder(out: Path) -> Path:
    """`out`, created if need be; ValueError naming the option if it cannot be a folder or is a
    gradient store's folder (the demo's files would go in among the store's)."""
    if out.is_symlink() and not out.exists():
        raise ValueError(f"the {WHERE} {out} is a symbolic link to {os.readlink(out)}, which does not exist")
    if out.exists() and not out.is_dir():
        raise ValueError(f"the {WHERE} {out} is a file, not a folder")
    if (out / MANIFEST).exists():
        raise ValueError(
            f"the {WHERE} {out} is a gradient store (it holds {MANIFEST}); the demo writes its files, "
            "stores and checkpoints in a folder of their own: choose another"
        )
    store = enclosing_store(out)
    if store is not None:
        raise ValueError(
            f"the {WHERE} {out} is inside the gradient store {store}; the demo writes its files, "
            "stores and checkpoints in a folder of their own: choose one outside it"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"the {WHERE} {out} cannot be created: {e.strerror or e}") from None
    try:  # an existing folder may refuse new files (read-only file system): found now, not after training
        fd, probe = tempfile.mkstemp(dir=out, prefix=".tracin-demo-probe-", suffix=".tmp")
    except OSError as e:
        raise ValueError(f"the {WHERE} {out} cannot be written: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)
    return out


def _check_free_space(folder: Path, need: int, framework: str, layers: list[tuple[int, int]]) -> None:
    """ValueError if the file system of `folder` (OUT/grads, or OUT before that exists) has fewer free
    bytes than `need` (what the run is still to write there) and DISK_MARGIN, saying what takes the space."""
    where = folder if folder.exists() else folder.parent
    free = shutil.disk_usage(where).free
    if need + DISK_MARGIN <= free:
        return
    row, factors = row_bytes(framework, layers), row_bytes("numpy", layers)
    rows = "full gradient rows" if framework in FULL_ROWS else "per-layer factors"
    smaller = f", or train with numpy or torch, whose stores hold per-layer factors ({factors} bytes)"
    raise ValueError(
        f"not enough free disk space: the demo needs about {_megabytes(need + DISK_MARGIN)} free in {where}, "
        "mostly for gradient stores "
        f"({framework}: {rows}, {row} bytes per example and checkpoint), and {_megabytes(free)} are "
        f"free there: free some space, choose another {WHERE}, or save fewer checkpoints "
        f"(--checkpoints){smaller if framework in FULL_ROWS else ''}"
    )


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def _shown_test_rows(predicted: np.ndarray, truth: np.ndarray, count: int) -> list[int]:
    """The first `count` test rows, the last replaced by the first misclassified row if none of them is."""
    rows = list(range(min(count, len(truth))))
    wrong = np.flatnonzero(predicted != truth)
    if rows and len(wrong) and all(predicted[r] == truth[r] for r in rows):
        rows[-1] = int(wrong[0])
    return rows


def _next_commands(out: Path) -> list[str]:
    dash = f".{os.sep}" if str(out).startswith("-") else ""  # else read as an option, quoted or not
    train, test = (shlex.quote(dash + str(out / "grads" / side)) for side in ("train", "test"))
    return [
        f"tracin info {train}",
        f"tracin self-influence {train} --top 20",
        f"tracin score --test {test} --train {train} -k 5 --side both",
        f"tracin aggregate --test {test} --train {train} --side opponents --top 20",
    ]


def _write_ranking(path: Path, self_influence: np.ndarray, loss: np.ndarray, data: NoisyDigits) -> Path:
    order = np.argsort(-self_influence, kind="stable")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["rank", "train_row", "digits_row", "self_influence", "loss", "given_label", "true_label", "flipped"]
        )
        for rank, i in enumerate(order, 1):
            w.writerow(
                [
                    rank,
                    int(i),
                    int(data.train_index[i]),
                    f"{self_influence[i]:.6g}",
                    f"{loss[i]:.6g}",
                    int(data.y_train[i]),
                    int(data.y_train_clean[i]),
                    bool(data.flipped[i]),
                ]
            )
    return path
