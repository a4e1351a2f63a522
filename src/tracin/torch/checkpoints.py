"""Checkpoints: (state_dict or path, learning_rate) pairs, or (state_dict or path, learning_rate,
optimizer_state) triples, validated against the model, loaded one at a time (each exactly once) onto
the model's device; optimizer states (torch.optim.Adam / AdamW `optimizer.state_dict()` or its path,
or a checkpoint folder holding it as optimizer.pt) read on the host and mapped to parameter names. A
checkpoint path may be a file for torch.load, a safetensors file (told by its first bytes, whatever its
name) or a Hugging Face `save_pretrained` folder (model.safetensors or pytorch_model.bin, sharded or
not)."""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import os
import pickle
import re
import stat
import struct
import sys
import warnings
import zipfile
import zlib
from collections.abc import Collection, Container, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, BinaryIO

import numpy as np
import torch

from .._export.checkpoints import Checkpoint, _is_rate
from .._export.checkpoints import parse_checkpoints as shared_parse
from .._export.fingerprint import FileStat, digest_arrays, digest_path
from .._export.preconditioner import AdamMoments, adam_settings, check_moments
from .._export.pretrained_folder import DCP_HINT, is_dcp_folder, weight_files, without_weights
from ..store._format import shallow_json_loads
from .capture import device_failure
from .data import host_array
from .layers import tied_first_names

_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
# what torch.nn.DataParallel / DistributedDataParallel and torch.compile prepend to the model's names
_PREFIXES = ("module.", "_orig_mod.")
# the last part of the name nn.Module.state_dict gives a module's get_extra_state()
_EXTRA = "_extra_state"


def parse_checkpoints(checkpoints: Any, model: torch.nn.Module | None = None) -> list[Checkpoint]:
    """Checkpoints from a sequence of (state_dict or path, learning_rate[, optimizer_state]) entries
    (see tracin._export.checkpoints); an optimizer state needs the `model` (its parameter order)."""

    def optimizer(state: Any, index: int) -> OptimizerState:
        if model is None:
            raise TypeError(f"checkpoints[{index}][2]: an optimizer state needs the model to map it to parameters")
        return OptimizerState(state, index, model)

    _refuse_trainer_folder_without_rate(checkpoints)
    parsed = shared_parse(
        checkpoints,
        "state_dict or a path",
        accepts=lambda s: isinstance(s, (str, os.PathLike, Mapping)),
        optimizer=optimizer,
    )
    for index, entry in enumerate(parsed):
        if isinstance(entry.source, (str, os.PathLike)):
            check_whole(entry.source, f"checkpoints[{index}] ({describe(entry.source, index)})")
            if entry.optimizer is not None:
                entry.optimizer.global_step = _global_step(entry.source)
    refuse_live_weights(parsed, model)
    snapshots = _Snapshots(parsed)
    for entry in parsed:
        if entry.optimizer is not None:
            entry.optimizer.snapshots = snapshots
    return parsed


def _refuse_trainer_folder_without_rate(checkpoints: Any) -> None:
    """TypeError when an entry of `checkpoints` is a transformers Trainer's checkpoint-N folder (one
    holding trainer_state.json) given without a learning rate (the bare path, a 1-tuple, or None as
    the rate): tracin reads no rate from the folder, so the error names the one its trainer_state.json
    logged at the folder's global_step, where it did, for the user to pass. Other entries are left to
    the shared parser's messages, and so is one (folder, rate[, state]) entry not wrapped in a list (the
    folder then has its rate: the parser's "this looks like one pair itself ... pass a list")."""
    if isinstance(checkpoints, (str, bytes, os.PathLike, Mapping)) or not isinstance(checkpoints, Sequence):
        return
    if len(checkpoints) in (2, 3) and isinstance(checkpoints[0], (str, os.PathLike)) and _is_rate(checkpoints[1]):
        return
    for i, entry in enumerate(checkpoints):
        if isinstance(entry, (str, os.PathLike)):
            folder, how = entry, "a bare path"
        elif isinstance(entry, (tuple, list)) and len(entry) == 1 and isinstance(entry[0], (str, os.PathLike)):
            folder, how = entry[0], "a tuple of one path"
        elif (
            isinstance(entry, (tuple, list))
            and len(entry) in (2, 3)
            and isinstance(entry[0], (str, os.PathLike))
            and entry[1] is None
        ):
            folder, how = entry[0], "None as its learning rate"
        else:
            continue
        if _global_step(folder) is None:
            continue
        step, rate, logs_rates = _logged_rate(folder)
        logged = (
            f"its trainer_state.json logged learning_rate {rate:.6g} at step {step}, the rate of that step "
            "(transformers before 4.51 logged the next step's rate there: recompute the schedule then)"
            if rate is not None
            else f"its trainer_state.json logged no learning_rate at step {step} ("
            + (
                "logging_steps does not divide save_steps"
                if logs_rates
                else "its log_history holds no learning_rate at any step"
            )
            + "): recompute the schedule (TrainingArguments' learning_rate, lr_scheduler_type, warmup) at that step"
        )
        raise TypeError(
            f"checkpoints[{i}] is a Trainer checkpoint folder ({describe(folder, i)}) given as {how}: tracin "
            "reads no learning rate from a Trainer folder; give (folder, learning_rate) or, for "
            'preconditioner="adam", (folder, learning_rate, folder) for its optimizer.pt; '
            + logged
            + ". Not the optimizer state's param_groups lr: that is the next step's (0 at the end of a linear "
            "or cosine schedule)"
        )


def _logged_rate(folder: str | os.PathLike) -> tuple[int | None, float | None, bool]:
    """(global_step, the learning_rate trainer_state.json's log_history records at that step or None,
    whether its log_history records a learning_rate at any step: if not, that the logging steps missed
    this one is no explanation)."""
    step = _global_step(folder)
    try:
        with open(os.path.join(folder, _TRAINER_STATE), encoding="utf-8") as f:
            history = json.load(f).get("log_history")
    except (OSError, ValueError, AttributeError):
        return step, None, False
    logs_rates = False
    for record in history if isinstance(history, list) else []:
        if not isinstance(record, Mapping):
            continue
        rate = record.get("learning_rate")
        usable = isinstance(rate, (int, float)) and not isinstance(rate, bool) and math.isfinite(rate)
        logs_rates = logs_rates or usable
        if usable and record.get("step") == step:
            return step, float(rate), True
    return step, None, logs_rates


class _Snapshots:
    """The checkpoints whose in-memory optimizer states are checked, once, to be snapshots (see
    refuse_live_states) when a preconditioner first uses one (OptimizerState.digest, .moments)."""

    def __init__(self, entries: Sequence[Checkpoint]):
        self.entries, self.checked = entries, False

    def check(self) -> None:
        if not self.checked:
            refuse_live_states(self.entries)
            self.checked = True


def refuse_live_weights(entries: Sequence[Checkpoint], model: torch.nn.Module | None) -> None:
    """ValueError when two in-memory checkpoints, not one state_dict object, hold the very same tensor
    (one storage, one start) for a trainable parameter of `model` (any floating tensor without a model):
    `model.state_dict()` appended during training without a copy, whose tensors are views of the live
    parameters, which every later step updates in place, so each such checkpoint holds the final
    weights. One entry that is the model's current state_dict is taken, as are tensors shared by
    checkpoints that the model does not train (a frozen base's, buffers), one state_dict object listed
    twice on purpose (as refuse_live_states takes it) and entries that are paths."""
    trainable = None if model is None else {n for n, p in model.named_parameters() if p.requires_grad}
    reference = None if model is None else model.state_dict()
    owners: dict[tuple, tuple[int, str]] = {}
    for j, entry in enumerate(entries):
        if not isinstance(entry.source, Mapping):
            continue
        if any(entries[i].source is entry.source for i in range(j)):
            continue  # the same weights listed twice on purpose (other learning rates or optimizer states)
        try:
            state = _unwrap(entry.source, f"checkpoints[{j}]")
        except ValueError:
            continue  # refused with its name when it is loaded
        if reference is not None:
            state = _strip_prefix(state, reference)
        for key, t in state.items():
            trained = t.is_floating_point() if trainable is None else key in trainable
            where = _storage_key(t) if isinstance(t, torch.Tensor) and trained else None
            if where is None:
                continue
            i, _ = owners.setdefault((*where, t.data_ptr()), (j, key))
            if i != j:
                refuse_live_states(entries)  # live optimizer states too: said with the weights
                raise ValueError(
                    f"checkpoints[{i}] and checkpoints[{j}] (in-memory state_dicts) hold the very same tensor for "
                    f"{key}, a parameter the model trains, so they cannot be weights of two points of training. "
                    "If they were saved as model.state_dict() during training (without a copy), their tensors are "
                    "views of the model's live parameters, which every later step updates in place, so each holds "
                    "the final weights: save {k: v.detach().clone() for k, v in model.state_dict().items()} (or "
                    "copy.deepcopy(model.state_dict()), or torch.save it and pass the path) with each checkpoint. "
                    "The model's current model.state_dict() may be given as one checkpoint (the last)"
                )


def refuse_live_states(entries: Sequence[Checkpoint]) -> None:
    """ValueError when the in-memory optimizer states of two checkpoints hold the very same tensors
    (one storage) while the checkpoints are not the same weights: `optimizer.state_dict()` saved
    without copy.deepcopy, whose exp_avg, exp_avg_sq and step are the optimizer's live tensors, which
    every later step updates in place; each such checkpoint then carries the state after the last
    step. Taken: one state object given for several checkpoints (deliberately the same state), and
    states sharing tensors whose checkpoints give the very same weights (the same state_dict object or
    path, listed twice with other learning rates). Distinct states are not compared by value: two
    snapshots at the same step count (checkpoints of two runs) are taken."""
    owners: dict[tuple, tuple[int, Any]] = {}
    for j, entry in enumerate(entries):
        state = None if entry.optimizer is None else entry.optimizer.source
        if not isinstance(state, Mapping):
            continue
        for what, entry_key, t in _state_tensors(state):
            key = _storage_key(t)
            if key is None:
                continue
            i, first_key = owners.setdefault(key, (j, entry_key))
            first = entries[i]
            if i == j or first.optimizer.source is state or _same_weights(first.source, entry.source):
                continue
            steps = [_step_of(first.optimizer.source, first_key), _step_of(state, entry_key)]
            held = "" if None in steps else f" (both hold step {steps[0]:g} now)" if steps[0] == steps[1] else ""
            weights = (
                " Their weights share tensors too: clone each checkpoint's weights as well "
                "({k: v.detach().clone() for k, v in model.state_dict().items()})."
                if isinstance(first.source, Mapping)
                and isinstance(entry.source, Mapping)
                and _storages(first.source.values()) & _storages(entry.source.values())
                else ""
            )
            raise ValueError(
                f"checkpoints[{i}][2] and checkpoints[{j}][2] (optimizer states) hold the very same tensor ({what}) "
                f"while checkpoints[{i}] and checkpoints[{j}] are not one weights object or path. If these states "
                "were saved as optimizer.state_dict() during training, they are the optimizer's live tensors, which "
                f"every later step updates in place, so each of these checkpoints carries the state after the last "
                f"step{held}, not its own: save copy.deepcopy(optimizer.state_dict()) with each checkpoint (or "
                "torch.save it to a file and pass the path). To give one state to several checkpoints on purpose, "
                f"pass the same object each time.{weights}"
            )


def _state_tensors(state: Mapping) -> list[tuple[str, Any, torch.Tensor]]:
    """(what, key, tensor) for every tensor of an optimizer state's per-parameter entries, the moments
    before the step count; what names the tensor ('exp_avg_sq of parameter 0.weight' by the recorded
    param_names, else 'exp_avg_sq of the state's entry 0') and key its entry."""
    groups = [g for g in state.get("param_groups") or () if isinstance(g, Mapping)]
    names = {k: n for g in groups for k, n in zip(g.get("params", ()), g.get("param_names", ()), strict=False)}
    out = []
    for key, entry in state["state"].items():
        if isinstance(entry, Mapping):
            label = f"parameter {names[key]}" if key in names else f"the state's entry {key!r}"
            fields = sorted(entry, key=lambda f: (f == "step", str(f)))  # exp_avg, exp_avg_sq, ..., step
            out += [(f"{f} of {label}", key, entry[f]) for f in fields if isinstance(entry[f], torch.Tensor)]
    return out


def _storage_key(t: torch.Tensor) -> tuple | None:
    """Where a tensor's data is (device, storage address), None when it holds none."""
    if t.device.type == "meta" or not t.numel():
        return None
    try:
        storage = t.untyped_storage()
    except (NotImplementedError, RuntimeError):  # a tensor subclass without one
        return None
    return (str(t.device), storage.data_ptr()) if storage.nbytes() else None


def _storages(values: Any) -> set[tuple]:
    keys = {_storage_key(t) for t in values if isinstance(t, torch.Tensor)}
    return keys - {None}


