"""Peers: Captum TracInCP as an oracle on a small case, and TRAK (`traker`, and dattri's TRAKAttributor)
as attributors when installed. None is a dependency; a peer that is missing or fails is reported, not fatal."""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import io
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tracin
import tracin.torch

from .influence import _loss
from .training import Trajectory


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def captum_check(
    run: Trajectory, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> dict:
    """Captum TracInCP and tracin on the same checkpoints (weights = learning rates), full
    gradients: influence matrix and self-influence, max abs difference and the scale it is read at."""
    from captum.influence import TracInCP

    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    xs, ys = torch.from_numpy(x_test), torch.from_numpy(y_test)
    checkpoints = [(c.state, c.learning_rate) for c in run.checkpoints]
    t0 = time.perf_counter()
    grads_train = tracin.torch.export_gradients(run.model, checkpoints, (xt, yt), _loss, progress=False)
    grads_test = tracin.torch.export_gradients(run.model, checkpoints, (xs, ys), _loss, progress=False)
    ours = tracin.scores(grads_test, grads_train).astype(np.float64)
    ours_self = tracin.self_influence(grads_train).astype(np.float64)
    ours_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        paths, rates = [], {}
        for i, (state, lr) in enumerate(checkpoints):
            paths.append(str(Path(tmp) / f"c{i}.pt"))
            torch.save(state, paths[-1])
            rates[paths[-1]] = lr

        def load(model: nn.Module, path: str) -> float:
            model.load_state_dict(torch.load(path, weights_only=True))
            return rates[path]

        t0 = time.perf_counter()
        captum = TracInCP(
            copy.deepcopy(run.model).eval(),
            DataLoader(TensorDataset(xt, yt), batch_size=16),
            paths,
            checkpoints_load_func=load,
            loss_fn=nn.CrossEntropyLoss(reduction="none"),
            batch_size=16,
        )
        theirs = captum.influence((xs, ys)).detach().double().numpy()
        theirs_self = captum.self_influence().detach().double().numpy()
        captum_s = time.perf_counter() - t0
    return {
        "version": version("captum"),
        "n_train": len(x_train),
        "n_test": len(x_test),
        "checkpoints": len(checkpoints),
        "max_abs_diff_scores": float(np.abs(ours - theirs).max()),
        "max_abs_scores": float(np.abs(theirs).max()),
        "max_abs_diff_self_influence": float(np.abs(ours_self - theirs_self).max()),
        "max_abs_self_influence": float(np.abs(theirs_self).max()),
        "captum_s": captum_s,
        "tracin_s": ours_s,
    }


def trak_attributions(
    run: Trajectory,
    chosen: np.ndarray,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    proj_dim: int,
    lambda_reg: float,
) -> np.ndarray:
    """TRAK scores (m, n), float64, from the chosen checkpoints, on the CPU in float32; lambda_reg is
    added to the diagonal of the projected kernel before it is inverted."""
    from trak import TRAKer

    model = copy.deepcopy(run.model).eval()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    xs, ys = torch.from_numpy(x_test), torch.from_numpy(y_test)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):  # TRAK's bars
        traker = TRAKer(
            model=model,
            task="image_classification",
            train_set_size=len(x_train),
            save_dir=tmp,
            device="cpu",
            proj_dim=proj_dim,
            use_half_precision=False,
            logging_level=logging.ERROR,
            lambda_reg=lambda_reg,
        )
        for i in chosen:
            traker.load_checkpoint(run.checkpoints[i].state, model_id=int(i))
            traker.featurize(batch=(xt, yt), num_samples=len(x_train))
        traker.finalize_features()
        # traker 0.3.2's BasicProjector frees its matrix in finalize_features and rebuilds it only when
        # the model id changes: without this, scoring after a single featurized model fails.
        traker.projector.model_id = -1
        for i in chosen:
            traker.start_scoring_checkpoint(
                exp_name="quality", checkpoint=run.checkpoints[i].state, model_id=int(i), num_targets=len(x_test)
            )
            traker.score(batch=(xs, ys), num_samples=len(x_test))
        scores = traker.finalize_scores(exp_name="quality")
    return np.asarray(scores, dtype=np.float64).T


def true_class_margin(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """log p / (1 - p) of class `label` under softmax(logits) ((classes,) -> scalar), computed as
    logits[label] - logsumexp(the other logits): finite even where p rounds to 1 in floating point.
    No indexing by the label's value, so that torch.func.vmap (as dattri uses it) runs it."""
    true = torch.arange(logits.shape[-1], device=logits.device) == label
    others = torch.where(true, torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device), logits)
    return (logits * true).sum(-1) - torch.logsumexp(others, -1)


def dattri_trak_attributions(
    run: Trajectory,
    chosen: np.ndarray,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    proj_dim: int,
    regularization: float,
) -> np.ndarray:
    """dattri's TRAK scores (m, n), float64, from the chosen checkpoints (model output: the margin
    log p / (1 - p) of the true class, as TRAK's classification task), on the CPU; `regularization`
    is added to the diagonal of the projected kernel before it is inverted."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    model = copy.deepcopy(run.model).eval()

    def log_p(params: dict, data: tuple) -> torch.Tensor:
        x, y = data
        return -nn.functional.cross_entropy(torch.func.functional_call(model, params, x[None]), y[None])

    def margin(params: dict, data: tuple) -> torch.Tensor:
        x, y = data
        return true_class_margin(torch.func.functional_call(model, params, x[None])[0], y)

    task = AttributionTask(loss_func=margin, model=model, checkpoints=[{**run.checkpoints[i].state} for i in chosen])
    attributor = TRAKAttributor(
        task=task,
        correct_probability_func=lambda params, data: torch.exp(log_p(params, data)),
        projector_kwargs={"proj_dim": proj_dim, "device": "cpu"},
        device="cpu",
        regularization=regularization,
    )
    train = DataLoader(TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train)), batch_size=64)
    test = DataLoader(TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test)), batch_size=64)
    with contextlib.redirect_stderr(io.StringIO()):  # dattri's bars
        attributor.cache(train)
        scores = attributor.attribute(test)
    return scores.detach().double().numpy().T
