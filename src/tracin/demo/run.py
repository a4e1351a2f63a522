"""The demo pipeline, from noisy data to the report."""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import tracin

from .._progress import progress_bar
from .data import load_noisy_digits
from .detection import detection_curve, found_at, random_curve
from .plots import plot_detection, plot_influence_grid
from .training import TrainingConfig, train_with_checkpoints

INSPECTED = (0.1, 0.2, 0.3)  # fractions of the training set reported in the summary


@dataclass(frozen=True)
class DemoConfig:
    noise: float = 0.2
    seed: int = 0
    output: Path = Path("tracin-demo-output")
    training: TrainingConfig = field(default_factory=TrainingConfig)
    examples: int = 4  # test digits shown with their proponents / opponents
    k: int = 5


@dataclass
class DemoResult:
    """found[method][fraction]: fraction of flipped labels found after inspecting that fraction."""

    found: dict[str, dict[float, float]]
    train_accuracy_noisy: float
    test_accuracy: float
    seconds: float
    files: dict[str, Path]


def _loss_and_accuracy(model, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        loss = F.cross_entropy(logits, torch.from_numpy(y), reduction="none").numpy()
        accuracy = (logits.argmax(1).numpy() == y).mean()
    return loss, float(accuracy)


def _per_example_cross_entropy(outputs, targets):
    import torch.nn.functional as F

    return F.cross_entropy(outputs, targets, reduction="none")


def run_demo(config: DemoConfig = DemoConfig(), progress: bool = True, log=print) -> DemoResult:
    """Runs the whole demo and writes its outputs to config.output."""
    import torch

    from tracin.torch import export_gradients

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads cost more than they give
    try:
        return _run_demo(config, progress, log)
    finally:
        torch.set_num_threads(threads)


def _run_demo(config: DemoConfig, progress: bool, log) -> DemoResult:
    import torch

    from tracin.torch import export_gradients

    start = time.perf_counter()
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    data = load_noisy_digits(config.noise, config.seed)
    flipped = data.flipped
    log(f"digits: {len(data.x_train)} train ({flipped.sum()} labels flipped), {len(data.x_test)} test")

    log(f"training an MLP for {config.training.epochs} epochs, saving {config.training.checkpoints} checkpoints")
    bar = progress_bar(config.training.epochs, progress, "train", unit="epoch")
    model, checkpoints = train_with_checkpoints(
        data.x_train, data.y_train, config.training, out / "checkpoints", on_epoch=lambda _: bar.update())
    bar.close()
    train_loss, train_acc = _loss_and_accuracy(model, data.x_train, data.y_train)
    _, test_acc = _loss_and_accuracy(model, data.x_test, data.y_test)
    log(f"accuracy on the noisy training labels {train_acc:.1%}, on the test set {test_acc:.1%}")

    def export(x, y):
        return export_gradients(model, checkpoints, (torch.from_numpy(x), torch.from_numpy(y)),
                                _per_example_cross_entropy, progress=progress)

    train_grads = export(data.x_train, data.y_train)
    test_grads = export(data.x_test, data.y_test)
    self_influence = tracin.self_influence(train_grads)

    curves = {
        "TracIn self-influence": detection_curve(self_influence, flipped),
        "loss (final model)": detection_curve(train_loss, flipped),
        "random": random_curve(len(flipped), int(flipped.sum())),
    }
    found = {name: {f: found_at(c, f) for f in INSPECTED} for name, c in curves.items()}

    shown = list(range(min(config.examples, len(data.x_test))))
    both = tracin.top_k(test_grads[0:len(shown)], train_grads, k=config.k, side="both")
    files = {
        "detection": plot_detection(curves, out / "mislabel_detection.png", config.noise),
        "influence": plot_influence_grid(data.x_test, data.y_test, shown, data.x_train, data.y_train,
                                         flipped, both.proponents, both.opponents,
                                         out / "proponents_opponents.png"),
        "ranking": _write_ranking(out / "self_influence_ranking.csv", self_influence, train_loss, data),
    }
    seconds = time.perf_counter() - start
    result = DemoResult(found, train_acc, test_acc, seconds, files)
    files["report"] = _write_report(out / "report.md", config, result)
    _log_summary(result, log)
    log(f"wrote {', '.join(str(p) for p in files.values())}")
    return result


def _write_ranking(path: Path, self_influence: np.ndarray, loss: np.ndarray, data) -> Path:
    order = np.argsort(-self_influence, kind="stable")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "train_index", "self_influence", "loss", "label", "true_label", "flipped"])
        for rank, i in enumerate(order, 1):
            w.writerow([rank, int(i), f"{self_influence[i]:.6g}", f"{loss[i]:.6g}",
                        int(data.y_train[i]), int(data.y_train_clean[i]), bool(data.flipped[i])])
    return path


def _summary_rows(result: DemoResult) -> list[str]:
    header = "| method | " + " | ".join(f"found at {f:.0%} inspected" for f in INSPECTED) + " |"
    rows = [header, "|---" * (len(INSPECTED) + 1) + "|"]
    for name, by_fraction in result.found.items():
        rows.append(f"| {name} | " + " | ".join(f"{v:.1%}" for v in by_fraction.values()) + " |")
    return rows


def _write_report(path: Path, config: DemoConfig, result: DemoResult) -> Path:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    lines = [
        "# tracin demo: mislabelled digits",
        "",
        f"{config.noise:.0%} of the training labels were flipped. The model reached "
        f"{result.train_accuracy_noisy:.1%} accuracy on the noisy training labels (it memorised them) "
        f"and {result.test_accuracy:.1%} on the clean test set.",
        "",
        "Inspecting training examples in order of TracIn self-influence finds flipped labels far sooner "
        "than inspecting them by the final model's loss or at random:",
        "",
        *_summary_rows(result),
        "",
        "![mislabel detection](mislabel_detection.png)",
        "",
        "Proponents (training examples that lowered the test loss) and opponents (that raised it):",
        "",
        "![proponents and opponents](proponents_opponents.png)",
        "",
        "The full ranking is in `self_influence_ranking.csv`.",
        "",
        f"Settings: `{settings}`; run time {result.seconds:.1f} s.",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


def _log_summary(result: DemoResult, log) -> None:
    for row in _summary_rows(result):
        log(row)
