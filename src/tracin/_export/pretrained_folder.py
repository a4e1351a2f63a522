"""The files a Hugging Face `save_pretrained` folder holds its weights in: what tracin.torch reads from
such a folder, and all the export fingerprints of it (a Trainer's checkpoint-N/ folder also holds the
optimizer, scheduler and RNG states, which neither needs)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..store._format import shallow_json_loads

# In the order looked for: (single weights file, index of its shards, safetensors format)
_LAYOUTS = (
    ("model.safetensors", "model.safetensors.index.json", True),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", False),
)


@dataclass(frozen=True)
class WeightFiles:
    """files: the weight files (names relative to the folder) in reading order; index: the shard index
    read to list them (None for a single file); safetensors: their format; weight_map: the index's
    tensor name -> shard file (None for a single file)."""

    files: list[str]
    index: str | None
    safetensors: bool
    weight_map: dict[str, str] | None = None

    @property
    def read(self) -> list[str]:
        """Every file a loader reads: the index (if any), then the weights."""
        return ([self.index] if self.index else []) + self.files


def weight_files(path: str | os.PathLike, name: str) -> WeightFiles | None:
    """The weight files of folder `path`: model.safetensors, or the shards its index lists; else
    pytorch_model.bin, or its shards. None when it holds none of them. Errors name the checkpoint as
    `name`: ValueError for an unreadable index or one listing a shard that is not a plain file name in
    the folder ("../x", "/abs/x", "sub/x": save_pretrained writes none, and no file outside the folder
    is read), FileNotFoundError for a shard it lists but is absent."""
    for single, index, safe in _LAYOUTS:
        if os.path.isfile(os.path.join(path, single)):
            return WeightFiles([single], None, safe)
        if os.path.isfile(os.path.join(path, index)):
            weight_map = _weight_map(os.path.join(path, index), name)
            files = list(dict.fromkeys(weight_map.values()))  # in first-use order
            for f in files:
                if not _plain_name(f):
                    raise ValueError(
                        f"{name}: {index} in the checkpoint folder {os.fspath(path)} lists the shard {f!r}, which is "
                        "not a file name in the folder (save_pretrained writes plain names: no folders, '..' or "
                        "absolute paths)"
                    )
            for f in files:
                if not os.path.isfile(os.path.join(path, f)):
                    raise FileNotFoundError(f"{name}: no shard listed by its index at {os.path.join(path, f)}")
            return WeightFiles(files, index, safe, weight_map)
    return None


def without_weights(path: str | os.PathLike, name: str) -> ValueError:
    """The error for a folder given as checkpoint `name` whose weight_files are None (a training run's
    directory, a PEFT adapter's folder), told from its file names alone: raised before the export digests
    (reads) every file under such a folder."""
    adapter = next((f for f in ADAPTER_FILES if os.path.isfile(os.path.join(path, f))), None)
    return ValueError(
        f"{name} is a directory without model.safetensors, pytorch_model.bin or their sharded index "
        "(*.index.json): give a Hugging Face save_pretrained folder, a checkpoint file or a state_dict"
        + (f". {DCP_HINT}" if is_dcp_folder(path) else "")
        + (
            f". It holds {adapter}, a PEFT adapter's weights alone: load it into the PeftModel "
            "(PeftModel.from_pretrained, or peft.set_peft_model_state_dict) and give a copy of the whole state "
            "for each checkpoint: {k: v.clone() for k, v in model.state_dict().items()}"
            if adapter
            else ""
        )
    )


# what PEFT's save_pretrained writes: the adapter's weights, without the model's
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")

DCP_HINT = (
    "It is a torch.distributed.checkpoint (DCP) folder (.metadata, *.distcp), which is not read directly: "
    "load it with dcp.load into {'model': get_model_state_dict(model), 'optim': get_optimizer_state_dict(model, "
    "optimizer)} (torch.distributed.checkpoint.state_dict; the keys the save used) and pass those dicts, or "
    "convert it once with torch.distributed.checkpoint.format_utils.dcp_to_torch_save(folder, 'ckpt.pt') and "
    "pass that file as the weights and as the optimizer state"
)


def is_dcp_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by torch.distributed.checkpoint.save (its .metadata file)."""
    try:
        return os.path.isfile(os.path.join(path, ".metadata")) and any(f.endswith(".distcp") for f in os.listdir(path))
    except OSError:  # a folder this process may enter but not list: the error it is part of, without the hint
        return False


def _plain_name(f: object) -> bool:
    """Whether a shard name is a plain file name, naming a file in the index's own folder."""
    return (
        isinstance(f, str)
        and f not in ("", ".", "..")
        and "\0" not in f
        and not any(sep in f for sep in ("/", "\\", os.sep, os.altsep) if sep)
        and not os.path.isabs(f)
        and os.path.basename(f) == f
    )


def _weight_map(index_path: str, name: str) -> dict[str, str]:
    """The weight_map of a sharded save_pretrained index: tensor name -> its shard file. Its JSON may nest
    at most MAX_JSON_DEPTH levels, as the store's (json's recursion limit would end a deeper one in a
    RecursionError naming nothing)."""
    try:
        with open(index_path) as f:
            return dict(shallow_json_loads(f.read())["weight_map"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ValueError(f"{name}: {os.path.basename(index_path)} is not a sharded checkpoint index ({e})") from None