def _same_weights(a: Any, b: Any) -> bool:
    """Whether two checkpoint sources are the very same weights: one object, or one path."""
    if a is b:
        return True
    if isinstance(a, (str, os.PathLike)) and isinstance(b, (str, os.PathLike)):
        return os.path.realpath(a) == os.path.realpath(b)
    return False


def _step_of(state: Mapping, key: Any) -> float | None:
    """The step count of the state's entry `key`, None when it has no single one."""
    entry = state["state"].get(key)
    step = entry.get("step") if isinstance(entry, Mapping) else None
    if isinstance(step, torch.Tensor):
        return float(step) if step.numel() == 1 else None
    return float(step) if isinstance(step, (int, float)) else None


_TRAINER_STATE = "trainer_state.json"  # a transformers Trainer's checkpoint-N/trainer_state.json


def _global_step(folder: str | os.PathLike) -> int | None:
    """The global_step recorded in a checkpoint folder's trainer_state.json (a transformers Trainer's
    checkpoint-N: the optimizer steps taken to its weights); None without one or without an integer."""
    path = os.path.join(folder, _TRAINER_STATE)
    if not os.path.isdir(folder) or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            step = json.load(f).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def check_whole(path: str | os.PathLike, name: str) -> None:
    """ValueError naming checkpoint `name` and the file when a checkpoint file, or a weight file of a
    save_pretrained folder, is cut short or damaged (before any checkpoint is exported): a torch.save
    zip archive without its central directory or with a record that fails its CRC-32 (_zip_damaged: one
    read of the archive), a safetensors file shorter than its header says. A missing file is left to
    the digest's error; other damage to the loader's. A folder without weight files is refused here, from
    its file names, before the export's digest reads every file under it (a training run's directory)."""
    if os.path.isdir(path):
        found = weight_files(path, name)
        if found is None:
            raise without_weights(path, name)
        files = [(os.path.join(path, f), found.safetensors) for f in found.files]
    else:
        files = [(os.fspath(path), None)] if os.path.isfile(path) else []  # its format: told by its first bytes
    for file, safe in files:
        with _open_regular(file, name, f"{name}: no file") as f:
            size = os.fstat(f.fileno()).st_size
            if safe is None:
                safe = _safetensors_head(f.read(9))
                f.seek(0)
            problem = _safetensors_short(f, size) if safe else _zip_short(f, size)
        if safe and not problem and importlib.util.find_spec("safetensors") is None:  # before any checkpoint is read
            raise ImportError(f"{_cannot_read(name, file)}: {_NO_SAFETENSORS}")
        if problem:
            raise ValueError(f"{_cannot_read(name, file)}: {problem}")


def _zip_short(f: BinaryIO, size: int) -> str | None:
    """What is wrong with a torch.save file (open `f` of `size` bytes) under 4 bytes, or a zip archive
    whose central directory cannot be read or whose records fail their CRC (None when it is whole, or
    the file is not a zip archive: the legacy format, which has no such check)."""
    if size < 4:  # no torch.save file, zip or legacy, is this short: a failed copy, a full disk
        return f"a file of {size} bytes, empty or cut short"
    if f.read(4) != b"PK\x03\x04":
        return None
    try:
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"a torch.save zip archive without a readable central directory, cut short or damaged ({e})"
    with archive:
        return _zip_damaged(archive)


def _zip_damaged(archive: zipfile.ZipFile) -> str | None:
    """What is wrong with a record of a torch.save zip archive whose bytes do not match its CRC-32 (None
    when all do): torch.load checks none, so a bit-rotted weight would load silently. Read in one pass
    (100 MB in about 0.1 s). A record whose CRC is 0 is skipped: torch writes 0 for every record after
    torch.serialization.set_crc32_options(False)."""
    for info in archive.infolist():
        if info.CRC == 0 or info.is_dir():
            continue
        try:
            with archive.open(info) as record:
                while record.read(1 << 22):
                    pass
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, zlib.error) as e:
            return f"a torch.save zip archive whose record {info.filename!r} is damaged ({e}): bit rot or a bad copy"
    return None


def _safetensors_short(f: BinaryIO, size: int) -> str | None:
    """What is wrong with a safetensors file (open `f` of `size` bytes) whose header cannot be read or
    whose size is less than its header's tensors need (None when it is not)."""
    head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
    if n is None or 8 + n > size:
        return f"a safetensors file of {size} bytes, shorter than its header: cut short"
    try:
        header = shallow_json_loads(f.read(n).decode("utf-8"))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError, OverflowError) as e:
        return f"a safetensors file whose header cannot be read ({e})"
    if 8 + n + end > size:
        return f"a safetensors file of {size} bytes whose header lists tensors up to byte {8 + n + end}: cut short"
    return None


