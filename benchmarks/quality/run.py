"""The suite's runs: per dataset, detection over seeds and the LDS against cached subset models,
every registered method side by side; the payload that becomes quality.json."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..common import code_version
from . import methods, metrics, peers
from .cases import AttributionCase, DetectionCase
from .config import Suite, dataset_of
from .data import SPLIT, Split, flip_labels, load
from .influence import RunInfluence
from .report import detection_winners, lds_winners
from .subsets import subset_models
from .training import accuracy, train

TIE = 0.02  # detection: within this of the best fraction found counts as a tie


PIP_NAMES = {"trak": "traker"}  # import name -> PyPI name, where they differ


def _call(name: str, fn: Callable, case) -> tuple[np.ndarray | None, str | None]:
    """The method's output, or (None, why) for a peer that is not installed or fails."""
    needs = methods.PEERS.get(name)
    if needs is None:
        return fn(case), None
    if importlib.util.find_spec(needs) is None:
        return None, f"not installed (pip install {PIP_NAMES.get(needs, needs)}, or pip install 'tracin[bench]')"
    try:
        return fn(case), None
    except Exception as e:  # a peer's failure is a result to report, not a crash of the suite
        return None, f"{type(e).__name__}: {e}"


def detection(setting: str, split: Split, suite: Suite, log: Callable[[str], None]) -> tuple[dict, DetectionCase]:
    """Fraction of flipped labels found per method (mean over seeds and per seed) with the training
    of suite.detection[setting] on `split`; the first seed's case."""
    spec = suite.detection[setting]
    per_method: dict[str, list] = {name: [] for name in methods.DETECTORS}
    errors: dict[str, str] = {}
    facts, first = [], None
    for seed in suite.seeds:
        noisy = flip_labels(split.y_train, split.classes, suite.noise, seed)
        run = train(split.x_train, noisy, split.classes, spec, seed, split.x_val, split.y_val)
        flipped = noisy != split.y_train
        case = DetectionCase(run, split.x_train, noisy, flipped, RunInfluence(run, split.x_train, noisy), seed)
        if first is None:
            first = case
        facts.append(
            {
                "seed": seed,
                "flipped": int(flipped.sum()),
                "final_train_accuracy": float(run.train_accuracy[-1]),
                "train_accuracy_on_flipped": float((run.margins[-1][flipped] > 0).mean()),
                "best_held_out_epoch": int(np.argmax(run.val_accuracy)) + 1,  # on the validation rows
                "final_held_out_accuracy": float(run.val_accuracy[-1]),
                "checkpoint_epochs": [c.epoch for c in run.checkpoints],
                "checkpoint_rates": [c.learning_rate for c in run.checkpoints],
            }
        )
        for name, fn in methods.DETECTORS.items():
            scores, error = _call(name, fn, case)
            if error:
                errors[name] = error
            else:
                per_method[name].append(metrics.found_fractions(scores, flipped, suite.inspect))
        found = {m: v[-1][suite.inspect.index(0.2)] for m, v in per_method.items() if v and 0.2 in suite.inspect}
        log(
            f"  {setting} seed {seed}: trained to {facts[-1]['final_train_accuracy']:.3f} on noisy labels; found at "
            "20% inspected: " + ", ".join(f"{m} {v:.3f}" for m, v in found.items())
        )
    n, n_flipped = len(split.y_train), facts[0]["flipped"]
    result = {
        "n_train": n,
        "classes": split.classes,
        "runs": facts,
        "whitening_space": first.influence.whitening_space,
        "inspect": list(suite.inspect),
        "perfect": metrics.perfect_fractions(n, n_flipped, suite.inspect),
        "methods": {name: {"found": np.mean(v, axis=0).tolist(), "per_seed": v} for name, v in per_method.items() if v},
        "errors": errors,
    }
    return result, first


