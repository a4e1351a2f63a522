"""checkpoints_to_trace takes 1-D sequences only: a 2-D epoch list or accuracy table is refused naming
the argument, not flattened into a wrong count (r369 mutants R2, R3)."""

from __future__ import annotations

import pytest

from tracin.demo.recipe import checkpoints_to_trace


def test_a_two_dimensional_accuracy_table_is_refused():
    with pytest.raises(ValueError, match=r"held_out_accuracy must be a non-empty 1-D sequence .*shape \(2, 2\)"):
        checkpoints_to_trace([0, 1], [[0.5, 0.9], [0.6, 0.7]])


def test_two_dimensional_checkpoint_epochs_are_refused():
    with pytest.raises(ValueError, match=r"checkpoint_epochs must be a non-empty ascending sequence, got \[\[0, 1\]\]"):
        checkpoints_to_trace([[0, 1]], [0.5, 0.9])


def test_a_peak_after_the_last_checkpoint_traces_all():
    # hand-worked: checkpoints after epochs 0 and 1, best after epoch 3 (none saved at or after): all 2
    assert checkpoints_to_trace([0, 1], [0.1, 0.2, 0.3, 0.9]) == 2
