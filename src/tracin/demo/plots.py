"""The demo's figures (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_detection(curves: dict[str, np.ndarray], path: Path, noise: float) -> Path:
    """Fraction of flipped labels found against fraction of training data inspected."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    styles = {"TracIn self-influence": "-", "loss (final model)": "--", "random": ":"}
    for name, curve in curves.items():
        ax.plot(np.linspace(0, 1, len(curve)), curve, styles.get(name, "-"), label=name, linewidth=2)
    ax.axvline(noise, color="grey", linewidth=0.8)
    ax.set_xlabel("fraction of training data inspected")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title(f"Mislabel detection on digits ({noise:.0%} labels flipped)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_influence_grid(x_test: np.ndarray, y_test: np.ndarray, test_rows: list[int],
                        x_train: np.ndarray, y_train: np.ndarray, flipped: np.ndarray,
                        proponents, opponents, path: Path) -> Path:
    """Per chosen test digit: the digit, its top proponents (green) and opponents (red), each
    titled with its training label (flipped labels marked with '!')."""
    plt = _pyplot()
    k = proponents.indices.shape[1]
    rows = len(test_rows)
    fig, axes = plt.subplots(rows, 2 * k + 1, figsize=(1.1 * (2 * k + 1), 1.35 * rows), dpi=120)
    axes = np.atleast_2d(axes)
    for r, t in enumerate(test_rows):
        panels = [(x_test[t], f"test: {y_test[t]}", "black")]
        for side, colour in ((proponents, "tab:green"), (opponents, "tab:red")):
            for i, score in zip(side.indices[r], side.values[r]):
                mark = "!" if flipped[i] else ""
                panels.append((x_train[i], f"{y_train[i]}{mark} {score:+.2g}", colour))
        for ax, (image, title, colour) in zip(axes[r], panels):
            ax.imshow(image.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(title, fontsize=7, color=colour)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
    fig.suptitle(f"Test digits, their top {k} proponents (green) and opponents (red); "
                 "'!' = flipped training label", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
