"""Checkpoints: (state_dict or path, learning_rate) pairs, validated against the model, loaded one at
a time (each exactly once) onto the model's device."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .._export.checkpoints import parse_checkpoints as shared_parse
from .._export.fingerprint import digest_arrays
from .data import host_array

_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
_PREFIX = "module."  # what torch.nn.DataParallel / DistributedDataParallel prepend


def parse_checkpoints(checkpoints: Any) -> list[tuple[Any, float]]:
    """[(state_dict or path, learning rate)] from a sequence of pairs (see tracin._export.checkpoints)."""
    return shared_parse(checkpoints, "state_dict or a path",
                        accepts=lambda s: isinstance(s, (str, os.PathLike, Mapping)))


def state_digest(source: Mapping, index: int) -> str:
    """Fingerprint of an in-memory checkpoint: the names and contents of its state_dict's tensors
    (in name order). (A checkpoint file is fingerprinted by its bytes, in tracin._export.)"""
    state = _unwrap(source, f"checkpoints[{index}] ({describe(source, index)})")
    arrays = []
    for key in sorted(state):
        arrays += [np.frombuffer(key.encode(), np.uint8), host_array(state[key])]
    return digest_arrays(arrays)


def describe(source: Any, index: int) -> str:
    """How a checkpoint is named in metadata: its path, or its position for in-memory state dicts."""
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"state_dict[{index}]"


def _unwrap(obj: Any, name: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _unwrap(obj[key], name)
    raise ValueError(f"{name} is not a state_dict (a mapping of names to tensors), nor a dict holding "
                     f"one under {', '.join(repr(k) for k in _NESTED_KEYS)}")


def _strip_prefix(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict:
    """Drops a DataParallel 'module.' prefix when every key has it and the model's keys do not."""
    if state and all(k.startswith(_PREFIX) for k in state) and not any(k.startswith(_PREFIX) for k in expected):
        return {k[len(_PREFIX):]: v for k, v in state.items()}
    return dict(state)


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """state_dict names that are second names of a tied parameter or buffer (e.g. a decoder weight
    shared with the embedding); functional_call takes each tied tensor under its first name only."""
    seen: set[int] = set()
    second: set[str] = set()
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if id(t) in seen:
            second.add(name)
        seen.add(id(t))
    return second


def load_checkpoint(source: Any, index: int, reference: Mapping[str, torch.Tensor],
                    skip: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, keyed like `reference` (the model's state_dict) less the names in
    `skip`, each on the reference tensor's device and dtype. Paths are read with
    torch.load(weights_only=True)."""
    name = f"checkpoints[{index}] ({describe(source, index)})"
    if isinstance(source, (str, os.PathLike)):
        device = next(iter(reference.values())).device if reference else "cpu"
        try:
            obj = torch.load(source, map_location=device, weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoints[{index}]: no checkpoint at {os.path.abspath(source)}") from None
        except pickle.UnpicklingError as e:
            raise ValueError(f"{name} cannot be read with torch.load(weights_only=True), which only "
                             f"allows tensors and plain containers: {str(e).splitlines()[0]}") from None
    else:
        obj = source
    state = _strip_prefix(_unwrap(obj, name), reference)
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    if missing or unexpected:
        raise ValueError(
            f"{name} does not match the model: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    out = {}
    for key, ref in reference.items():
        if key in skip:
            continue
        t = state[key]
        if t.shape != ref.shape:
            raise ValueError(f"{name}: {key} has shape {tuple(t.shape)}, the model's has {tuple(ref.shape)}")
        dtype = ref.dtype if t.is_floating_point() else t.dtype
        out[key] = t.detach().to(device=ref.device, dtype=dtype)
    return out
