"""PNG plots of a quality payload: detection curves per dataset, LDS per method with error bars."""

from __future__ import annotations

from pathlib import Path

from ..plot import _pyplot, _save
from .report import method_order


def detection_curves(payload: dict, path: Path) -> Path:
    """Fraction of flipped labels found against fraction inspected, one panel per dataset."""
    plt = _pyplot()
    detect = payload["detection"]
    cols = min(3, len(detect))
    rows = -(-len(detect) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.8 * rows + 1.2), squeeze=False)
    for ax in axes.flat[len(detect) :]:
        ax.set_visible(False)
    for ax, (name, d) in zip(axes.flat, detect.items(), strict=False):
        xs = [0.0, *d["inspect"]]
        ax.plot(xs, [0.0, *d["perfect"]], "k--", linewidth=1, label="perfect detector")
        colours = plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2]
        for i, method in enumerate(m for m in method_order(detect) if m in d["methods"]):
            style = "-" if method.startswith("tracin") else ":"
            ax.plot(
                xs,
                [0.0, *d["methods"][method]["found"]],
                style,
                marker="o",
                markersize=3,
                label=method,
                color=colours[i % len(colours)],
            )
        ax.set_title(f"{name} ({d['n_train']} train, {payload['config']['noise']:.0%} flipped)", fontsize=9)
        ax.set_xlabel("fraction of training data inspected")
        ax.set_ylabel("fraction of flipped labels found")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7)
    fig.tight_layout(rect=(0, 1.1 / (3.8 * rows + 1.2), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


MAX_WIDTH_IN = 16.0  # inches (1760 px at the 110 dpi of _save): 23 methods x 4 datasets made a 34.5-inch figure


def lds_figure(payload: dict):
    """The figure of lds_bars, laid out (tight) but not saved."""
    plt = _pyplot()
    results = payload["lds"]
    names = [m for m in method_order(results) if any(m in d["methods"] for d in results.values())]
    # the method names, rotated below the bars, take about 1.7 inches: a fixed height leaves the bars room
    fig, ax = plt.subplots(figsize=(min(MAX_WIDTH_IN, max(8.0, 0.75 * len(names) * len(results) / 2)), 6.0))
    width = 0.8 / len(results)
    for j, (dataset, d) in enumerate(results.items()):
        xs = [i + j * width for i, m in enumerate(names) if m in d["methods"]]
        ax.bar(
            xs,
            [d["methods"][m]["mean"] for m in names if m in d["methods"]],
            width,
            yerr=[d["methods"][m]["se"] for m in names if m in d["methods"]],
            capsize=2,
            label=dataset,
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(
        [i + width * (len(results) - 1) / 2 for i in range(len(names))], names, rotation=35, ha="right", fontsize=8
    )
    ax.set_ylabel("LDS (Spearman)\nmean ± s.e. over test examples")
    ax.set_title(
        f"Linear datamodeling score, {payload['config']['lds_models']} models on random "
        f"{payload['config']['lds_fraction']:.0%} subsets",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the axes: over no bar
    fig.tight_layout()
    return fig


def lds_bars(payload: dict, path: Path) -> Path:
    """LDS mean +- standard error over held-out examples, one bar group per method."""
    return _save(lds_figure(payload), path)


def plot_all(payload: dict, directory: Path, name: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [
        detection_curves(payload, directory / f"{name}_detection.png"),
        lds_bars(payload, directory / f"{name}_lds.png"),
    ]