class OptimizerState:
    """A torch.optim.Adam / AdamW `optimizer.state_dict()` (or the path of a file holding one, read
    with torch.load(weights_only=True)) saved with checkpoint `index`.

    Parameters are identified by the "param_names" of the param_groups when the optimizer recorded
    them (torch >= 2.6 with named parameters: `AdamW(model.named_parameters())`, or groups of
    named parameters), or by its params where they are the names themselves (a state keyed by
    parameter name: torch.distributed.checkpoint.state_dict.get_optimizer_state_dict, as DCP and FSDP2
    save it), else by position, which is only taken from a single param group: the
    optimizer must have been built over the model's parameters in `model.named_parameters()` order
    (`Adam(model.parameters())`), all of them or the trainable ones. Every position's exp_avg and
    exp_avg_sq are checked to have the shape of the model's parameter there (a ValueError names the
    first that differs: an optimizer built over another order), which cannot reveal an order that only
    permutes parameters of equal shapes (two LayerNorms' weights swapped): those take each other's
    moments silently. Several unnamed param groups holding parameters (a weight-decay split, per-layer
    learning rates; an empty group is not counted) are refused, their order unknown (the refusal says
    how to add the names to a saved state), except a transformers Trainer's (_trainer_split: two groups
    of one learning rate, the second not decayed, the state file beside trainer_state.json): the
    trainable parameters the installed Trainer decays, then the rest, each in model.named_parameters()
    order, taken when the group sizes and every position's moment shapes fit.
    Recorded names may carry the prefixes DataParallel and torch.compile add ("module.", "_orig_mod.");
    a name under another prefix (a LightningModule's "model.") is refused, naming the prefix to drop.
    betas and eps come from each parameter's group, the step count from its state. States whose steps
    are not Adam's (amsgrad, maximize, RAdam, NAdam), states of other moments (Adamax's exp_inf,
    bitsandbytes' state1 / state2, named in the message), params mixing names with ids, and chosen
    parameters in groups of different learning rates are refused.

    An in-memory state must be a snapshot, copy.deepcopy(optimizer.state_dict()) taken with its
    checkpoint: states of other checkpoints holding the very same tensors (the optimizer's live ones,
    saved without the copy) are refused when a preconditioner uses them (refuse_live_states).

    A general checkpoint (a dict, or the path of its torch.save file, holding the state under
    "optimizer", "optimizer_state_dict" or "optim" beside the model's weights, or as the one entry of
    a Lightning checkpoint's "optimizer_states"; of several, the message says to pass one) gives that state.

    A folder given as the path is a checkpoint folder holding the state as optimizer.pt (the layout of
    a transformers Trainer's checkpoint-N, whose folder may be the checkpoint's weights too): that file
    is read; a folder without one is a ValueError naming it. When the checkpoint's weights are a folder
    whose trainer_state.json records its global_step (parse_checkpoints sets `global_step`), a state
    whose step count exceeds it (a later checkpoint's) is refused, and one below it is warned about
    (a mixed-precision run skips the optimizer's step on overflowing gradients).
    """

    def __init__(self, source: Any, index: int, model: torch.nn.Module):
        self.where = f"checkpoints[{index}][2] (optimizer state)"
        if not isinstance(source, (str, os.PathLike, Mapping)):
            raise TypeError(f"{self.where} must be an optimizer.state_dict() or its path, got {type(source).__name__}")
        if isinstance(source, Mapping):
            source = _nested_optimizer(source)  # torch.load of a general checkpoint, as a file of one is read
            _check_optimizer_dict(source, self.where)
        else:
            source = _state_file(source, self.where)
            check_whole(source, self.where)
        self.source = source
        self.snapshots: _Snapshots | None = None  # set by parse_checkpoints
        self.stat: FileStat | None = None  # the file's, taken before its digest: compared once it is read
        named = list(model.named_parameters())
        self.shapes = {n: tuple(p.shape) for n, p in named}
        self.all_names = [n for n, _ in named]
        self.trainable_names = [n for n, p in named if p.requires_grad]
        self.frozen = {n for n, p in named if not p.requires_grad}
        self.model = model  # for a Trainer's decay / no-decay split (_trainer_split)
        self.global_step: int | None = None  # of the checkpoint's weights, where recorded (parse_checkpoints)

    def digest(self) -> str:
        """Fingerprint: a file's bytes, or the tensors and settings of the in-memory state."""
        if self.snapshots is not None:
            self.snapshots.check()
        if isinstance(self.source, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(self.source))
            if not os.path.exists(path):
                raise FileNotFoundError(f"{self.where}: no optimizer state at {path}")
            self.stat = FileStat.of(path, os.stat(path))
            return digest_path(path, self.where)  # ValueError naming it for a FIFO (whose torch.load would hang)
        return digest_arrays(_leaves(self.source))

    def moments(self, params: Sequence[tuple[str, Sequence[int]]]) -> list[AdamMoments]:
        """The Adam moments of `params` ((name, shape) in row order), on the host. ValueError for a
        frozen parameter, a state that is not plain Adam / AdamW (_not_adam), or parameters whose
        groups have different learning rates (the row has one weight, the checkpoint's), and for
        in-memory states that are the optimizer's live tensors (refuse_live_states)."""
        if self.snapshots is not None:
            self.snapshots.check()
        state = self._load()
        self._check_step(state)
        owner, by_position = self._owners(state)
        if not by_position:
            self._check_named(state["state"], owner, params)
        moments, rates = [], {}
        for name, shape in params:
            key, group = owner.get(name, (None, None))
            entry = state["state"].get(key, state["state"].get(str(key)))
            has_state = _adam_entry(entry)
            if name in self.frozen and not has_state:
                raise ValueError(
                    f"{self.located}: parameter {name} is frozen (requires_grad=False) and the optimizer holds no "
                    "state for it; leave it out of layers= (mode='factored' and 'last_layer' take a layer's weight "
                    "and bias together: export such a layer with mode='full' and layers= naming its trainable "
                    "parameters)"
                )
            if group is None:
                raise ValueError(
                    f"{self.located}: parameter {name} is in none of the optimizer's param_groups"
                    + _named_otherwise(name, state["param_groups"], by_position, self.all_names)
                )
            if not has_state and any(_adam_entry(e) for e in state["state"].values()):
                raise ValueError(
                    f"{self.located}: no Adam state (exp_avg, exp_avg_sq) for parameter {name}, while the optimizer "
                    "holds some for other parameters: it never received a gradient in training (a module the "
                    "training did not use); leave it out of layers="
                )
            if not has_state and isinstance(entry, Mapping) and entry:  # another optimizer's moments
                raise ValueError(
                    f"{self.located}: the state of parameter {name} holds {', '.join(sorted(map(str, entry)))}, "
                    f"not Adam's exp_avg and exp_avg_sq: {_other_moments(entry)}"
                )
            if not has_state:
                raise ValueError(
                    f"{self.located}: no Adam state (exp_avg, exp_avg_sq) for parameter {name}: "
                    "an Adam / AdamW optimizer that has taken at least one step is needed"
                )
            other = _not_adam(group, entry)
            if other:
                raise ValueError(
                    f"{self.located}: parameter {name} was trained with {other}; the preconditioner follows plain "
                    f"Adam / AdamW steps and does not take it as one: {_NOT_ADAM_WAY_OUT}"
                )
            if "lr" in group:  # a tensor lr and its float are one rate: equal to 1e-6 relative
                lr = float(group["lr"])
                rates.setdefault(next((r for r in rates if math.isclose(r, lr, rel_tol=1e-6)), lr), []).append(name)
            step = float(entry.get("step", 0))
            m, v = (_float_array(entry[k], f"{name}'s {k}", self.located) for k in ("exp_avg", "exp_avg_sq"))
            check_moments(name, shape, m, v, step, self.located, _BY_POSITION if by_position else "")
            b1, b2 = (float(b) for b in group["betas"])
            sparse = "maximize" in group and "weight_decay" not in group and "amsgrad" not in group
            moments.append(AdamMoments(m.reshape(-1), v.reshape(-1), step, b1, b2, float(group["eps"]), sparse))
        if moments and not any(a.m.any() or a.v.any() for a in moments) and _all_zero(state["state"]):
            raise ValueError(
                f"{self.located}: every Adam moment (exp_avg, exp_avg_sq) of every parameter is 0 (step "
                f"{moments[0].step:g}): no gradient ever reached this optimizer, so preconditioner='adam' would divide "
                "every gradient by eps. torch.distributed.checkpoint.state_dict.get_optimizer_state_dict gives this "
                "for an optimizer that has not stepped (it initialises the state by a zero-gradient step): a state "
                "saved before the first training step, or a fresh optimizer's state that nothing was loaded into (a "
                "DCP checkpoint saved without the optimizer). Pass the state saved with these weights after training "
                "steps, or leave this checkpoint out"
            )
        if len(rates) > 1:
            listed = "; ".join(f"lr {lr!r}: {_few(names)}" for lr, names in rates.items())
            raise ValueError(
                f"{self.located}: the chosen parameters are in param groups of different learning rates ({listed}); "
                "a row is weighted by one rate, the checkpoint's. Export each group's parameters apart "
                "(layers=...) with its own learning rate and add their scores"
            )
        return moments

    def _load(self) -> Mapping:
        if not isinstance(self.source, (str, os.PathLike)):
            return self.source
        state = _read_file(self.source, "cpu", self.where, f"{self.where}: no optimizer state")
        if self.stat is not None and self.stat.again() != self.stat:  # a re-save since the digest
            raise ValueError(
                f"{self.where} ({self.stat.path}) changed while it was exported (its size, modification time or "
                "inode differ from when it was fingerprinted): the rows would not be those of the fingerprinted "
                "optimizer state; export again"
            )
        state = _nested_optimizer(state)
        _check_optimizer_dict(state, self.located)
        return state

    def _check_step(self, state: Mapping) -> None:
        """ValueError when the state's largest step count exceeds the global_step of its checkpoint's
        weights (another, later checkpoint's state); a UserWarning when it is below it."""
        steps = [_real(e.get("step")) for e in state["state"].values() if isinstance(e, Mapping)]
        steps = [s for s in steps if s is not None]
        if self.global_step is None or not steps:
            return
        step = max(steps)
        said = f"{self.located} has taken {step:g} steps, while its checkpoint's {_TRAINER_STATE} records global_step "
        if step > self.global_step:
            raise ValueError(
                f"{said}{self.global_step}: a state saved after those weights, another checkpoint's (pass each "
                "checkpoint's own optimizer.pt)"
            )
        if step < self.global_step:
            warnings.warn(
                f"{said}{self.global_step}: fewer, as when mixed-precision training skipped steps on overflowing "
                "gradients, or another, earlier checkpoint's state; check that it is this checkpoint's",
                stacklevel=3,
            )

    @property
    def located(self) -> str:
        """`where`, with the file's absolute path when the state was given as one (messages about its contents)."""
        if isinstance(self.source, (str, os.PathLike)):
            return f"{self.where} ({os.path.abspath(self.source)})"
        return self.where

    def _owners(self, state: Mapping) -> tuple[dict[str, tuple[Any, Mapping]], bool]:
        """parameter name -> (its key in state["state"], its param group); and whether the names
        were given by position (the optimizer recorded none), every position's moments then checked
        to have its parameter's shape (_check_positions)."""
        # an empty group (the no-decay group of a model without biases) has no order to check
        groups = [g for g in state["param_groups"] if g["params"]] or state["param_groups"][:1]
        keys = [(k, g) for g in groups for k in g["params"]]
        _check_keys(groups, self.located, self.all_names)
        digits = _digit_names(groups, self.all_names)
        recorded = [_recorded_names(g, digits) for g in groups]
        if all(r is not None for r in recorded):
            known = set(self.all_names)
            names = [_strip(n, known) for r in recorded for n in r]
            return dict(zip(names, keys, strict=True)), False
        if len(groups) > 1:
            split = self._trainer_split(state, [k for k, _ in keys])
            if isinstance(split, list):
                return dict(zip(split, keys, strict=True)), True
            raise ValueError(
                f"{self.located} has {len(groups)} param groups and no parameter names (param_names): "
                f"its parameters would be matched by position, and the order of several groups cannot be checked"
                f"{_NAMED_HINT}; or name the parameters of a saved state: load it (torch.load) and give each "
                "param group 'param_names', the names of its 'params' in their order. A transformers Trainer's "
                "optimizer.pt holds its decay / no-decay split: decay = set(trainer.get_decay_parameter_names("
                "model)); names = [n for n, p in model.named_parameters() if p.requires_grad]; "
                "state['param_groups'][0]['param_names'] = [n for n in names if n in decay]; "
                "state['param_groups'][1]['param_names'] = [n for n in names if n not in decay]"
                + (f". Read as a Trainer's split it does not fit: {split}" if split else "")
            )
        names = next((n for n in (self.all_names, self.trainable_names) if len(n) == len(keys)), None)
        if names is None:
            raise ValueError(self._counts_differ(state["state"], [k for k, _ in keys]))
        self._check_positions(state["state"], names, [k for k, _ in keys])
        return dict(zip(names, keys, strict=True)), True

    def _counts_differ(self, entries: Mapping, keys: Sequence[Any]) -> str:
        """Why an unnamed state of another parameter count than the model's cannot be matched by position:
        when every moment shape it holds is one of the model's (an optimizer over some of its parameters),
        the missing names; else that its parameters are not the model's, naming the first position whose
        moments have another shape than the model's parameter there and a shape the model has none of."""
        head = (
            f"{self.located} holds {_parameters(len(keys))}, the model has {len(self.all_names)} "
            f"({len(self.trainable_names)} trainable)"
        )
        held = []  # (position, the exp_avg's shape) of the positions holding Adam moments
        for position, key in enumerate(keys):
            entry = entries.get(key, entries.get(str(key)))
            shape = getattr(entry["exp_avg"], "shape", None) if _adam_entry(entry) else None
            if shape is not None:
                held.append((position, tuple(shape)))
        model = list(self.shapes.values())
        left = list(model)
        foreign = None  # a shape the state holds more often than the model has it
        for position, shape in held:
            if shape in left:
                left.remove(shape)
            elif foreign is None:
                foreign = (position, shape)
        if foreign is None:
            return head + _BY_POSITION
        # compared with the model's parameters in order, or with its trainable ones (the optimizer of a partly
        # frozen model holds those): whichever the state fits the longer, the trainable ones on a tie
        orders = [(self.trainable_names, "the order of the model's trainable parameters, requires_grad=True")]
        if len(self.trainable_names) == len(self.all_names):
            orders = []
        orders.append((self.all_names, "model.named_parameters() order"))

        def first_misfit(names: list[str]) -> tuple[int, tuple]:
            return next(((p, s) for p, s in held if p >= len(names) or s != self.shapes[names[p]]), held[-1])

        names, order = max(orders, key=lambda o: first_misfit(o[0])[0])
        position, shape = first_misfit(names)
        there = (
            f"the model's {names[position]} has shape {self.shapes[names[position]]}"
            if position < len(names)
            else f"the model has no parameter there (it has {len(names)})"
        )
        lacking = (
            "of a shape none of the model's parameters has"
            if foreign[1] not in model
            else "of a shape the model has fewer parameters of"
        )
        also = "" if foreign[0] == position else f"; its position {foreign[0]} holds moments of shape {foreign[1]}"
        return (
            f"{head}: the state's parameters do not match the model's, whatever their names: at position "
            f"{position} (in {order}) {there}, while the state's exp_avg there has shape "
            f"{shape}{also} ({lacking}). The state is not this model's: another model's (another depth, width or "
            "vocabulary), or one saved before a parameter was resized (resize_token_embeddings); pass the optimizer "
            "state saved with these weights, or export with preconditioner=None (plain TracIn) without the state"
        )

    def _check_named(
        self, entries: Mapping, owner: Mapping[str, tuple[Any, Mapping]], params: Sequence[tuple[str, Sequence[int]]]
    ) -> None:
        """ValueError calling a named state (param_names) another model's where it names parameters the model
        has none of and the moments of one of `params` ((name, shape) in row order) have another shape than
        the parameter: another depth, width or vocabulary, not a state to match by other names. A state of the
        model's own names keeps the per-parameter shape message (check_moments)."""
        foreign = [n for n in owner if n not in self.shapes]
        if not foreign:
            return
        for name, shape in params:
            key, _ = owner.get(name, (None, None))
            entry = entries.get(key, entries.get(str(key)))
            if not _adam_entry(entry):
                continue
            held = getattr(entry["exp_avg"], "shape", None)
            if held is None or tuple(held) == tuple(shape):
                continue
            raise ValueError(
                f"{self.located} holds {_parameters(len(owner))}, the model has {len(self.all_names)} "
                f"({len(self.trainable_names)} trainable): the state's parameters are not the model's: it names "
                f"{_few(foreign)}, which the model has none of, and its exp_avg of {name} has shape {tuple(held)} "
                f"where the model's {name} has {tuple(shape)}. The state is not this model's: another model's "
                "(another depth, width or vocabulary), or one saved before a parameter was resized "
                "(resize_token_embeddings); pass the optimizer state saved with these weights, or export with "
                "preconditioner=None (plain TracIn) without the state"
            )

    def _trainer_split(self, state: Mapping, keys: Sequence[Any]) -> list[str] | str | None:
        """The parameter names of a transformers Trainer's two unnamed groups (Trainer.create_optimizer:
        the trainable parameters in Trainer.get_decay_parameter_names, then the others, each in
        model.named_parameters() order), when the state file lies beside trainer_state.json (a Trainer's
        checkpoint-N: another optimizer's two groups may fit the sizes and shapes with parameters of one
        shape permuted); else None, or why the state does not fit that split (the groups' learning rates
        or no-decay group's weight_decay, group sizes, or a position whose moments have another shape)."""
        groups = state["param_groups"]
        beside = isinstance(self.source, (str, os.PathLike)) and os.path.isfile(
            os.path.join(os.path.dirname(os.path.abspath(self.source)), _TRAINER_STATE)
        )
        if len(groups) != 2 or not beside:
            return None
        rates = [g.get("lr") for g in groups]
        if rates[0] != rates[1] or groups[1].get("weight_decay") != 0.0:
            return (
                f"its groups have learning rates {rates[0]} and {rates[1]} and the second weight_decay "
                f"{groups[1].get('weight_decay')}, while a Trainer's share one rate and do not decay the second"
            )
        try:
            from transformers import Trainer

            # an instance method that reads nothing of the instance: the decay set of the installed version
            decay = set(Trainer.get_decay_parameter_names(None, self.model))
        except (ImportError, AttributeError, TypeError, RuntimeError) as e:  # transformers 4.x: a RuntimeError
            return f"the installed transformers does not give its Trainer's decay set ({type(e).__name__}: {e})"
        names = [n for n in self.trainable_names if n in decay], [n for n in self.trainable_names if n not in decay]
        sizes = tuple(len(g["params"]) for g in groups)
        if sizes != tuple(map(len, names)):
            return (
                f"its groups hold {sizes[0]} and {sizes[1]} parameters, while the Trainer puts {len(names[0])} of "
                f"this model's trainable parameters in the decay group and {len(names[1])} in the other"
            )
        ordered = names[0] + names[1]
        misfit = self._misfit(state["state"], ordered, keys)
        if misfit is not None:
            position, moment, shape = misfit
            group = "decay" if position < len(names[0]) else "no-decay"
            name = ordered[position]
            return (
                f"position {position} ({group} group) is {name} of shape {self.shapes[name]}, while the "
                f"optimizer's {moment} there has shape {shape}"
            )
        return ordered

    def _misfit(self, entries: Mapping, names: Sequence[str], keys: Sequence[Any]) -> tuple[int, str, tuple] | None:
        """(position, moment, its shape) of the first position whose exp_avg or exp_avg_sq has another
        shape than the model's parameter named there; None when all fit (positions without Adam state
        skipped)."""
        for position, (name, key) in enumerate(zip(names, keys, strict=True)):
            entry = entries.get(key, entries.get(str(key)))
            if not _adam_entry(entry):
                continue
            for moment in ("exp_avg", "exp_avg_sq"):
                shape = getattr(entry[moment], "shape", None)
                if shape is not None and tuple(shape) != self.shapes[name]:
                    return position, moment, tuple(shape)
        return None

    def _check_positions(self, entries: Mapping, names: Sequence[str], keys: Sequence[Any]) -> None:
        """ValueError naming the first position whose exp_avg or exp_avg_sq has another shape than the
        model's parameter at that position (an optimizer built over the parameters in another order),
        read from the tensors' shapes alone; positions without Adam state are skipped. A permutation of
        parameters of one shape passes: it cannot be told from the state."""
        misfit = self._misfit(entries, names, keys)
        if misfit is None:
            return
        position, moment, shape = misfit
        name = names[position]
        alike = [n for n in names if self.shapes[n] == tuple(shape)]
        held, cause = (
            (
                f"the shape of the model's {_few(alike)}",
                f"The optimizer was built over the parameters in another order{_NAMED_HINT}",
            )
            if alike
            else (
                "the shape of none of the model's parameters",
                "The state is not this model's: another model's (another width or vocabulary), or one saved "
                "before a parameter was resized (resize_token_embeddings)",
            )
        )
        counted = _parameters(len(names))
        if names is not self.all_names:
            counted = counted.replace(" ", " trainable ", 1)
        raise ValueError(
            f"{self.located}: without parameter names (param_names) its parameters are matched by position "
            f"in model.named_parameters() order ({counted}), and position "
            f"{position} does not fit: the model's parameter there is {name} of shape {self.shapes[name]}, "
            f"while the optimizer's {moment} there has shape {tuple(shape)} ({held}). {cause}"
        )


