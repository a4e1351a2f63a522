"""The demo's figures, drawn from given numbers: what they show and where (legends off the data)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from tracin.demo.plots import plot_held_out_accuracy


@pytest.fixture
def drawn(monkeypatch):
    """The figures saved (drawn, so that their boxes are known), in order."""
    figures = []
    savefig = Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


@pytest.mark.parametrize(
    "accuracy,epochs,traced",
    [
        ([0.819, 0.897, 0.899, 0.942, 0.970, 0.970], [1, 3, 5], 3),  # `tracin demo --epochs 6 --checkpoints 3`
        ([0.82, 0.897], [1], 1),  # --epochs 2 --checkpoints 1
        ([0.5, 0.8, 0.9, 0.7, 0.6], [1, 4], 1),
    ],
)
def test_the_held_out_legend_is_off_the_axes_and_epochs_are_whole(accuracy, epochs, traced, drawn, tmp_path):
    # review48 F2: a legend fixed at "upper right" covered the last checkpoints, the peak and the best
    # epoch's line when accuracy rose to the end; 2 epochs had ticks 0.8, 1.0, 1.2, ...
    plot_held_out_accuracy(np.array(accuracy), epochs, traced, tmp_path / "acc.png")
    fig = drawn[-1]
    ax = fig.axes[0]
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.y1 < axes.y0 and 0 <= legend.y0 and fig.bbox.x0 <= legend.x0 and legend.x1 <= fig.bbox.x1
    ticks = [t.get_position()[0] for t in ax.get_xticklabels() if t.get_text()]
    shown = [t for t in ticks if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert shown and all(float(t).is_integer() for t in shown), shown
    assert {1, len(accuracy)} <= set(shown)


def _grid(drawn, tmp_path, proponent_scores, opponent_scores):
    from tracin.demo.plots import GridExample, plot_influence_grid

    rng = np.random.default_rng(0)
    x_train, labels = rng.random((6, 64)), np.arange(6) % 10
    example = GridExample(
        image=rng.random(64),
        label=1,
        predicted=1,
        final=1,
        proponents=np.array([0, 1, 2]),
        proponent_scores=np.array(proponent_scores),
        opponents=np.array([5, 4, 3]),
        opponent_scores=np.array(opponent_scores),
    )
    plot_influence_grid([example], x_train, labels, labels, tmp_path / "grid.png", traced_epoch=3)
    fig = drawn[-1]
    colours = [ax.title.get_color() for ax in fig.axes[1:]]
    return colours, fig._suptitle.get_text()


def test_listed_opponents_of_score_0_or_above_are_not_drawn_as_raising_the_loss(drawn, tmp_path):
    # review48 F4: the opponents are the k lowest scores, which can be 0 or positive when fewer than k
    # are negative; the figure drew them red, "(red: raised it)", as if training on them raised the loss
    colours, caption = _grid(drawn, tmp_path, [2.0, 0.5, -0.1], [-1.5, 0.0, 0.25])
    assert colours == ["tab:green", "tab:green", "tab:grey", "tab:red", "tab:grey", "tab:grey"]
    assert "3 highest influence scores" in caption and "3 lowest" in caption
    assert "red: negative, training on them raised that loss" in caption
    assert "grey: a score of 0 or of the other sign" in caption
    colours, caption = _grid(drawn, tmp_path, [2.0, 0.5, 0.1], [-1.5, -0.2, -0.01])
    assert colours == ["tab:green"] * 3 + ["tab:red"] * 3 and "grey" not in caption


@pytest.mark.parametrize("epochs,traced", [([1, 3, 5], 2), ([0, 2, 4], 3)])
def test_checkpoints_are_drawn_at_their_epochs_traced_ones_filled(epochs, traced, drawn, tmp_path):
    """A checkpoint saved after 0-based epoch e is a dot at epoch e + 1 (the x axis counts epochs from 1)
    on the accuracy curve; the traced ones filled, the others hollow."""
    accuracy = np.array([0.5, 0.6, 0.8, 0.9, 0.7, 0.65])
    plot_held_out_accuracy(accuracy, epochs, traced, tmp_path / "acc.png")
    lines = {line.get_label(): line for line in drawn[-1].axes[0].get_lines()}
    dots = lines["checkpoints traced"]
    np.testing.assert_array_equal(dots.get_xdata(), np.array(epochs[:traced]) + 1)
    np.testing.assert_array_equal(dots.get_ydata(), accuracy[epochs[:traced]])
    hollow = lines.get("checkpoints not traced")
    if traced == len(epochs):
        assert hollow is None
    else:
        np.testing.assert_array_equal(hollow.get_xdata(), np.array(epochs[traced:]) + 1)
        np.testing.assert_array_equal(hollow.get_ydata(), accuracy[epochs[traced:]])
        assert hollow.get_markerfacecolor() == "white"
    np.testing.assert_array_equal(lines["held-out accuracy after each epoch"].get_xdata(), np.arange(1, 7))
