"""Every attribution method of the suite, one function each, registered by name.

A detector maps a DetectionCase to float64 (n,) suspicion scores (higher: inspect first). An
attributor maps an AttributionCase to float64 (m, n) attributions of each training example to each
test example (higher: training on it lowers that test loss). To add a method, write one function
and decorate it with @detector("name") and/or @attributor("name"), for example

    @attributor("tracin whitened")
    def tracin_whitened(case: AttributionCase) -> np.ndarray:
        ...  # case.run.checkpoints, case.x_train / case.x_test, or case.influence's shared terms

A method that needs an optional package is registered with needs="module": when the module is
missing or the method raises, the suite reports that instead of stopping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import peers
from .cases import AttributionCase, DetectionCase
from .influence import RunInfluence
from .training import Trajectory

Detector = Callable[[DetectionCase], np.ndarray]
Attributor = Callable[[AttributionCase], np.ndarray]
DETECTORS: dict[str, Detector] = {}
ATTRIBUTORS: dict[str, Attributor] = {}
PEERS: dict[str, str] = {}  # method name -> the module it needs; a peer that is missing or fails is reported


def detector(name: str, needs: str | None = None) -> Callable[[Detector], Detector]:
    def register(fn: Detector) -> Detector:
        DETECTORS[name] = fn
        if needs:
            PEERS[name] = needs
        return fn

    return register


def attributor(name: str, needs: str | None = None) -> Callable[[Attributor], Attributor]:
    def register(fn: Attributor) -> Attributor:
        ATTRIBUTORS[name] = fn
        if needs:
            PEERS[name] = needs
        return fn

    return register


# Checkpoint selections (indices into the run's checkpoints) -------------------------------------


def all_checkpoints(run: Trajectory) -> np.ndarray:
    return np.arange(len(run.checkpoints))


def early_half(run: Trajectory) -> np.ndarray:
    """Checkpoints from the first half of training (at least the first one)."""
    last_epoch = run.checkpoints[-1].epoch
    chosen = [i for i, c in enumerate(run.checkpoints) if 2 * c.epoch <= last_epoch]
    return np.array(chosen or [0])


def before_rate_drop(run: Trajectory) -> np.ndarray:
    """Checkpoints taken while the learning rate is still at its starting value."""
    first = run.checkpoints[0].learning_rate
    return np.array([i for i, c in enumerate(run.checkpoints) if c.learning_rate == first])


def up_to_held_out_peak(run: Trajectory) -> np.ndarray:
    """Checkpoints up to the first one taken at or after the epoch of best validation accuracy
    (validation rows held out of training, never the test rows measured on)."""
    best_epoch = int(np.argmax(run.val_accuracy)) + 1
    stop = next((i for i, c in enumerate(run.checkpoints) if c.epoch >= best_epoch), len(run.checkpoints) - 1)
    return np.arange(stop + 1)


def final_checkpoint(run: Trajectory) -> np.ndarray:
    return np.array([len(run.checkpoints) - 1])


def traced(terms: np.ndarray, influence: RunInfluence, chosen: np.ndarray) -> np.ndarray:
    """sum over the chosen checkpoints c of lr_c * terms[c]."""
    return np.tensordot(influence.rates[chosen], terms[chosen], axes=1)


# TracIn recipes: self-influence for detection, test-by-train scores for attribution ---------------


@detector("tracin all checkpoints")
def tracin_all_si(case: DetectionCase) -> np.ndarray:
    return traced(case.influence.self_terms(), case.influence, all_checkpoints(case.run))


@detector("tracin early half")
def tracin_early_si(case: DetectionCase) -> np.ndarray:
    return traced(case.influence.self_terms(), case.influence, early_half(case.run))


@detector("tracin before rate drop")
def tracin_before_drop_si(case: DetectionCase) -> np.ndarray:
    return traced(case.influence.self_terms(), case.influence, before_rate_drop(case.run))


@detector("tracin up to held-out peak")
def tracin_peak_si(case: DetectionCase) -> np.ndarray:
    return traced(case.influence.self_terms(), case.influence, up_to_held_out_peak(case.run))


@detector("tracin last layer")
def tracin_last_layer_si(case: DetectionCase) -> np.ndarray:
    return traced(case.influence.self_terms("last_layer"), case.influence, all_checkpoints(case.run))


@detector("tracin factored")
def tracin_factored_si(case: DetectionCase) -> np.ndarray:
    return traced(case.influence.self_terms("factored"), case.influence, all_checkpoints(case.run))


@attributor("tracin all checkpoints")
def tracin_all(case: AttributionCase) -> np.ndarray:
    return traced(case.influence.pair_terms(), case.influence, all_checkpoints(case.run))


@attributor("tracin early half")
def tracin_early(case: AttributionCase) -> np.ndarray:
    return traced(case.influence.pair_terms(), case.influence, early_half(case.run))


@attributor("tracin before rate drop")
def tracin_before_drop(case: AttributionCase) -> np.ndarray:
    return traced(case.influence.pair_terms(), case.influence, before_rate_drop(case.run))


@attributor("tracin up to held-out peak")
def tracin_peak(case: AttributionCase) -> np.ndarray:
    return traced(case.influence.pair_terms(), case.influence, up_to_held_out_peak(case.run))


@attributor("tracin final checkpoint")
def tracin_final(case: AttributionCase) -> np.ndarray:
    return traced(case.influence.pair_terms(), case.influence, final_checkpoint(case.run))


@attributor("tracin last layer")
def tracin_last_layer(case: AttributionCase) -> np.ndarray:
    return traced(case.influence.pair_terms("last_layer"), case.influence, all_checkpoints(case.run))


@attributor("tracin factored")
def tracin_factored(case: AttributionCase) -> np.ndarray:
    return traced(case.influence.pair_terms("factored"), case.influence, all_checkpoints(case.run))


@attributor("tracin cosine")
def tracin_cosine(case: AttributionCase) -> np.ndarray:
    return traced(case.influence.pair_terms(normalised=True), case.influence, all_checkpoints(case.run))


WHITENING_DAMPINGS = (0.1, 1.0, 3.0, 10.0, 30.0, 100.0)  # lambda as a multiple of the mean eigenvalue of R_c


def register_whitened(dampings: tuple[float, ...] = WHITENING_DAMPINGS) -> None:
    """'tracin whitened (damping D)' (all checkpoints) for each damping, both as detector (whitened on
    both sides) and attributor (test side whitened); the gradient space is the JSON's "whitening_space"."""
    for damping in dampings:

        def detect(case: DetectionCase, damping: float = damping) -> np.ndarray:
            terms = case.influence.whitened_self_terms(dampings)[damping]
            return traced(terms, case.influence, all_checkpoints(case.run))

        def attribute(case: AttributionCase, damping: float = damping) -> np.ndarray:
            terms = case.influence.whitened_pair_terms(dampings)[damping]
            return traced(terms, case.influence, all_checkpoints(case.run))

        detector(f"tracin whitened (damping {damping:g})")(detect)
        attributor(f"tracin whitened (damping {damping:g})")(attribute)