_STATE_FILE = "optimizer.pt"  # a transformers Trainer's checkpoint-N/optimizer.pt


def _state_file(path: str | os.PathLike, where: str) -> str | os.PathLike:
    """The optimizer state file of `path`: itself, or for a folder the optimizer.pt inside it
    (ValueError naming the folder when it holds none)."""
    if not os.path.isdir(path):
        return path
    inside = os.path.join(path, _STATE_FILE)
    if not os.path.isfile(inside):
        raise ValueError(
            f"{where} is a folder ({os.path.abspath(path)}) without {_STATE_FILE}: pass the file holding the "
            "optimizer.state_dict() (torch.save), or a checkpoint folder holding it as optimizer.pt, as a "
            "transformers Trainer's checkpoint-N does"
            + (
                f". {DCP_HINT} (a DCP save without the optimizer's state holds none to read)"
                if is_dcp_folder(path)
                else ""
            )
        )
    return inside


_NAMED_HINT = (
    ". Build the optimizer over named parameters (torch >= 2.6: AdamW(model.named_parameters()), or "
    "groups of (name, parameter) pairs) so that its state_dict records them, or over a single group "
    "in model.parameters() order"
)
_BY_POSITION = f": without parameter names (param_names) its parameters are matched by position{_NAMED_HINT}"


def _float_array(t: Any, what: str, where: str) -> np.ndarray:
    """A floating tensor on the host as float32 or float64 NumPy (half types widened exactly)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{where}: {what} must be a floating-point tensor, got {type(t).__name__}")
    t = t.detach().cpu()
    return (t if t.dtype == torch.float64 else t.float()).numpy()


def _adam_entry(entry: Any) -> bool:
    return isinstance(entry, Mapping) and "exp_avg" in entry and "exp_avg_sq" in entry


def _all_zero(states: Mapping) -> bool:
    """Whether every Adam entry of an optimizer's state holds moments that are all 0 (none has seen a gradient)."""
    return all(
        not (torch.as_tensor(e["exp_avg"]).any() or torch.as_tensor(e["exp_avg_sq"]).any())
        for e in states.values()
        if _adam_entry(e)
    )


# keys torch.optim's own groups carry (one or more of them since torch 1.12) and others' do not
_TORCH_GROUP_KEYS = ("foreach", "maximize", "capturable", "differentiable", "decoupled_weight_decay")


def _other_moments(entry: Mapping) -> str:
    """What the state entry of an optimizer that is not Adam holds, and the ways out."""
    if "exp_inf" in entry:
        held = "torch.optim.Adamax's (exp_inf, an infinity norm, is not Adam's second moment)"
    elif "state1" in entry and getattr(entry["state1"], "dtype", None) == torch.uint8:
        held = (
            "bitsandbytes' 8-bit optimizer's (Adam8bit, optim='adamw_bnb_8bit'): state1 / state2 are quantized "
            "8-bit moments, not readable as Adam's"
        )
    elif "state1" in entry:
        held = "a bitsandbytes optimizer's (state1 / state2), not read as Adam's"
    else:
        held = "another optimizer's than Adam / AdamW"
    return (
        f"{held}. The preconditioner needs the state of a 32-bit torch.optim.Adam / AdamW (a transformers "
        "Trainer's optim='adamw_torch'); or export with preconditioner=None"
    )


# the next step after a refusal of an optimizer state the preconditioners do not read
_NOT_ADAM_WAY_OUT = (
    "export with preconditioner=None (plain TracIn, learning-rate weighted gradients) and checkpoints of "
    "(weights, learning_rate) without the optimizer state, or pass the state of a torch.optim.Adam / AdamW "
    "trained with amsgrad=False and maximize=False (whose steps preconditioner='adam' and 'adam_update' follow)"
)


# the keys of a torch.optim.Adam / AdamW state entry: one with others (transformers Adafactor's RMS) is not Adam's
_ADAM_ENTRY_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})


def _not_adam_type(state: Mapping, group: Mapping, where: str) -> str:
    """Why an optimizer state whose param group `group` lacks Adam's betas or eps is refused: another optimizer's
    (RMSprop, Adagrad, Adafactor, SGD: no exp_avg / exp_avg_sq moments, whatever eps it has; or moments so named
    beside keys Adam's entries have not, or a group with beta1: transformers' Adafactor(beta1=...)), or Adam's
    moments with a group that lost those settings; with what to do."""
    lacking = " and ".join(k for k in ("betas", "eps") if k not in group)
    entries = [e for e in state["state"].values() if isinstance(e, Mapping)]
    moments = bool(entries) and all(_adam_entry(e) for e in entries)
    if moments and "beta1" not in group and all(set(map(str, e)) <= _ADAM_ENTRY_KEYS for e in entries):
        return (
            f"{where} holds Adam's moments (exp_avg, exp_avg_sq) but a param group has no {lacking} "
            f"{_held_keys(group)}, which preconditioner='adam' and 'adam_update' read: pass the optimizer's "
            "state_dict() as it saved it (each group with its betas and eps), or " + _NOT_ADAM_WAY_OUT
        )
    held = sorted({str(k) for e in entries for k in e})
    listed = f"{', '.join(held[:6])}{f' and {len(held) - 6} more' if len(held) > 6 else ''}"
    if moments:
        extra = sorted({k for k in held if k not in _ADAM_ENTRY_KEYS})
        why = (
            f"its entries hold {listed}: moments named exp_avg / exp_avg_sq beside {', '.join(extra[:4])}, "
            "which Adam's have not,"
            if extra
            else f"its entries hold {listed}"
        )
        return (
            f"{where} is not the state of an Adam-type optimizer: {why} and its param group no {lacking} "
            f"{_held_keys(group)}: another optimizer's (transformers' Adafactor with beta1 keeps exp_avg / "
            "exp_avg_sq beside RMS), while the preconditioners read only Adam's exp_avg_sq with its betas: "
            + _NOT_ADAM_WAY_OUT
        )
    moments_text = f"its entries hold {listed}" if held else "it holds no per-parameter state"
    return (
        f"{where} is not the state of an Adam-type optimizer: it has no Adam moments exp_avg / exp_avg_sq "
        f"({moments_text}) and its param group no {lacking} {_held_keys(group)}: another optimizer's (RMSprop, "
        "Adagrad, Adafactor, SGD, ...), while the preconditioners read only Adam's exp_avg_sq with its betas: "
        + _NOT_ADAM_WAY_OUT
    )


def _held_keys(group: Mapping) -> str:
    """What a param group that is not Adam's holds: its settings' keys (an SGD's lr, momentum, ...)."""
    keys = sorted(str(k) for k in group if k not in ("params", "param_names"))
    more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
    return f"(its settings: {', '.join(keys[:8])}{more})" if keys else "(it has no settings)"


def _not_adam(group: Mapping, entry: Mapping) -> str | None:
    """What makes a param group and state not plain Adam / AdamW (None when nothing does). torch's Adam
    and AdamW groups carry amsgrad; a torch.optim group with weight_decay and no amsgrad, and Adam's
    moments, is RAdam's (or Adamax's, whose state has no exp_avg_sq). torch.optim.SparseAdam (lr, betas,
    eps, maximize) is taken: its step on a row is Adam's, bias-corrected by the global step, and a row
    without a gradient skips it, so each row's exp_avg_sq is the one its next step divides by (moments
    marks it sparse: "adam_update" refuses it)."""
    if "momentum_decay" in group or "mu_product" in entry:
        return "NAdam (momentum_decay, mu_product)"
    if "amsgrad" not in group and "weight_decay" in group and any(k in group for k in _TORCH_GROUP_KEYS):
        return "RAdam or another optimizer that is not Adam (a torch.optim group with weight_decay and without amsgrad)"
    if group.get("amsgrad"):
        return "amsgrad=True (its steps divide by the running maximum max_exp_avg_sq)"
    if group.get("maximize"):
        return "maximize=True (its steps ascend the loss)"
    return None


def _parameters(n: int) -> str:
    """'1 parameter', '2 parameters'."""
    return f"{n} parameter{'' if n == 1 else 's'}"