def lds(split: Split, suite: Suite, cache: Path, log: Callable[[str], None]) -> dict:
    """LDS mean +- s.e. over held-out examples per method, against subset models trained on clean
    labels. Every method also attributes the validation rows; a sweep's setting is the one of best
    validation LDS, and only its test LDS is reported under the sweep's name."""
    spec, n_test = suite.lds[split.name], min(suite.lds_test, len(split.x_test))
    t0 = time.perf_counter()
    masks, losses, val_losses, cached = subset_models(
        split, spec, suite.lds_models, suite.lds_fraction, n_test, cache, log
    )
    subsets_s = time.perf_counter() - t0
    run = train(split.x_train, split.y_train, split.classes, spec, 0, split.x_val, split.y_val)
    # Test rows first, then the validation rows: each row's attribution depends on that row alone.
    x_eval = np.concatenate([split.x_test[:n_test], split.x_val])
    y_eval = np.concatenate([split.y_test[:n_test], split.y_val])
    influence = RunInfluence(run, split.x_train, split.y_train, x_eval, y_eval)
    case = AttributionCase(run, split.x_train, split.y_train, x_eval, y_eval, influence, 0)

    def measure(attributions: np.ndarray) -> tuple[dict, dict]:
        test = metrics.lds(attributions[:n_test], masks, losses)
        val = metrics.lds(attributions[n_test:], masks, val_losses)
        return {"mean": test["mean"], "se": test["se"]}, {"mean": val["mean"], "se": val["se"]}

    scores, validation, sweeps, errors, seconds = {}, {}, {}, {}, {}
    for name, fn in methods.ATTRIBUTORS.items():
        t0 = time.perf_counter()
        attributions, error = _call(name, fn, case)
        seconds[name] = time.perf_counter() - t0
        if error:
            errors[name] = error
            continue
        scores[name], validation[name] = measure(attributions)
        log(f"  {split.name} LDS {name}: {scores[name]['mean']:.3f} ({seconds[name]:.0f} s)")
    for name, sw in methods.SWEEPS.items():
        t0 = time.perf_counter()
        tried: list[tuple[dict, dict]] = []
        for value in sw.values:
            attributions, error = _call(name, lambda case, fn=sw.fn, value=value: fn(case, value), case)
            if error:
                errors[name] = error if error.startswith("not installed") else f"{sw.parameter} {value:g}: {error}"
                break
            tried.append(measure(attributions))
        seconds[name] = time.perf_counter() - t0
        log(f"  {split.name} LDS sweep {name}: {len(tried)}/{len(sw.values)} settings ({seconds[name]:.0f} s)")
        if name in errors:
            continue
        best = max(range(len(tried)), key=lambda i: tried[i][1]["mean"])  # ties: the first (smaller) value
        scores[name], validation[name] = tried[best]
        sweeps[name] = {
            "parameter": sw.parameter,
            "values": list(sw.values),
            "validation": [v["mean"] for _, v in tried],
            "test": [t["mean"] for t, _ in tried],
            "chosen": sw.values[best],
        }
    log(f"  {split.name} LDS: " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in scores.items()))
    return {
        "models": suite.lds_models,
        "subset_fraction": suite.lds_fraction,
        "test_examples": n_test,
        "validation_examples": len(split.x_val),
        "n_train": len(split.x_train),
        "subset_models_cached": cached,
        "subset_models_s": subsets_s,
        "full_model_test_accuracy": accuracy(run.model, split.x_test, split.y_test),
        "checkpoint_epochs": [c.epoch for c in run.checkpoints],
        "whitening_space": influence.whitening_space,
        "projection_dim": case.projection_dim,  # whitened TracIn, TRAK and dattri alike
        "methods": scores,
        "validation": validation,
        "sweeps": sweeps,
        "errors": errors,
        "method_s": seconds,
    }


def winners(detect: dict[str, dict], lds_results: dict[str, dict], at: float) -> dict:
    """Per dataset the best detector at `at` inspected, and the methods within TIE of the best on
    every dataset (detection, report.detection_winners) / within one s.e. of the best on every dataset
    (LDS, of all methods and of the tracin recipes, report.lds_winners); both leave the fixed whitened
    dampings out of "best"."""
    return {"detection_at": at, "tie": TIE, **detection_winners(detect, at, TIE), **lds_winners(lds_results)}


def run(suite: Suite, cache: Path, log: Callable[[str], None] = print) -> dict:
    """Every dataset of the suite; returns the JSON payload (without machine facts), with "code":
    code_version() as the run started."""
    import torch

    code = code_version()

    torch.set_num_threads(1)  # small MLPs: one thread is fastest and leaves the other core to tracin
    methods.register_projected(suite.projection_dims)
    t_start = time.perf_counter()
    detect, lds_results, timings, captum = {}, {}, {}, None
    for name in (*suite.datasets, *suite.detection_only):
        split = load(dataset_of(name))
        t0 = time.perf_counter()
        detect[name], case = detection(name, split, suite, log)
        timings[f"{name} detection"] = time.perf_counter() - t0
        if captum is None:
            n_train, n_test = suite.captum_rows
            captum = _captum(case, split, n_train, n_test)
            log(f"  Captum TracInCP check: {captum}")
        if name in suite.detection_only:
            continue
        t0 = time.perf_counter()
        lds_results[name] = lds(split, suite, cache, log)
        timings[f"{name} lds"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return {
        "code": code,
        "config": suite.as_dict(),
        "split": SPLIT,
        "peers": {
            "captum": captum,
            "trak": {"version": peers.version("traker")},
            "dattri": {"version": peers.version("dattri")},
        },
        "detection": detect,
        "lds": lds_results,
        "winners": winners(detect, lds_results, 0.2),
        "timings_s": timings,
    }


def _captum(case: DetectionCase, split: Split, n_train: int, n_test: int) -> dict:
    if importlib.util.find_spec("captum") is None:
        return {"error": "not installed (pip install captum)"}
    return peers.captum_check(
        case.run, case.x_train[:n_train], case.y_train[:n_train], split.x_test[:n_test], split.y_test[:n_test]
    )
