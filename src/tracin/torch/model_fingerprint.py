"""A fingerprint of a model's structure, so a store resumed after the model was edited is refused."""

from __future__ import annotations

import hashlib

from torch import nn

from .._export.fingerprint import without_addresses


def model_digest(model: nn.Module) -> str:
    """Digest (hex) of every submodule's name, type (qualified) and settings (extra_repr: sizes,
    strides, slopes...), and of its own parameters' and buffers' names, shapes and dtypes. The
    values are not included (the checkpoints are fingerprinted on their own); nor is the source
    code of a forward method."""
    h = hashlib.blake2b(digest_size=16)
    for name, module in model.named_modules(remove_duplicate=False):
        kind = type(module)
        h.update(f"{name}:{kind.__module__}.{kind.__qualname__}({without_addresses(module.extra_repr())});".encode())
        for pname, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            h.update(f"{pname}{tuple(t.shape)}{t.dtype};".encode())
    return h.hexdigest()