register_whitened()


def register_projected(dims: tuple[int, ...]) -> None:
    """'tracin projected d=DIM' (all checkpoints) for each dimension, both as detector and attributor."""
    for dim in dims:

        def detect(case: DetectionCase, dim: int = dim) -> np.ndarray:
            return traced(case.influence.self_terms("full", dim), case.influence, all_checkpoints(case.run))

        def attribute(case: AttributionCase, dim: int = dim) -> np.ndarray:
            return traced(case.influence.pair_terms("full", dim), case.influence, all_checkpoints(case.run))

        detector(f"tracin projected d={dim}")(detect)
        attributor(f"tracin projected d={dim}")(attribute)


# Sweeps: one setting chosen per dataset on the validation rows --------------------------------------


@dataclass(frozen=True)
class Sweep:
    """A method with one free setting: `fn(case, value)` for each of `values`; the suite reports, per
    dataset, the value of best LDS on the validation rows (never the test rows) and its test LDS."""

    parameter: str
    values: tuple[float, ...]
    fn: Callable[[AttributionCase, float], np.ndarray]


SWEEPS: dict[str, Sweep] = {}


def sweep(name: str, parameter: str, values: tuple[float, ...], needs: str | None = None):
    def register(fn: Callable[[AttributionCase, float], np.ndarray]) -> Callable:
        SWEEPS[name] = Sweep(parameter, values, fn)
        if needs:
            PEERS[name] = needs
        return fn

    return register


