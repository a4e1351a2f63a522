"""A fingerprint of a model, so a store resumed after the model was edited is refused."""

from __future__ import annotations

import hashlib
import types
from typing import Any

import torch
from torch import nn

from .._export.fingerprint import PYTHON, _digest_class_methods, _hasher, without_addresses

_PLAIN = (bool, int, float, str, type(None))


def model_digest(model: nn.Module) -> dict[str, Any]:
    """What an export records of the model (metadata["fingerprints"]["model"]), as a dict:

    "structure": digest (hex) of every submodule's name, type (qualified) and settings (extra_repr:
    sizes, strides, slopes...), and of its own parameters' and buffers' names, shapes and dtypes (the
    whole fingerprint of versions before the others were recorded);
    "settings": {"module.attribute": repr} of each module's public attributes holding a bool, int,
    float, str or None (a custom module's temperature or scale, a Dropout's p), a tensor that is not a
    parameter or buffer (its dtype, shape and value digest) or a function (its qualified name), except `training` and
    `gradient_checkpointing` (modes that leave the gradients as they are: checkpointing turned on to
    resume an export that ran out of memory is the same model) and attributes named *path or *dir
    (where a model was read from: another folder is the same model);
    "buffers": {"module.buffer": digest} of the values of non-persistent buffers (a mask, rotary
    frequencies: in no checkpoint, so not in their digests);
    "code": {"module.Class": "3.11:<digest>"} of the forward and __call__ code of each module class and
    its bases outside torch (and JAX, Flax, Equinox): bytecode, so for that Python version.
    Parameter and persistent buffer values are not included (the checkpoints are fingerprinted on
    their own), nor private attributes (a leading _: where a forward may keep a call counter), other
    objects a module holds (a function's code), helper functions forward calls, or hooks."""
    h = hashlib.blake2b(digest_size=16)
    settings: dict[str, str] = {}
    buffers: dict[str, str] = {}
    code: dict[str, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        kind = type(module)
        h.update(f"{name}:{kind.__module__}.{kind.__qualname__}({without_addresses(module.extra_repr())});".encode())
        for pname, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            h.update(f"{pname}{tuple(t.shape)}{t.dtype};".encode())
        prefix = f"{name}." if name else ""
        for attr, value in sorted(vars(module).items()):
            if _setting(attr, value):
                settings[prefix + attr] = _shown(value)
        for bname in sorted(getattr(module, "_non_persistent_buffers_set", ())):
            t = module._buffers.get(bname)
            if t is not None:
                buffers[prefix + bname] = _tensor_digest(t)
        qualified = f"{kind.__module__}.{kind.__qualname__}"
        if qualified not in code:
            methods = _hasher()
            _digest_class_methods(kind, methods)
            code[qualified] = f"{PYTHON}:{methods.hexdigest()}"
    return {
        "structure": h.hexdigest(),
        "settings": settings,
        "buffers": buffers,
        "code": {k: v for k, v in code.items() if v != f"{PYTHON}:{_hasher().hexdigest()}"},
    }


_NOT_SETTINGS = ("training", "gradient_checkpointing")  # modes that leave the gradients as they are


def _setting(attr: str, value: Any) -> bool:
    """Whether a module's attribute is fingerprinted: a public one (not a mode, not *path / *dir) holding a plain
    value, a tensor (not a parameter or buffer: self.scale = torch.tensor(2.0)) or a function (self.act =
    torch.sigmoid)."""
    if attr.startswith("_") or attr in _NOT_SETTINGS or not isinstance(value, (*_PLAIN, torch.Tensor, *_FUNCTIONS)):
        return False
    return not attr.lower().endswith(("path", "dir"))


_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType, types.MethodType)


def _shown(value: Any) -> str:
    """A setting as recorded: a plain value's repr, a tensor's dtype, shape and value digest, a function's
    qualified name (its code is not digested)."""
    if isinstance(value, torch.Tensor):
        return f"tensor {str(value.dtype).removeprefix('torch.')} {tuple(value.shape)} {_tensor_digest(value)[:16]}"
    if isinstance(value, _FUNCTIONS):
        module = getattr(value, "__module__", None) or getattr(getattr(value, "__self__", None), "__name__", "")
        name = getattr(value, "__qualname__", None) or getattr(value, "__name__", repr(value))
        return f"function {module}.{name}" if module else f"function {name}"
    return without_addresses(repr(value))


def _tensor_digest(t: torch.Tensor) -> str:
    """Digest (hex) of a tensor's dtype, shape and values; "meta" for one without data."""
    if t.is_meta:
        return "meta"
    h = _hasher()
    h.update(f"{t.dtype}{tuple(t.shape)};".encode())
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
