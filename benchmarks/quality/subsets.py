"""The LDS ground truth: models retrained on random subsets of the training set, and their test
losses, cached on disk under a hash of everything that determines them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .config import Training
from .data import Split
from .training import mlp, test_losses, train

FORMAT = 2  # bump when the way subset models are trained or their losses computed changes (2: float64 losses)


def cache_key(split: Split, spec: Training, models: int, fraction: float, n_test: int) -> str:
    digest = hashlib.sha256()
    for a in (split.x_train, split.y_train, split.x_test[:n_test], split.y_test[:n_test]):
        digest.update(np.ascontiguousarray(a).tobytes())
    digest.update(
        json.dumps(
            {
                "spec": asdict(spec),
                "models": models,
                "fraction": fraction,
                "format": FORMAT,
                "torch": torch.__version__.split("+")[0],
            },
            sort_keys=True,
        ).encode()
    )
    return digest.hexdigest()[:16]


def subset_models(
    split: Split, spec: Training, models: int, fraction: float, n_test: int, cache: Path, log=print
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(masks bool (models, n_train), losses float64 (models, n_test) on the first n_test test rows,
    losses float64 (models, n_val) on the validation rows, whether read from the cache). Model k
    trains on a random round(fraction * n_train) rows from seed 10_000 + k; its final parameters are
    cached with the masks and test losses (the validation losses are recomputed from them)."""
    path = Path(cache) / f"lds-{split.name}-{cache_key(split, spec, models, fraction, n_test)}.npz"
    if path.exists():
        with np.load(path) as f:
            masks, losses, params = f["masks"], f["losses"], f["params"]
        return masks, losses, _losses_of(params, split, spec), True
    n = len(split.x_train)
    masks = np.zeros((models, n), dtype=bool)
    losses = np.empty((models, n_test))
    params = []
    for k in range(models):
        rng = np.random.default_rng(10_000 + k)
        masks[k, rng.choice(n, size=int(round(fraction * n)), replace=False)] = True
        run = train(split.x_train[masks[k]], split.y_train[masks[k]], split.classes, spec, 10_000 + k)
        losses[k] = test_losses(run.model, split.x_test[:n_test], split.y_test[:n_test])
        params.append(torch.cat([p.detach().reshape(-1) for p in run.model.parameters()]).numpy())
        if (k + 1) % 10 == 0 or k + 1 == models:
            log(f"  {split.name}: {k + 1}/{models} subset models")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, masks=masks, losses=losses, params=np.stack(params))
    tmp.replace(path)
    return masks, losses, _losses_of(np.stack(params), split, spec), False


def _losses_of(params: np.ndarray, split: Split, spec: Training) -> np.ndarray:
    """float64 (models, n_val): each subset model (its parameters flattened in model.parameters()
    order, one row per model) on the validation rows."""
    model = mlp(split.x_train.shape[1], spec.hidden, split.classes)
    out = np.empty((len(params), len(split.y_val)))
    for k, flat in enumerate(params):
        torch.nn.utils.vector_to_parameters(torch.from_numpy(flat), model.parameters())
        out[k] = test_losses(model, split.x_val, split.y_val)
    return out