def _few(names: Sequence[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _named_otherwise(name: str, groups: Sequence[Mapping], by_position: bool, known: Collection[str]) -> str:
    """For a parameter `name` missing from the optimizer's param_names: a few of the names it holds,
    and, when some end with `name` after a prefix (a wrapper module's attribute, "model." of a
    LightningModule), that prefix and how to remove it; "" for parameters matched by position."""
    if by_position:
        return ""
    digits = _digit_names(groups, known)  # as _owners read them: the model's own digit names are names
    names = [str(n) for g in groups for n in _recorded_names(g, digits) or ()]
    held = "g['param_names']" if all("param_names" in g for g in groups) else "g.get('param_names', g['params'])"
    prefixes = sorted({n[: -len(name)] for n in names if n.endswith("." + name)})
    text = f" (it names its {len(names)} parameters {_few([repr(n) for n in names])})"
    if len(prefixes) == 1:
        (prefix,) = prefixes
        text += (
            f": its {prefix + name!r} is this parameter under the prefix {prefix!r} (the optimizer was built over "
            "a module holding the model as an attribute, a LightningModule's or a wrapper's). Drop the prefix from "
            f"the saved state: for g in state['param_groups']: g['param_names'] = [n.removeprefix({prefix!r}) for n "
            f"in {held}]"
        )
    elif prefixes:
        text += (
            f": it holds names ending with this one under several prefixes ({', '.join(map(repr, prefixes))}), "
            "which do not tell which is this model's parameter"
        )
    return text


def _recorded_names(group: Mapping, digits: bool = False) -> list[str] | None:
    """The parameter names a param group records: its param_names (torch >= 2.6, an optimizer over named
    parameters), or its params when they are names themselves (torch.distributed.checkpoint.state_dict's
    get_optimizer_state_dict, FSDP's optim_state_dict: the state keyed by each parameter's name; digit
    strings only where `digits`, _digit_names); None when it records none (torch's own ids)."""
    if "param_names" in group:
        return list(group["param_names"])
    params = group["params"]
    if params and all(isinstance(k, str) and (digits or not k.isdigit()) for k in params):
        return list(params)
    return None


def _digit_names(groups: Sequence[Mapping], known: Collection[str]) -> bool:
    """Whether the groups' params, all digit strings, are parameter names (a module's registered "0", "1",
    keyed by get_optimizer_state_dict in the optimizer's order) rather than torch's ids written as strings:
    names of the model's parameters (`known`), or any sequence other than torch's ids 0, 1, 2, ..."""
    keys = [k for g in groups for k in g["params"]]
    digits = [k for k in keys if isinstance(k, str) and k.isdigit()]
    if not digits:
        return False
    if set(digits) <= set(known):  # the model's own names (registered "0", "1", ... at its top)
        return True
    return len(digits) == len(keys) and keys != [str(i) for i in range(len(keys))]


def _check_keys(groups: Sequence[Mapping], where: str, known: Collection[str]) -> None:
    """ValueError when the params of the groups without param_names mix parameter names with ids: neither
    names nor positions then match them all."""
    keys = [k for g in groups if "param_names" not in g for k in g["params"]]
    names = [k for k in keys if isinstance(k, str) and (not k.isdigit() or k in known)]
    if names and len(names) < len(keys):
        ids = [repr(k) for k in keys if k not in names]
        raise ValueError(
            f"{where}: its param_groups' params mix parameter names ({_few([repr(n) for n in names])}) with ids "
            f"({_few(ids)}), so its parameters can be matched neither by name nor by position: pass a state saved "
            "whole one way, optimizer.state_dict() or torch.distributed.checkpoint.state_dict.get_optimizer_state_dict"
        )


def _strip(name: str, known: set[str]) -> str:
    """`name` less its wrappers' prefixes (_PREFIXES, in any order), unless the model knows it as it is."""
    while name not in known and name.startswith(_PREFIXES):
        name = name.split(".", 1)[1]
    return name


# where a general checkpoint file keeps the optimizer beside the model ({"model": ..., "optimizer": ...})
_NESTED_OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim")
_LIGHTNING_KEY = "optimizer_states"  # a Lightning checkpoint's list of its optimizers' state_dict()s


def _nested_optimizer(state: Any) -> Any:
    """The optimizer.state_dict() a general checkpoint file holds under _NESTED_OPTIMIZER_KEYS, or as the one
    entry of a Lightning checkpoint's "optimizer_states" list, else `state`."""
    if isinstance(state, Mapping) and "param_groups" not in state:
        for key in _NESTED_OPTIMIZER_KEYS:
            if isinstance(state.get(key), Mapping) and "param_groups" in state[key]:
                return state[key]
        listed = state.get(_LIGHTNING_KEY)
        if isinstance(listed, (list, tuple)) and len(listed) == 1 and isinstance(listed[0], Mapping):
            return listed[0]
    return state


def _check_optimizer_dict(state: Any, where: str) -> None:
    """ValueError unless `state` looks like an optimizer.state_dict(): "state" and "param_groups"."""
    if (
        not isinstance(state, Mapping)
        or not isinstance(state.get("state"), Mapping)
        or not isinstance(state.get("param_groups"), (list, tuple))
        or not all(isinstance(g, Mapping) and "params" in g for g in state["param_groups"])
    ):
        keys = f"; its keys: {sorted(map(str, state))[:10]}" if isinstance(state, Mapping) else ""
        if isinstance(state, Mapping) and any(str(k).startswith(("state.", "param_groups.")) for k in state):
            keys += (
                ". It is a flattened state (get_optimizer_state_dict with StateDictOptions(flatten_optimizer_state_"
                "dict=True)): pass get_optimizer_state_dict(model, optimizer) without that option"
            )
        listed = state.get(_LIGHTNING_KEY) if isinstance(state, Mapping) else None
        if isinstance(listed, (list, tuple)):
            keys += f". Its {_LIGHTNING_KEY!r} (a Lightning checkpoint's) " + (
                f"lists {len(listed)} optimizer states: pass the Adam one, ckpt[{_LIGHTNING_KEY!r}][i] (the i-th "
                "optimizer configure_optimizers returns)"
                if listed
                else "is empty: the checkpoint holds no optimizer state"
            )
        raise ValueError(
            f"{where} is not an optimizer.state_dict() (a dict with 'state' and 'param_groups'), nor a dict holding "
            f"one under {', '.join(map(repr, _NESTED_OPTIMIZER_KEYS))} or as the one entry of "
            f"{_LIGHTNING_KEY!r}{keys}"
        )
    for g in state["param_groups"]:
        if "betas" not in g or "eps" not in g:
            raise ValueError(_not_adam_type(state, g, where))
    for i, g in enumerate(state["param_groups"]):
        _check_group(g, f"{where}: param_groups[{i}]")
    groups = [g for g in state["param_groups"] if "param_names" in g]
    names = {k: n for g in groups for k, n in zip(g["params"], g["param_names"], strict=True)}
    for key, entry in state["state"].items():
        step = entry.get("step", 0) if isinstance(entry, Mapping) else 0
        if _real(step) is None:
            label = f"parameter {names[key]}" if key in names else f"the state's entry {key!r}"
            raise ValueError(f"{where}: the step of {label} must be a number or a 1-element tensor, got {_kind(step)}")


def _check_group(group: Mapping, where: str) -> None:
    """ValueError naming param group `where` and the key unless its params is a list of ids (its
    param_names, if any, as many str), its betas 2 reals in [0, 1) (adam_settings' range, as JAX's
    b1, b2), its eps and lr (if any) finite reals >= 0 (reals: numbers or 1-element tensors). A beta2 of
    1 made every row 0, a beta of 1.5 or a NaN eps every row NaN."""
    params = group["params"]
    if not isinstance(params, (list, tuple)) or not all(isinstance(k, (int, str)) for k in params):
        raise ValueError(f"{where}['params'] must be a list of parameter ids (int) or names (str), got {_kind(params)}")
    names = group.get("param_names", [])
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}['param_names'] must be a list of parameter names (str), got {_kind(names)}")
    if len(names) != len(params) and "param_names" in group:
        raise ValueError(
            f"{where} has {len(params)} params and {len(names)} param_names: one name is needed for each parameter"
        )
    betas = group["betas"]
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ValueError(f"{where}['betas'] must be 2 numbers (beta1, beta2), got {_kind(betas)}")
    for key, field, value in (("b1", "['betas'][0]", betas[0]), ("b2", "['betas'][1]", betas[1])):
        real = _real(value)
        if real is None:
            raise ValueError(f"{where}{field} must be a number, got {_kind(value)}")
        try:
            adam_settings({key: real})
        except ValueError as e:  # "preconditioner_options['b1'] must be in [0, 1), got 1.0"
            raise ValueError(f"{where}{field} {str(e).partition('] ')[2]}") from None
    # eps: torch.optim.Adam's bound, [0, inf), not adam_settings' (0, inf): a state of eps=0 is torch's own
    for key in ("eps", "lr"):
        value = group.get(key, 0.0)
        real = _real(value)
        if real is None:
            raise ValueError(f"{where}['{key}'] must be a number, got {_kind(value)}")
        if not (math.isfinite(real) and real >= 0):
            raise ValueError(f"{where}['{key}'] must be a finite number >= 0, got {_kind(value)}")


def _real(value: Any) -> float | None:
    """A real number or a 1-element real tensor as a float (None for anything else: a str, a bool,
    None, a longer tensor)."""
    if isinstance(value, torch.Tensor):
        ok = value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
        return float(value) if ok else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _kind(value: Any) -> str:
    """A short description of a field's value for an error: its repr when short, else its type."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}" if value.numel() != 1 else repr(value)
    text = repr(value)
    return text if len(text) <= 80 else f"a {type(value).__name__}"


def _leaves(obj: Any) -> list[np.ndarray]:
    """Every tensor and setting of a nested optimizer state, keys included, in a stable order."""
    if isinstance(obj, Mapping):
        out = []
        for key in sorted(obj, key=repr):
            out += [np.frombuffer(repr(key).encode(), np.uint8), *_leaves(obj[key])]
        return out
    if isinstance(obj, (list, tuple)):
        return [a for item in obj for a in _leaves(item)]
    if isinstance(obj, torch.Tensor):
        return [host_array(obj)]
    return [np.frombuffer(repr(obj).encode(), np.uint8)]


def state_digest(
    source: Mapping,
    index: int,
    reference: Mapping[str, torch.Tensor],
    skip: AbstractSet[str] = frozenset(),
    frozen: AbstractSet[str] = frozenset(),
    ignored: IgnoredKeys | None = None,
) -> str:
    """Fingerprint of an in-memory checkpoint as load_checkpoint uses it: per name of `reference`
    (the model's state_dict) less `skip` (tied second names), in name order, the name and the tensor
    cast on the host to the reference's floating dtype. A DataParallel or torch.compile prefix, a tied
    copy, an ignored key or float64 copies of float32 weights therefore leave it unchanged. (A checkpoint
    file is fingerprinted by its bytes, in tracin._export.) `frozen`, `ignored`: as for load_checkpoint."""
    name = f"checkpoints[{index}] ({describe(source, index)})"
    state = _matched(_unwrap(source, name), reference, skip, name, frozen, ignored)
    arrays = []
    for key in sorted(state):
        t, ref = state[key].detach().cpu(), reference[key]
        arrays += [np.frombuffer(key.encode(), np.uint8), host_array(t.to(ref.dtype))]
    return digest_arrays(arrays)


def legacy_state_digest(source: Mapping, index: int) -> str:
    """The fingerprint versions before metadata["checkpoint_sources"] recorded for an in-memory
    checkpoint: the state_dict's names and tensors as given (in name order). Only for resuming, or
    returning, a store those versions wrote."""
    state = _unwrap(source, f"checkpoints[{index}] ({describe(source, index)})")
    arrays = []
    for key in sorted(k for k, t in state.items() if isinstance(t, torch.Tensor)):
        arrays += [np.frombuffer(key.encode(), np.uint8), host_array(state[key])]
    return digest_arrays(arrays)


def describe(source: Any, index: int) -> str:
    """How a checkpoint is named in metadata: its path, or its position for in-memory state dicts."""
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"state_dict[{index}]"


def _unwrap(obj: Any, name: str) -> Mapping[str, torch.Tensor]:
    """The state_dict `obj` is or holds (under _NESTED_KEYS): names to tensors, but for a module's extra
    state (get_extra_state), which may be anything under a name ending with _EXTRA."""
    if (
        isinstance(obj, Mapping)
        and any(isinstance(v, torch.Tensor) for v in obj.values())
        and all(isinstance(v, torch.Tensor) or str(k).endswith(_EXTRA) for k, v in obj.items())
    ):
        return obj
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _unwrap(obj[key], name)
    raise ValueError(
        f"{name} is not a state_dict (a mapping of names to tensors), nor a dict holding "
        f"one under {', '.join(repr(k) for k in _NESTED_KEYS)}"
    )


def _strip_prefix(state: Mapping[str, torch.Tensor], expected: Container[str]) -> dict:
    """Drops the prefixes of _PREFIXES (DataParallel's 'module.', torch.compile's '_orig_mod.', in any
    order and number) that every key has, while some key is not one of the model's (a model may have a
    submodule named 'module')."""
    state = dict(state)
    while state and not all(k in expected for k in state):
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """state_dict names that are second names of a tied parameter or buffer (e.g. a decoder weight
    shared with the embedding); functional_call takes each tied tensor under its first name only."""
    return set(tied_first_names(model, buffers=True))


class IgnoredKeys:
    """Checkpoint keys that name no tensor of the model's state_dict and are left out of a load, as
    Hugging Face's from_pretrained leaves them out (older checkpoints hold them): the model's
    non-persistent buffers (BERT's embeddings.position_ids, saved before transformers 4.31), which the
    model makes itself, under every name; and, in a save_pretrained folder, the keys that a pattern of
    the model's modules' _keys_to_ignore_on_load_unexpected (GPT-2's attn.bias) or from_pretrained's own
    rotary_emb.inv_freq / position_ids patterns (where the model has such buffers) finds. `values`: the
    model's tensors of `buffers`, which a checkpoint's tensor of the same name is compared with (differs)."""

    def __init__(
        self,
        buffers: AbstractSet[str] = frozenset(),
        patterns: Sequence[str] = (),
        values: Mapping[str, torch.Tensor] | None = None,
    ):
        self.buffers = frozenset(buffers)
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
        self.values = dict(values or {})

    def differs(self, key: str, t: torch.Tensor) -> bool:
        """Whether `t`, a checkpoint's tensor for the model's non-persistent buffer `key`, is not that buffer
        (another shape, or other values than the buffer rounded to `t`'s dtype: a model built with another
        config than the checkpoint's, such as rope_theta)."""
        mine = self.values.get(key)
        if mine is None or t.is_meta:
            return False
        if t.shape != mine.shape:
            return True
        return not torch.equal(t.detach().cpu(), mine.detach().cpu().to(t.dtype))

    def covers(self, key: str, folder: bool) -> bool:
        """Whether `key`, a key of a checkpoint (`folder`: of a save_pretrained folder), is left out."""
        return key in self.buffers or (folder and self.pattern is not None and self.pattern.search(key) is not None)


def ignored_keys(model: torch.nn.Module) -> IgnoredKeys:
    """The IgnoredKeys of `model`."""
    values = {
        f"{prefix}.{n}" if prefix else n: module._buffers.get(n)
        for prefix, module in model.named_modules(remove_duplicate=False)
        for n in module._non_persistent_buffers_set
    }
    patterns = {p for m in model.modules() for p in getattr(m, "_keys_to_ignore_on_load_unexpected", None) or ()}
    names = [n for n, _ in model.named_buffers()]
    if any(n.endswith("rotary_emb.inv_freq") for n in names):
        patterns.add(r"rotary_emb\.inv_freq")
    if any(n.endswith("position_ids") for n in names):
        patterns.add(r"(^|\.)position_ids$")
    if any(p.startswith("attn") and p.endswith("bias") for p in patterns):  # GPT-2: older folders also saved
        patterns.add(r"attn\.masked_bias$")  # the constant -1e4 fill of masked scores, no longer a buffer
    return IgnoredKeys(set(values), sorted(patterns), {k: v for k, v in values.items() if v is not None})


class _Known:
    """The keys a checkpoint may hold: `reference`'s, and those `ignored` covers (_strip_prefix's `expected`)."""

    def __init__(self, reference: Container[str], ignored: IgnoredKeys, folder: bool):
        self.reference, self.ignored, self.folder = reference, ignored, folder

    def __contains__(self, key: object) -> bool:
        return key in self.reference or (isinstance(key, str) and self.ignored.covers(key, self.folder))


def frozen_parameters(model: torch.nn.Module) -> frozenset[str]:
    """state_dict names of the parameters the model does not train (requires_grad=False), under every
    name they have, and of the persistent buffers of modules holding parameters, all frozen (a frozen
    BatchNorm's running statistics): what a checkpoint of the trainable parameters alone lacks
    (load_checkpoint's `frozen`)."""
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    for prefix, module in model.named_modules(remove_duplicate=False):
        own = list(module.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            names.update(
                f"{prefix}.{n}" if prefix else n
                for n, b in module.named_buffers(recurse=False)
                if b is not None and n not in module._non_persistent_buffers_set
            )
    return frozenset(names)


def written_in_forward(model: torch.nn.Module) -> frozenset[str]:
    """state_dict names of the weights the model's own modules change in place when they run: those of
    nn.Embedding / nn.EmbeddingBag with max_norm, under every name they have (a weight tied to a layer
    registered before the embedding is loaded under that layer's name); a functional call with
    max_norm is not seen."""
    written = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.max_norm is not None
    }
    return frozenset(name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in written)


class FreshBuffers:
    """A context in which every forward of `model` starts from the buffers as loaded: a forward that
    changes a buffer (in place, or by assigning a new tensor; a running statistic, a call counter, a
    fake-quantization observer) does so for itself alone, so no pass (a check, a batch, an example)
    sees another's change. Before each forward of the model, and before its own forward pre-hooks,
    each buffer in a module's attribute (the model's own, or a checkpoint's that
    torch.func.functional_call put there) is replaced, for that forward only, by a working copy, made
    at its first forward (once per checkpoint) and made again when its version counter says a forward
    wrote it; inside a torch.func transform a copy still needed is that forward's own, and nothing is
    written there. Cost: one copy of each buffer the forwards use, on its device, freed when the next
    checkpoint is kept; the model's own persistent buffers are copied only if the model runs with them.
    A buffer in two slots is one copy; buffers that are views of one storage are views of one copy of
    it (but where a transform batches them or takes their gradient: each gets its own). A forward of the model inside
    its own forward (a recursive call) runs with the outer forward's copies. A tensor of another shape
    or dtype that a forward puts in a buffer slot (a cache grown in forward) is kept there, with a
    RuntimeWarning naming the buffer: the next forwards of the checkpoint start from it, and the model
    keeps it after the export.

    The buffers as loaded are left as they were: one written through another reference (an attribute
    aliasing it) is set back from its copy before the next forward and at exit, or, for a buffer of
    the model never copied, reported at exit with a RuntimeWarning. A write the version counter does
    not see (through .data, NumPy, an extension kernel) is found by comparing the copy with the buffer
    after the copy's first forward, the buffer then copied before every forward; one made after that
    first forward is reported at the next keep or at exit with a RuntimeWarning (each comparison: one
    device sync per buffer and checkpoint)."""

    def __init__(self, model: torch.nn.Module):
        if isinstance(model, torch.jit.ScriptModule):
            raise ValueError(
                "model: expected an nn.Module running Python code, got a torch.jit.ScriptModule (from "
                "torch.jit.script or torch.jit.trace), which takes no forward hooks; pass the module it was made from"
            )
        self.model = model
        self._names: dict[int, str] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self._names.setdefault(id(module), name)
        self._copies: dict[int, _Copy] = {}
        self._swapped: list[list[tuple[torch.nn.Module, str, torch.Tensor, torch.Tensor]]] = []
        self._kept: set[str] = set()
        self._unchecked: list[_Copy] = []  # copies whose first forward is not checked yet

    def __enter__(self) -> FreshBuffers:
        self._own = {id(t): (name, t, t._version) for name, t in self.model.named_buffers() if not t.is_inference()}
        self._hooks = [
            self.model.register_forward_pre_hook(lambda *_: self._swap_in(), prepend=True),
            self.model.register_forward_hook(lambda *_: self._swap_out(), always_call=True),
        ]
        return self

    def __exit__(self, *_: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        while self._swapped:
            self._swap_out()
        copied = set(self._copies)
        self._release()
        for key, (name, tensor, version) in self._own.items():
            if key not in copied and tensor._version != version:  # no copy to set it back from
                warnings.warn(
                    f"buffer {name} of the model was written during the export through another reference than "
                    "the module's attribute (a forward that runs with a checkpoint's buffers swapped in), and is "
                    "left as written",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def keep(self, state: Mapping[str, torch.Tensor]) -> None:
        """A new checkpoint (`state`, as loaded) is about to be run: the previous one's copies are
        freed (the model's own kept); those of `state` are made at their first forward."""
        self._release(keep_own=True)

    def _swap_in(self) -> None:
        """Each buffer slot of the model holding a buffer as loaded gets its working copy, one per
        buffer (a buffer in two slots stays one tensor); a forward of the model inside another (a
        recursive call) is part of the outer forward and runs with its copies."""
        if self._swapped:
            if _calls_running(self.model) > 1:
                self._swapped.append([])
                return
            while self._swapped:  # left by a forward a BaseException (KeyboardInterrupt) stopped
                self._swap_out()
        inside = _transforms_active()
        swapped: list[tuple[torch.nn.Module, str, torch.Tensor, torch.Tensor]] = []
        self._swapped.append(swapped)  # before any swap: a failure below is undone by _swap_out too
        slots = [
            (module, leaf, tensor)
            for module in self.model.modules()
            for leaf, tensor in module._buffers.items()
            if tensor is not None and not tensor.is_inference()
        ]
        views = _storage_groups([t for _, _, t in slots if id(t) not in self._copies])
        made: dict[int, torch.Tensor] = {}
        for module, leaf, tensor in slots:
            working = made.get(id(tensor))
            if working is None:
                working = made[id(tensor)] = self._working(module, leaf, tensor, inside, views.get(id(tensor)), made)
            swapped.append((module, leaf, tensor, working))
            module._buffers[leaf] = working

    def _working(
        self,
        module: torch.nn.Module,
        leaf: str,
        tensor: torch.Tensor,
        inside: bool,
        views: list[torch.Tensor] | None,
        made: dict[int, torch.Tensor],
    ) -> torch.Tensor:
        """The working copy of `tensor` for this forward; buffers that are views of one storage
        (`views`) share one copy of that storage, each rebuilt as a view of it."""
        copy = self._copies.get(id(tensor))
        if copy is None:
            if inside and views is None:  # a copy made here would belong to the transform: this forward's own
                return _clone(tensor)
            plain = tensor if views is None else _plain(tensor)
            source = tensor if views is None else _bytes(plain)
            if inside:
                working = made.get(id(views))
                if working is None:
                    working = made[id(views)] = _clone(source)
                return _view(working, plain)
            copy = _Copy(source, self._name(module, leaf), grouped=views is not None)
            for member in views or [tensor]:
                self._copies[id(member)] = copy
            self._unchecked.append(copy)
        elif not inside:
            copy.mend()
        if not copy.grouped:
            return copy.fresh(inside)
        working = made.get(id(copy))
        if working is None:
            working = made[id(copy)] = copy.fresh(inside)
        return _view(working, tensor)

    def _name(self, module: torch.nn.Module, leaf: str) -> str:
        prefix = self._names.get(id(module), "?")
        return f"{prefix}.{leaf}" if prefix else leaf

    def _swap_out(self) -> None:
        """The slots the last _swap_in filled hold the buffers as loaded again, but a tensor of another
        shape or dtype the forward put in a slot (a cache grown in forward), kept with a RuntimeWarning;
        a copy's first forward is checked for writes its version counter missed."""
        if not self._swapped:
            return
        for module, leaf, tensor, working in reversed(self._swapped.pop()):
            now = module._buffers.get(leaf)
            if now is not working and isinstance(now, torch.Tensor) and _reshaped(now, tensor):
                self._warn_kept(self._name(module, leaf))
                continue
            module._buffers[leaf] = tensor
        if not self._swapped and not _transforms_active():
            for copy in self._unchecked:
                copy.check_first()
            self._unchecked.clear()

    def _warn_kept(self, name: str) -> None:
        if name not in self._kept:
            self._kept.add(name)
            warnings.warn(
                f"a forward put a tensor of another shape or dtype in buffer {name} (a cache grown in forward): "
                "it is kept, and the next forwards of this checkpoint start from it, as does the model after "
                "the export",
                RuntimeWarning,
                stacklevel=3,
            )

    def _release(self, keep_own: bool = False) -> None:
        done: set[int] = set()
        for key in list(self._copies):
            if not (keep_own and key in self._own):
                copy = self._copies.pop(key)
                if id(copy) not in done:  # a copy of views of one storage is under each view's key
                    done.add(id(copy))
                    copy.mend()
                    copy.check_last()
        self._unchecked = [copy for copy in self._unchecked if id(copy) not in done]


class _Copy:
    """The working copy of a buffer as loaded (`source`, never written): made again when a forward
    wrote it, or before every forward once a write its version counter missed was seen. For buffers
    that are views of one storage (`grouped`) the source is that storage's bytes."""

    def __init__(self, source: torch.Tensor, name: str, grouped: bool = False):
        self.source, self.name, self.grouped = source, name, grouped
        self.source_version = source._version
        self.always = False
        self._new()
        self.unchecked = True

    def _new(self) -> None:
        self.tensor = _clone(self.source)
        self.version = self.tensor._version

    def fresh(self, inside: bool) -> torch.Tensor:
        """A copy equal to the source: the kept one if no forward wrote it."""
        if self.always or self.tensor._version != self.version:
            if inside:
                return _clone(self.source)
            self._new()
        return self.tensor

    def mend(self) -> None:
        """The source set back from the copy when something wrote it through another reference (an
        attribute aliasing the buffer) while the copy was not written; a RuntimeWarning when it was."""
        if self.source._version == self.source_version:
            return
        if not self.always and self.tensor._version == self.version:
            with torch.no_grad():
                self.source.copy_(self.tensor)
        else:
            warnings.warn(
                f"buffer {self.name} was written through another reference than the module's attribute (an "
                "alias) while its working copy was written too: it is left as written, and the next forwards "
                "start from it",
                RuntimeWarning,
                stacklevel=2,
            )
        self.source_version = self.source._version

    def _missed(self) -> bool:
        """The copy differs from the source though neither version counter says it was written."""
        unwritten = self.tensor._version == self.version and self.source._version == self.source_version
        return unwritten and not _same(self.tensor, self.source)

    def check_first(self) -> None:
        if self.unchecked:
            self.unchecked = False
            if self._missed():
                self.always = True
                self._new()

    def check_last(self) -> None:
        if not self.always and not self.unchecked and self._missed():
            warnings.warn(
                f"a forward wrote buffer {self.name} without its version counter showing it (through .data, "
                "NumPy or an extension kernel), after the first forward from this checkpoint: the forwards after "
                "it saw the change (the buffer as loaded is unchanged)",
                RuntimeWarning,
                stacklevel=2,
            )


# torch.compiler.disable as a decorator imports torch._dynamo (sympy, torch.onnx, ...) with this module: +73 MiB
# resident and ~0.3 s for every import of tracin.torch; torch's own lazy form imports it at the first call
_untraced = getattr(torch, "_disable_dynamo", torch.compiler.disable)


def _clone(t: torch.Tensor) -> torch.Tensor:
    """A copy with a version counter, also when made under torch.inference_mode."""
    with torch.inference_mode(False):
        return t.detach().clone()


@_untraced  # dynamo cannot trace the frame walk (it asserted on the module's mutation)
def _calls_running(model: torch.nn.Module) -> int:
    """How many calls of `model` are on the Python stack (more than one: a forward inside its own)."""
    count, frame = 0, sys._getframe(1)
    while frame is not None:
        if frame.f_code is _CALL and frame.f_locals.get("self") is model:
            count += 1
        frame = frame.f_back
    return count


_CALL = torch.nn.Module._call_impl.__code__


def _plain(t: torch.Tensor) -> torch.Tensor | None:
    """`t` unwrapped from the torch.func transforms that only carry it (grad's wrapper of a tensor
    taking no gradient); None when one batches it (vmap) or takes its gradient."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t) or t.requires_grad:
            return None
        t = functorch.get_unwrapped(t)
    return t


def _storage_groups(tensors: list[torch.Tensor]) -> dict[int, list[torch.Tensor]]:
    """For each tensor sharing its storage with another of `tensors` (views of one tensor), the list
    of those tensors."""
    by_storage: dict[tuple, list[torch.Tensor]] = {}
    for t in {id(t): t for t in tensors}.values():
        plain = _plain(t)
        if plain is None or plain.layout != torch.strided or plain.device.type == "meta":
            continue
        try:
            storage = plain.untyped_storage()
        except (NotImplementedError, RuntimeError):  # a tensor subclass without one
            continue
        if storage.nbytes():
            by_storage.setdefault((t.device, storage.data_ptr()), []).append(t)
    return {id(t): group for group in by_storage.values() if len(group) > 1 for t in group}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The whole storage of `t` as a flat uint8 tensor (no copy)."""
    with torch.inference_mode(False):
        return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def _view(storage: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`t` rebuilt as a view of `storage` (a copy of its storage's bytes): same dtype, shape, strides
    and offset, and the version counter of `storage`."""
    size = t.element_size()
    flat = storage[: storage.numel() - storage.numel() % size].view(t.dtype)
    return flat.as_strided(t.shape, t.stride(), t.storage_offset())


def _reshaped(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape != b.shape or a.dtype != b.dtype


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN."""
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return False
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def _transforms_active() -> bool:
    """Whether a torch.func transform (vmap, grad) is running: a tensor made there belongs to it, and
    a captured tensor cannot be written."""
    return getattr(torch._C, "_are_functorch_transforms_active", lambda: False)()


def load_checkpoint(
    source: Any,
    index: int,
    reference: Mapping[str, torch.Tensor],
    skip: AbstractSet[str] = frozenset(),
    written: frozenset[str] = frozenset(),
    frozen: AbstractSet[str] = frozenset(),
    ignored: IgnoredKeys | None = None,
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, keyed like `reference` (the model's state_dict) less the names in
    `skip` (tied second names, which a checkpoint may lack), each on the reference tensor's device and
    dtype. Files are read with torch.load(weights_only=True), safetensors files (told by their first
    bytes) with safetensors.torch.load_file; a directory is a save_pretrained folder.
    The tensors named in `written` (written_in_forward) of an in-memory checkpoint are copied, so the
    forward leaves the caller's dict as it was; the others are used as they are (no copy of the model),
    but for tensors made under torch.inference_mode() (a snapshot taken in an evaluation loop), which
    autograd cannot use: copied. `frozen`: the names of the model's frozen parameters (requires_grad=
    False, and buffers of frozen modules: frozen_parameters); a checkpoint lacking only some of them (the
    trainable parameters alone, as LoRA fine-tuning may save) is refused saying so and how to complete
    it, as is a PEFT adapter file (_adapter_advice). `ignored` (ignored_keys): the keys left out (a non-persistent
    buffer an older checkpoint holds), not loaded."""
    name = f"checkpoints[{index}] ({describe(source, index)})"
    folder = False
    if isinstance(source, (str, os.PathLike)):
        device = next((t.device for t in reference.values() if isinstance(t, torch.Tensor)), "cpu")
        folder = os.path.isdir(source)
        if folder:
            obj = _read_folder(source, device, name)
        else:
            obj = _read_file(source, device, name, f"checkpoints[{index}]: no checkpoint", sniff=True)
    else:
        obj = source
    state = _matched(_unwrap(obj, name), reference, skip, name, frozen, ignored, folder, warn=True)
    given = obj is source  # tensors read from a file are the loader's own
    return {
        key: t.detach().to(
            device=reference[key].device,
            dtype=reference[key].dtype,  # as load_state_dict's copy_ converts (a uint8 mask: nonzero is True)
            copy=(given and key in written) or t.is_inference(),
        )
        for key, t in state.items()
    }


def _matched(
    state: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    skip: AbstractSet[str],
    name: str,
    frozen: AbstractSet[str] = frozenset(),
    ignored: IgnoredKeys | None = None,
    folder: bool = False,
    warn: bool = False,
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the names of `reference` less `skip`, a wrapper's prefix
    dropped (_strip_prefix), the keys `ignored` covers (IgnoredKeys.covers; `folder`: a save_pretrained
    folder's) left out (`warn`: a UserWarning naming those that differ from the model's buffer of that name,
    IgnoredKeys.differs); ValueError naming `name` for missing or unexpected keys (saying so when
    the missing ones are all `frozen`: _frozen_advice; for a PEFT adapter's keys: _adapter_advice), other shapes,
    an integer or bool tensor for a floating one of the model, a meta tensor (no data), and a tied
    copy (a name in `skip` the checkpoint holds) that differs from its first name's tensor. A missing
    BatchNorm num_batches_tracked is the model's, as nn.Module.load_state_dict takes it (unused in
    eval mode)."""
    # a module's get_extra_state() that is no tensor (version info): not a weight, left to the model
    reference = {k: v for k, v in reference.items() if isinstance(v, torch.Tensor)}
    ignored = ignored or IgnoredKeys()
    state = _strip_prefix(
        {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, _Known(reference, ignored, folder)
    )
    differ = [k for k, v in state.items() if k not in reference and ignored.differs(k, v)]
    if warn and differ:
        warnings.warn(
            f"{name}: its {_few(differ)} differ from the model's non-persistent buffers of those names, which the "
            "model computes itself and uses (the checkpoint's are left out, as from_pretrained leaves them out): "
            "the checkpoint was saved from a model with another config (rope_theta, rope_scaling, "
            "max_position_embeddings)? The gradients are the model's as built.",
            UserWarning,
            stacklevel=3,
        )
    state = {k: v for k, v in state.items() if k in reference or not ignored.covers(k, folder)}
    missing = [
        k
        for k in reference
        if k not in state and k not in skip and not _optional(k, reference[k])  # save_pretrained drops tied copies
    ]
    unexpected = [k for k in state if k not in reference]
    if missing or unexpected:
        raise ValueError(
            f"{name} does not match the model: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}{_prefix_advice(missing, unexpected)}"
            f"{_tied_advice(missing, state, reference, skip)}{_frozen_advice(missing, unexpected, frozen)}"
            f"{_adapter_advice(missing, unexpected, frozen)}{_ignorable_advice(missing, unexpected, ignored, folder)}"
        )
    out = {}
    for key, ref in reference.items():
        if key in skip:
            continue
        if key not in state:  # a num_batches_tracked (_optional)
            out[key] = ref.detach().clone()
            continue
        t = state[key]
        if t.is_meta:
            raise ValueError(
                f"{name}: {key} is a meta tensor (no data: a model built on device='meta' and not "
                "loaded); give the checkpoint's real tensors"
            )
        if t.shape != ref.shape:
            raise ValueError(f"{name}: {key} has shape {tuple(t.shape)}, the model's has {tuple(ref.shape)}")
        if ref.is_floating_point() and not (t.is_floating_point() or t.is_complex()):
            raise ValueError(
                f"{name}: {key} has dtype {str(t.dtype).removeprefix('torch.')}, the model's "
                f"{str(ref.dtype).removeprefix('torch.')}: a floating tensor is expected (the wrong file, "
                "or a quantized checkpoint tracin cannot read)"
            )
        if t.is_complex() and not ref.is_complex():
            raise ValueError(
                f"{name}: {key} has dtype {str(t.dtype).removeprefix('torch.')}, the model's "
                f"{str(ref.dtype).removeprefix('torch.')}: a complex tensor for a real one (the wrong file, or a "
                "model of another version); give the real tensor the model holds"
            )
        out[key] = t
    _check_tied(state, reference, skip, name)
    return out


def _ignorable_advice(missing: Sequence[str], unexpected: Sequence[str], ignored: IgnoredKeys, folder: bool) -> str:
    """When every unexpected key (none missing) is one that `ignored`'s patterns leave out of a save_pretrained
    folder (GPT-2's attn.bias of an older checkpoint) but the checkpoint is no folder: how to load it; "" otherwise."""
    if missing or folder or not unexpected or not all(ignored.covers(k, folder=True) for k in unexpected):
        return ""
    return (
        ": these keys are ones the model class leaves out of an older checkpoint (its "
        "_keys_to_ignore_on_load_unexpected, as from_pretrained does): pass the save_pretrained folder holding the "
        "file, or drop these keys from the state dict"
    )


def _prefix_advice(missing: Sequence[str], unexpected: Sequence[str]) -> str:
    """When the missing keys are unexpected ones less one prefix (a LightningModule's "model.", an
    AveragedModel's "module." with its n_averaged), or with one (a Hugging Face base model's folder for the
    model with a head: "transformer."), that prefix and how to drop or add it; "" otherwise. Nothing is
    stripped on its own: a key under another prefix may be another module's."""
    if not missing or not unexpected:
        return ""
    held = set(unexpected)
    added = {u[: -len(m)] for m in missing for u in unexpected if u.endswith("." + m)}
    added = sorted(p for p in added if all(p + m in held for m in missing))
    if len(added) == 1:
        (prefix,) = added
        others = [u for u in unexpected if not u.startswith(prefix)]
        rest = f" (which leaves out its other keys {_few([repr(u) for u in others])})" if others else ""
        return (
            f": its keys are the model's under the prefix {prefix!r} (a checkpoint of a module holding the model as "
            "an attribute: a LightningModule, torch.optim.swa_utils.AveragedModel, another wrapper). Drop the "
            f"prefix: {{k.removeprefix({prefix!r}): v for k, v in state.items() if k.startswith({prefix!r})}}{rest}"
        )
    lacking = {m[: -len(u)] for u in unexpected for m in missing if m.endswith("." + u)}
    wanted = set(missing)
    lacking = sorted(p for p in lacking if all(p + u in wanted for u in unexpected))
    if len(lacking) == 1 and all(m.startswith(lacking[0]) for m in missing):
        (prefix,) = lacking
        return (
            f": its keys are the model's under {prefix!r} without that prefix (a checkpoint of the submodule "
            f"model.{prefix[:-1]}, a Hugging Face base model's for the model with a head). Add the prefix to the "
            f"loaded state_dict: {{{prefix!r} + k: v for k, v in state.items()}}"
        )
    return ""


def _frozen_advice(missing: Sequence[str], unexpected: Sequence[str], frozen: AbstractSet[str]) -> str:
    """When every missing key is `frozen` (frozen_parameters) and none is unexpected (a checkpoint of the
    trainable parameters alone, as a LoRA fine-tuning script may save), that, and how to give the whole
    state_dict; "" otherwise. A partial checkpoint is never completed silently: the frozen weights the
    model holds now are those of training only if nothing changed them."""
    if not missing or unexpected or not all(k in frozen for k in missing):
        return ""
    return (
        f": the {len(missing)} missing keys are all parameters the model has frozen (requires_grad=False) or "
        "buffers of modules whose parameters are all frozen, so this checkpoint holds only the trainable ones "
        "(as saved by fine-tuning that keeps them alone, LoRA). tracin needs every weight of each checkpoint: "
        f"if the frozen weights did not change during training{_BUFFERS_KEPT}, give the model's own with each "
        "checkpoint's trainable ones, as a new dict per checkpoint: {**model.state_dict(), **trainable} "
        "(trainable = torch.load(path, weights_only=True) for a torch.save file, "
        "safetensors.torch.load_file(path) for a safetensors one)"
    )


_BUFFERS_KEPT = " (nor the buffers: a BatchNorm in train mode updates its running statistics, frozen or not)"


def _adapter_advice(missing: Sequence[str], unexpected: Sequence[str], frozen: AbstractSet[str]) -> str:
    """When each unexpected key is a missing one less the same segment where PEFT puts the adapter's name
    (second to last for a module's tensor: '0.lora_A.weight' for '0.lora_A.default.weight'; last for a
    parameter: '0.lora_embedding_A' for '0.lora_embedding_A.default'; 'modules_to_save.default' dropped
    whole from a copy PEFT trains: 'head.weight' for 'head.modules_to_save.default.weight') and the other
    missing keys, at least one (the base weights, which an adapter file never holds), are `frozen`: that
    this looks like a PEFT adapter file (PEFT saves the adapter weights alone, their keys without the
    adapter's name) and how to give whole checkpoints; "" otherwise."""
    if not missing or not unexpected or not frozen:
        return ""
    shortened: dict[str, list[tuple[str, str]]] = {}  # key less the adapter's name -> [(missing key, name)]
    for m in missing:
        parts = m.split(".")
        forms = [(parts[:-1], parts[-1])] if len(parts) > 1 else []
        if len(parts) > 2:
            forms.append((parts[:-2] + parts[-1:], parts[-2]))
        forms += [
            (parts[:i] + parts[i + 2 :], parts[i + 1]) for i in range(len(parts) - 2) if parts[i] == "modules_to_save"
        ]
        for short, segment in forms:
            shortened.setdefault(".".join(short), []).append((m, segment))
    found = []
    for segment in sorted({s for pairs in shortened.values() for _, s in pairs}):
        matched = {u: [m for m, s in shortened.get(u, ()) if s == segment] for u in unexpected}
        if all(len(ms) == 1 for ms in matched.values()):
            named = {ms[0] for ms in matched.values()}
            rest = [m for m in missing if m not in named]
            if len(named) == len(unexpected) and rest and all(m in frozen for m in rest):
                found.append(segment)
    if len(found) != 1:
        return ""
    (segment,) = found
    rest = len(missing) - len(unexpected)
    adapter = "" if segment == "default" else f", adapter_name={segment!r}"
    return (
        f": its keys {_few([repr(u) for u in unexpected])} are the model's without the segment {segment!r}"
        + f", and the other {rest} missing keys are frozen in the model"
        + f". This looks like a PEFT adapter file (PEFT saves the adapter weights alone, dropping the adapter's "
        f"name, {segment!r}, from their keys). Load each into the PeftModel, with "
        f"peft.set_peft_model_state_dict(model, adapter_state{adapter}) (adapter_state = "
        "safetensors.torch.load_file('adapter_model.safetensors')) or PeftModel.from_pretrained on its folder, and "
        "give a copy of the whole state for each checkpoint: {k: v.clone() for k, v in model.state_dict().items()}"
        f", if the frozen weights did not change during training{_BUFFERS_KEPT}"
    )


def _tied_advice(
    missing: Sequence[str],
    state: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    skip: AbstractSet[str],
) -> str:
    """For missing first names of tied tensors whose second name (in `skip`) the checkpoint holds, that
    twin and how to give it under the first name; "" when there is none."""
    held = {_place(reference[k]): k for k in reference if k in skip and k in state and not reference[k].is_meta}
    places = {m: _place(reference[m]) for m in missing if not reference[m].is_meta}
    pairs = [(m, held[place]) for m, place in places.items() if place in held]
    if not pairs:
        return ""
    m, twin = pairs[0]
    return (
        f": {_few([f'{a} (as {b})' for a, b in pairs])} tied in the model (one tensor under both names) "
        f"{'is' if len(pairs) == 1 else 'are'} held by the checkpoint under the second name only; give "
        f"{'it' if len(pairs) == 1 else 'each'} under the first name too: {{**state, {m!r}: state[{twin!r}]}}"
    )


def _optional(key: str, ref: torch.Tensor) -> bool:
    """Whether a checkpoint may lack `key`: a BatchNorm's num_batches_tracked (an integer scalar), which
    checkpoints from torch before 0.4.1 and converted state dicts lack and load_state_dict fills in."""
    return key.rpartition(".")[2] == "num_batches_tracked" and ref.dim() == 0 and not ref.is_floating_point()


def _check_tied(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], skip: AbstractSet[str], name: str
) -> None:
    """ValueError when the checkpoint holds a tied second name (in `skip`: head.weight tied to
    emb.weight) whose tensor differs from its first name's: the model can hold only one of them
    (load_state_dict would keep the later name's, tracin uses the first name's)."""
    held = [k for k in reference if k in skip and k in state]
    if not held:
        return
    first_of: dict[tuple, str] = {}
    for key, ref in reference.items():
        if key not in skip and not ref.is_meta:
            first_of.setdefault(_place(ref), key)
    for key in held:
        first = first_of.get(_place(reference[key]))
        if first is None or first not in state:
            continue
        a, b = state[first].detach(), state[key].detach()
        if b.is_meta:
            raise ValueError(f"{name}: {key} is a meta tensor (no data); give the checkpoint's real tensors")
        if a.shape != b.shape or not _same(a.to(device=b.device, dtype=b.dtype), b):
            raise ValueError(
                f"{name}: {key} is tied to {first} in the model (one tensor under both names) but differs "
                f"from it in the checkpoint, and the model can hold only one of them: a checkpoint of an "
                f"untied model, or saved after the tie was broken. Give a checkpoint whose {key} equals "
                f"{first}, or drop {key} from it"
            )


def _place(t: torch.Tensor) -> tuple:
    """Where a state_dict tensor's data is (tied names share it)."""
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _read_file(path: str | os.PathLike, device: Any, name: str, missing: str, sniff: bool = False) -> Any:
    """torch.load(weights_only=True) of a checkpoint file, given the file _open_regular opened (a FIFO
    swapped in after the fingerprint is refused, not waited on); with `sniff`, a file that starts as
    a safetensors file does is read with safetensors.torch.load_file. Errors name it (`missing`: how a
    missing file is reported, before its path). torch.load of a path opens a Python file object
    itself: reading the one opened here is no slower (384 MB in 0.12-0.22 s either way)."""
    with _open_regular(path, name, missing) as f:
        if sniff and _safetensors_head(f.read(9)):
            return _load_safetensors(f, path, device, name, sniffed=True)
        f.seek(0)
        try:
            return torch.load(f, map_location=device, weights_only=True)
        except pickle.UnpicklingError as e:
            f.seek(0)
            raise ValueError(_refused(e, name, path, f.read(512))) from None
        except (KeyError, IndexError, struct.error) as e:  # torch's unpickler on bytes no pickle starts with ('h', 'j')
            f.seek(0)
            head = f.read(512)
            if not _torch_head(head):
                raise ValueError(_refused(e, name, path, head)) from None
            _unreadable(e, name, path)
        except _UNREADABLE as e:
            _unreadable(e, name, path)


def _open_regular(path: str | os.PathLike, name: str, missing: str) -> BinaryIO:
    """The file `path` open for reading, opened once and without blocking (O_NONBLOCK: a FIFO put in
    its place after it was fingerprinted cannot hang the open), then checked with fstat to be a regular
    file and made blocking. ValueError naming checkpoint `name` for a FIFO, device or socket (refused
    unread) and another failed open (_unreadable); FileNotFoundError "<missing> at <path>" for no file."""
    try:
        f = open(path, "rb", opener=_open_nonblocking)  # closed by the caller
    except FileNotFoundError:
        raise FileNotFoundError(f"{missing} at {os.path.abspath(path)}") from None
    except OSError as e:  # a folder, no permission
        _unreadable(e, name, path)
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise ValueError(
            f"{_cannot_read(name, path)}: not a regular file (a FIFO, device or socket, put in the checkpoint's "
            "place?): refused unread"
        )
    if _NONBLOCK:
        os.set_blocking(f.fileno(), True)
    return f


_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def _open_nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | _NONBLOCK)


_LFS_POINTER = b"version https://git-lfs"
# how the legacy (non-zip) format starts when saved with pickle_protocol 0 or 1: torch's magic number
# pickled as text (LONG opcode 'L'), which torch.load(weights_only=True) does not read ("Unsupported operand 76")
_TEXT_MAGIC = b"L119547037146038801333356L\n."


def _refused(e: Exception, name: str, path: str | os.PathLike, head: bytes) -> str:
    """What to say when torch.load(weights_only=True) refuses file `path`, which starts with `head`
    (its first 512 bytes, read from the file torch.load was given): that it is not a torch.save
    file at all when it starts as none does (a zip archive; the legacy format: a pickle of protocol 2
    or later, or torch's magic number as text for protocols 0 and 1; a tar archive: the oldest), naming
    its first bytes (a Git LFS pointer left by a clone without `git lfs pull`, a NumPy .npy file, text);
    else that weights_only=True refused a pickled object, with torch's first line and its
    WeightsUnpickler line (the object refused), and for a legacy file of protocol 0, 1, 4 or 5 (which
    weights_only=True refuses whatever it holds) that its protocol is why."""
    text_pickle = head.startswith(_TEXT_MAGIC)
    framed = head[:2] in (b"\x80\x04", b"\x80\x05")  # torch's magic number in a FRAME (operand 149)
    torch_file = _torch_head(head)
    where = name if f"({os.fspath(path)})" in name else f"{name} ({os.path.abspath(path)})"
    if not torch_file:
        hint = (
            ": a Git LFS pointer, not the file it stands for; run `git lfs pull` in its repository"
            if head.startswith(_LFS_POINTER)
            else ": a NumPy .npy file"
            if head.startswith(b"\x93NUMPY")
            else ": a safetensors file"
            if _safetensors_head(head)
            else ""
        )
        return f"{where} is not a torch.save file (it starts with {head[:40]!r}{hint})"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch's bold markers
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    at = next((i for i, line in enumerate(lines) if "WeightsUnpickler error:" in line), None)
    detail = "" if at is None else lines[at].partition("WeightsUnpickler error:")[2].strip()
    if at is not None and not detail and at + 1 < len(lines):  # torch 2.6+ puts some causes on the next line
        detail = lines[at + 1]
    protocol = "0 or 1" if text_pickle else str(head[1]) if framed else None
    protocol = (
        f"; it is a legacy torch.save file of pickle_protocol {protocol}, which weights_only=True cannot read "
        "whatever it holds: save it again with the default protocol"
        if protocol
        else ""
    )
    return (
        f"{_cannot_read(name, path)} with torch.load(weights_only=True), which only allows tensors and plain "
        f"containers: {lines[0] if lines else type(e).__name__}"
        + (f" ({detail})" if detail else "")
        + protocol
        + (
            ". Rather than allow-listing it for torch: if you trust the file, load it yourself with "
            "torch.load(path, weights_only=False) and pass "
            + (
                "the optimizer state it holds (ckpt['optimizer_states'][0] of a Lightning checkpoint, "
                "ckpt['optimizer'] of a general one)"
                if "(optimizer state)" in name
                else "the state_dict it holds (ckpt['state_dict'] of a Lightning checkpoint, model.state_dict() of "
                "a torch.save(model) file)"
            )
            if "global" in detail.lower() and not protocol
            else ""
        )
    )


def _torch_head(head: bytes) -> bool:
    """Whether a file starting with `head` starts as a torch.save file does (a zip archive; the legacy
    format: a pickle of protocol 2 or later, or torch's magic number as text; a tar archive)."""
    if _safetensors_head(head):  # a header of 128 bytes (mod 256) starts with b"\x80", as pickles do
        return False
    return head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" or head.startswith(_TEXT_MAGIC) or head[257:262] == b"ustar"


def _safetensors_head(head: bytes) -> bool:
    """Whether a file starting with `head` starts as a safetensors file does: the size of its JSON header
    (8 bytes, little-endian; at most 100 MB, safetensors' own bound), then the header's '{'."""
    return len(head) > 8 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= 100_000_000


# what torch.load and safetensors raise for a damaged file (an OSError from a truncated zip archive)
_UNREADABLE = (RuntimeError, OSError, EOFError)


def _unreadable(e: Exception, name: str, path: str | os.PathLike) -> None:
    """ValueError naming checkpoint `name`, the file and the cause; failures of the device (out of
    memory, 'CUDA error: ...') as they are."""
    if device_failure(e):
        raise e
    if str(e):
        cause = str(e).splitlines()[0]
    else:
        cause = "the file ends early: cut short" if isinstance(e, EOFError) else type(e).__name__
    raise ValueError(f"{_cannot_read(name, path)}: {cause}") from e


def _cannot_read(name: str, path: str | os.PathLike) -> str:
    """'<name> cannot be read', with the file's path unless `name` already shows it."""
    return f"{name} cannot be read" + ("" if f"({os.fspath(path)})" in name else f" ({os.path.abspath(path)})")


def _read_folder(path: str | os.PathLike, device: Any, name: str) -> dict[str, torch.Tensor]:
    """The state dict of a Hugging Face save_pretrained folder, from its weight files alone
    (tracin._export.pretrained_folder, which the export's fingerprint digests too)."""
    found = weight_files(path, name)
    if found is None:
        raise without_weights(path, name)
    assigned = found.weight_map  # a shard's tensors the index assigns to another shard (a stale copy left by
    # a save with other sharding) are left out: the index says which file holds each weight
    state: dict[str, torch.Tensor] = {}
    for f in found.files:
        shard = _read_shard(os.path.join(path, f), device, found.safetensors, name)
        state.update(shard if assigned is None else {k: t for k, t in shard.items() if assigned.get(k) == f})
    return state


def _read_shard(path: str, device: Any, safe: bool, name: str) -> dict[str, torch.Tensor]:
    missing = f"{name}: no shard listed by its index"
    if not safe:
        return _unwrap(_read_file(path, device, name, missing), name)
    return _read_safetensors(path, device, name, missing)


def _read_safetensors(path: str, device: Any, name: str, missing: str) -> dict[str, torch.Tensor]:
    with _open_regular(path, name, missing) as f:
        return _load_safetensors(f, path, device, name)


def _load_safetensors(
    f: BinaryIO, path: str | os.PathLike, device: Any, name: str, sniffed: bool = False
) -> dict[str, torch.Tensor]:
    """safetensors.torch.load_file of safetensors file `path`, open as `f` (_open_regular); errors name
    checkpoint `name` and the file, and (`sniffed`: a file taken for safetensors by its first bytes,
    not by a folder's file name) why it was read as one."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError(f"{_cannot_read(name, path)}: {_NO_SAFETENSORS}") from None
    from safetensors import SafetensorError

    # safetensors opens a path itself: the descriptor's (/dev/fd/N, that very file), else the path
    opened = f"{_FD_FOLDER}/{f.fileno()}" if os.path.isdir(_FD_FOLDER) else path
    try:
        return load_file(opened, device=str(device))
    except SafetensorError as e:  # safetensors' words alone do not say why it was read as one
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        why = " (its first bytes, an 8-byte header length then '{', make it one)" if sniffed else ""
        raise ValueError(f"{_cannot_read(name, path)}: as a safetensors file{why}: {cause}") from e
    except _UNREADABLE as e:
        _unreadable(e, name, path)


_NO_SAFETENSORS = "it is a safetensors file, which needs the safetensors package: pip install safetensors"
_FD_FOLDER = "/dev/fd"  # Linux, macOS, the BSDs: opening /dev/fd/N opens what descriptor N is open on
