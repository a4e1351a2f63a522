"""Which checkpoints to trace, chosen from the training run (measured in benchmarks/quality).

A model trained on noisy labels first learns the clean pattern, then memorises the wrong labels;
from then on held-out accuracy falls, and once fitted the flipped examples' gradients are no larger
than those of hard but correctly labelled ones. Tracing only the checkpoints up to the first one saved
at or after the held-out peak keeps those at which the flipped examples still stand out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RULE = (
    "save a checkpoint every ~10% of training, record held-out accuracy after every epoch, and trace the "
    "checkpoints up to and including the first one saved at or after the epoch of best held-out accuracy "
    "(each weighted by its learning rate)"
)


def checkpoints_to_trace(checkpoint_epochs: Sequence[int], held_out_accuracy: Sequence[float]) -> int:
    """How many of the checkpoints to trace (the first ones): up to and including the first saved at
    or after the epoch of best held-out accuracy (its first occurrence), or all if none was.

    checkpoint_epochs: ascending 0-based epochs after which each checkpoint was saved;
    held_out_accuracy: (epochs,) accuracy on held-out data after each epoch.
    """
    epochs = np.asarray(checkpoint_epochs)
    accuracy = np.asarray(held_out_accuracy, dtype=np.float64)
    if epochs.ndim != 1 or not epochs.size or np.any(np.diff(epochs) <= 0):
        raise ValueError(f"checkpoint_epochs must be a non-empty ascending sequence, got {epochs.tolist()}")
    if accuracy.ndim != 1 or not accuracy.size:
        raise ValueError(
            f"held_out_accuracy must be a non-empty 1-D sequence (one per epoch), got shape {accuracy.shape}"
        )
    best = int(np.argmax(accuracy))
    after = np.flatnonzero(epochs >= best)
    return int(after[0]) + 1 if after.size else len(epochs)