@sweep("tracin whitened (damping chosen on validation)", "damping", WHITENING_DAMPINGS)
def tracin_whitened_chosen(case: AttributionCase, damping: float) -> np.ndarray:
    terms = case.influence.whitened_pair_terms(WHITENING_DAMPINGS)[damping]
    return traced(terms, case.influence, all_checkpoints(case.run))


# Peers: TRAK adds its regularisation to the projected kernel X^T X (both libraries: absolute, not a
# multiple of the kernel's scale as whitening's damping is), so the sweep spans eight decades.
PEER_REGULARISATIONS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


def _trak(case: AttributionCase, chosen: np.ndarray, reg: float) -> np.ndarray:
    return peers.trak_attributions(
        case.run, chosen, case.x_train, case.y_train, case.x_test, case.y_test, case.projection_dim, reg
    )


@sweep("TRAK (final checkpoint)", "lambda_reg", PEER_REGULARISATIONS, needs="trak")
def trak_final(case: AttributionCase, reg: float) -> np.ndarray:
    return _trak(case, final_checkpoint(case.run), reg)


@sweep("TRAK (all checkpoints)", "lambda_reg", PEER_REGULARISATIONS, needs="trak")
def trak_all(case: AttributionCase, reg: float) -> np.ndarray:
    return _trak(case, all_checkpoints(case.run), reg)


def _dattri_trak(case: AttributionCase, chosen: np.ndarray, reg: float) -> np.ndarray:
    return peers.dattri_trak_attributions(
        case.run, chosen, case.x_train, case.y_train, case.x_test, case.y_test, case.projection_dim, reg
    )


@sweep("dattri TRAK (final checkpoint)", "regularization", PEER_REGULARISATIONS, needs="dattri")
def dattri_trak_final(case: AttributionCase, reg: float) -> np.ndarray:
    return _dattri_trak(case, final_checkpoint(case.run), reg)


@sweep("dattri TRAK (all checkpoints)", "regularization", PEER_REGULARISATIONS, needs="dattri")
def dattri_trak_all(case: AttributionCase, reg: float) -> np.ndarray:
    return _dattri_trak(case, all_checkpoints(case.run), reg)


# Baselines ---------------------------------------------------------------------------------------


def _final_logits(case: DetectionCase) -> torch.Tensor:
    model = case.run.model
    model.load_state_dict(case.run.checkpoints[-1].state)
    with torch.no_grad():
        return model(torch.from_numpy(case.x_train)).double()


@detector("final loss")
def final_loss(case: DetectionCase) -> np.ndarray:
    return torch.nn.functional.cross_entropy(
        _final_logits(case), torch.from_numpy(case.y_train), reduction="none"
    ).numpy()


@detector("GraNd (final gradient norm)")
def grand(case: DetectionCase) -> np.ndarray:
    return np.sqrt(case.influence.self_terms()[-1])


@detector("EL2N (final error norm)")
def el2n(case: DetectionCase) -> np.ndarray:
    logits = _final_logits(case)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(case.y_train), logits.shape[1]).double()
    return torch.linalg.vector_norm(torch.softmax(logits, dim=1) - onehot, dim=1).numpy()


@detector("AUM (area under the margin)")
def aum(case: DetectionCase) -> np.ndarray:
    """Margins after every epoch, averaged; a small or negative area is suspicious."""
    return -case.run.margins.astype(np.float64).mean(axis=0)


@detector("random")
def random_detector(case: DetectionCase) -> np.ndarray:
    return np.random.default_rng(1000 + case.seed).random(len(case.y_train))


@attributor("random")
def random_attributor(case: AttributionCase) -> np.ndarray:
    return np.random.default_rng(1000 + case.seed).standard_normal((len(case.x_test), len(case.x_train)))
