"""The demo's figures (matplotlib, headless): drawn on matplotlib.figure.Figure, not through pyplot,
so that the caller's backend and pyplot's open figures stay as they were."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

_STYLES = {  # method -> (line style, colour)
    "TracIn self-influence (recipe)": ("-", "tab:blue"),
    "TracIn self-influence, all checkpoints": ("-", "tab:purple"),
    "loss (final model)": ("--", "tab:orange"),
    "random": (":", "tab:green"),
    "perfect detector": ("-.", "black"),
}


def plot_detection(curves: dict[str, np.ndarray], path: Path, flip_rate: float) -> Path:
    """Fraction of flipped labels found against fraction of training data inspected, one line per
    method (curves: float (n + 1,) each), and a labelled line at the flip rate."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=120)
    ax = fig.subplots()
    for name, curve in curves.items():
        style, colour = _STYLES.get(name, ("-", None))
        ax.plot(
            np.linspace(0, 1, len(curve)),
            curve,
            style,
            color=colour,
            label=name,
            linewidth=1.2 if name == "perfect detector" else 2,
        )
    ax.axvline(
        flip_rate, color="grey", linewidth=0.8, label=f"{flip_rate:.1%} inspected = the number of flipped labels"
    )
    ax.set_xlabel("fraction of training data inspected (highest score first)")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title(f"Mislabel detection on digits ({flip_rate:.1%} of labels flipped)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_held_out_accuracy(accuracy: np.ndarray, checkpoint_epochs: list[int], traced: int, path: Path) -> Path:
    """Held-out accuracy (float (epochs,)) after each epoch, the checkpoints (0-based epochs, ascending)
    as dots, the first `traced` of them filled: the ones the recipe traces."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    epochs = np.arange(1, len(accuracy) + 1)
    ax.plot(epochs, accuracy, color="tab:grey", linewidth=1.5, label="held-out accuracy after each epoch")
    saved = np.asarray(checkpoint_epochs)
    ax.plot(saved[:traced] + 1, accuracy[saved[:traced]], "o", color="tab:blue", label="checkpoints traced")
    if traced < len(saved):  # a legend entry without markers when every checkpoint is traced
        ax.plot(
            saved[traced:] + 1,
            accuracy[saved[traced:]],
            "o",
            markerfacecolor="white",
            color="tab:blue",
            label="checkpoints not traced",
        )
    best = int(np.argmax(accuracy))
    ax.axvline(best + 1, color="black", linestyle="--", linewidth=1, label=f"best held-out epoch ({best + 1})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy on held-out digits")
    ax.set_title("Traced: the checkpoints up to the first one at or after the held-out peak", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs, also for a short run
    ax.grid(alpha=0.3)
    # below the axes: inside, it covered the last checkpoints and the peak when accuracy rose to the end
    legend = ax.legend(
        loc="lower center", bbox_to_anchor=(0.5, 0), bbox_transform=fig.transFigure, ncol=2, fontsize=8, frameon=False
    )
    legend.set_in_layout(False)  # the axes laid out above it
    fig.tight_layout(rect=(0, legend.get_window_extent().height / fig.bbox.height, 1, 1))
    fig.savefig(path)
    return path


@dataclass(frozen=True)
class GridExample:
    """One row of the influence grid: a test digit (image (64,), true label, the label predicted by
    the model at the last traced checkpoint and by the final model) and its top proponents /
    opponents (train row indices (k,) and scores (k,))."""

    image: np.ndarray
    label: int
    predicted: int
    final: int
    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray


_NEUTRAL = "tab:grey"  # a listed proponent scoring <= 0 or opponent scoring >= 0


def _train_title(score: float, given: int, true: int) -> str:
    return f"{score:+.2g}\ngiven {given}" + ("" if given == true else f", true {true}")


def plot_influence_grid(
    examples: list[GridExample],
    x_train: np.ndarray,
    y_given: np.ndarray,
    y_true: np.ndarray,
    path: Path,
    traced_epoch: int,
) -> Path:
    """Per test digit: the digit titled with its label, the prediction of the model at traced_epoch
    (1-based; the last traced checkpoint) and, where it differs, the final model's, then the train rows
    of its k highest scores (proponents, green) and its k lowest (opponents, red), titled with score,
    given label and (if flipped) true label. The k lowest may include scores of 0 or above (and the k
    highest scores of 0 or below) when fewer are of the side's sign: those are grey, not red or green."""
    k = len(examples[0].proponents)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.15 * (2 * k + 1), 1.8 * len(examples) + 0.5), dpi=120)
    axes = fig.subplots(len(examples), 2 * k + 1)
    axes = np.atleast_2d(axes)
    unsigned = False  # a grey panel drawn
    for row, ex in zip(axes, examples, strict=True):
        verdict = "right" if ex.predicted == ex.label else "WRONG"
        title = f"test digit {ex.label}\nepoch {traced_epoch}: {ex.predicted} ({verdict})"
        title += "" if ex.final == ex.predicted else f"\nfinal model: {ex.final}"
        panels = [(ex.image, title, "black")]
        for rows, scores, sign, colour in (
            (ex.proponents, ex.proponent_scores, 1, "tab:green"),
            (ex.opponents, ex.opponent_scores, -1, "tab:red"),
        ):
            panels += [  # the k highest / lowest scores: one of 0 or the other sign is grey (not pushed that way)
                (x_train[i], _train_title(s, y_given[i], y_true[i]), colour if sign * s > 0 else _NEUTRAL)
                for i, s in zip(rows, scores, strict=True)
            ]
            unsigned = unsigned or any(sign * s <= 0 for s in scores)
        for ax, (image, title, colour) in zip(row, panels, strict=True):
            ax.imshow(image.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            flipped = "true" in title
            ax.set_title(title, fontsize=7, color=colour, fontweight="bold" if flipped else "normal")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2.5 if flipped else 1)
    opponents = f"and of its {k} lowest, its opponents (red: negative, training on them raised that loss)"
    if unsigned:
        opponents += f"; grey: a score of 0 or of the other sign, listed as fewer than {k} are of that side's sign"
    lines = [
        f"Each test digit with the prediction of the model at epoch {traced_epoch}, the last checkpoint traced "
        "(and the final model's where it differs),",
        f"then the training digits of its {k} highest influence scores, its proponents (green: positive, training "
        "on them lowered its loss at its true label),",
        opponents + ".",
        "Titles: influence score, the label given in training and, in bold with a thick frame, the true label "
        "where it was flipped.",
    ]
    fig.suptitle("\n".join(lines), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
