"""Checkpoint lists: (params, learning_rate) pairs, params a pytree or a saved checkpoint's path."""

from __future__ import annotations

import importlib
import os
from typing import Any

import jax
import numpy as np

from .._export.checkpoints import parse_checkpoints as shared_parse
from .._export.fingerprint import digest_arrays
from .params import leaf_path


def parse_checkpoints(checkpoints: Any) -> list[tuple[Any, float]]:
    """[(params or path, learning rate)] from a sequence of pairs (see tracin._export.checkpoints)."""
    return shared_parse(checkpoints, "params pytree or path")


def state_digest(params: Any) -> str:
    """Fingerprint of an in-memory params pytree: the paths and contents of its array leaves
    (non-array leaves are compared by the layout). (A checkpoint path is fingerprinted by its
    bytes, in tracin._export.)"""
    arrays = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if isinstance(leaf, (jax.Array, np.ndarray)):
            arrays += [np.frombuffer(leaf_path(path).encode(), np.uint8), np.asarray(leaf)]
    return digest_arrays(arrays)


def restore(source: Any, where: str) -> Any:
    """The params pytree of a checkpoint entry: returned as is, or restored from a path.

    A directory is read with orbax (`StandardCheckpointer`); a file as Flax msgpack
    (`flax.serialization.msgpack_restore`). Both give the nested dicts of arrays that were saved.
    """
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = os.path.abspath(os.fspath(source))
    if os.path.isdir(path):
        ocp = _reader("orbax.checkpoint", "orbax-checkpoint", f"{where}: {path} is a directory (an orbax checkpoint)")
        return ocp.StandardCheckpointer().restore(path)
    if os.path.isfile(path):
        serialization = _reader("flax.serialization", "flax", f"{where}: {path} is a file (a Flax msgpack checkpoint)")
        with open(path, "rb") as f:
            return serialization.msgpack_restore(f.read())
    raise FileNotFoundError(f"{where}: no checkpoint at {path}")


def _reader(module: str, package: str, what: str) -> Any:
    """The module that reads a checkpoint format; ImportError saying `what` needs `package` if absent."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what}; reading it needs {package} (pip install {package})") from None
