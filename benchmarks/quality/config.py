"""The suite's settings as small frozen dataclasses, saved with the results (FULL and QUICK)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class Training:
    """SGD with momentum, the rate dropped 10x after `decay_at` of the epochs; `checkpoints` evenly
    spaced, the last one at the end of training."""

    epochs: int
    checkpoints: int
    hidden: int = 128
    batch_size: int = 64
    learning_rate: float = 0.03
    momentum: float = 0.9
    decay_at: float = 0.6

    def rate_at(self, epoch: int) -> float:
        """The rate in force during `epoch` (0-based)."""
        return self.learning_rate * (1.0 if epoch < round(self.decay_at * self.epochs, 9) else 0.1)  # as tracin.demo

    def checkpoint_epochs(self) -> list[int]:
        """Number of epochs completed at each checkpoint, ascending."""
        return [int(e) for e in np.linspace(0, self.epochs, self.checkpoints + 1).round()[1:]]


@dataclass(frozen=True)
class Suite:
    """datasets: names known to benchmarks.quality.data; noise: fraction of training labels flipped
    for detection; seeds: one detection run per seed; lds_models: subset models per dataset;
    lds_test: held-out examples the LDS is averaged over; inspect: fractions of the training set
    inspected in the detection curves; detection_only: datasets measured by detection alone."""

    datasets: tuple[str, ...]
    seeds: tuple[int, ...]
    detection: dict[str, Training]
    lds: dict[str, Training]
    lds_models: int
    lds_test: int
    projection_dims: tuple[int, ...]
    noise: float = 0.2
    inspect: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    lds_fraction: float = 0.5
    quick: bool = False
    captum_rows: tuple[int, int] = field(default=(48, 8))
    detection_only: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return asdict(self)


DATASETS = ("digits", "breast_cancer", "wine", "synthetic")
# `tracin demo`'s training: 150 epochs, batch 64, 128 hidden units, rate 0.1 (momentum 0.9) dropped 10x
# after 60% of the epochs; with its data ("digits_demo": pixels in [0, 1], 1400 train). Here with 5
# checkpoints; `tracin demo` saves 10 by default, the setting "digits_demo_10ckpt".
DEMO = Training(150, 5, hidden=128, batch_size=64, learning_rate=0.1)
# Detection settings that train on another setting's data (here: the demo's default, a checkpoint every 15 epochs).
SAME_DATA = {"digits_demo_10ckpt": "digits_demo"}
BATCH = {"digits": 64, "breast_cancer": 32, "wine": 32, "synthetic": 64}  # about 10+ steps per epoch

FULL = Suite(
    datasets=DATASETS,
    seeds=(0, 1, 2),
    detection={
        **{name: Training(150, 10, batch_size=BATCH[name]) for name in DATASETS},
        "digits_demo": DEMO,
        "digits_demo_10ckpt": replace(DEMO, checkpoints=10),
    },
    lds={name: Training(40, 8, batch_size=BATCH[name]) for name in DATASETS},
    detection_only=("digits_demo", "digits_demo_10ckpt"),
    lds_models=50,
    lds_test=100,
    projection_dims=(64, 256, 1024),  # 1024: the space the whitened methods are fitted in (influence.py)
)

QUICK = Suite(
    datasets=("digits", "breast_cancer", "synthetic"),
    seeds=(0,),
    detection={name: Training(60, 4, hidden=64, batch_size=BATCH[name]) for name in DATASETS},
    lds={name: Training(15, 4, hidden=64, batch_size=BATCH[name]) for name in DATASETS},
    lds_models=12,
    lds_test=30,
    projection_dims=(32,),
    quick=True,
    captum_rows=(24, 4),
)


def dataset_of(setting: str) -> str:
    """The dataset (benchmarks.quality.data name) a detection setting trains on."""
    return SAME_DATA.get(setting, setting)
