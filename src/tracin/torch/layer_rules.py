"""Per-example parameter gradients of the layer types transformers are made of, from captured calls.

A rule first brings one captured call (capture.Call) to token form: an input a (B, T, in) and an
output gradient b (B, T, out) over the T positions the layer ran on in each example (T = 1 for a
layer applied once per example). From there, example i's gradients are

    nn.Linear       y = x W^T + c      dW_i = sum_t b_it a_it^T  (out, in)    dc_i = sum_t b_it
    HF Conv1D       y = x W + c        dW_i = sum_t a_it b_it^T  (in, out)    dc_i = sum_t b_it
    nn.Embedding    y = W[ids]         dW_i = rows ids_it of zeros, b_it scatter-added (padding row 0)
    nn.LayerNorm    y = x_hat w + c    dw_i = sum_t b_it * x_hat_it           dc_i = sum_t b_it

(a is the ids (B, T) for Embedding and the normalised input x_hat for LayerNorm). Only modules
running their type's own forward are covered; subclasses that override it are not. The token form
is also what a per-token projection takes, so it never needs the (out, in) matrices. A module holding
parameters besides weight and bias (torch.nn.utils.weight_norm's weight_g and weight_v) is not covered.

write_per_example_grad puts the gradients straight into (or adds them to) a destination view, such as
the parameter's columns of the (B, d) export rows: no (B, *shape) temporary, and a tied weight's
holders (GPT-2's Embedding and lm_head) accumulate in place.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .capture import Call, NotCaptured
from .first_rows_check import _autocast_dtype

Tokens = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class _Rule:
    tokens: Callable[[nn.Module, Call, int], Tokens]
    write: Callable[[nn.Module, torch.Tensor, torch.Tensor, str, torch.Tensor, bool], None]


def covers(module: nn.Module) -> bool:
    """Whether the per-example gradients of `module`'s own parameters follow from its calls: a layer type
    below running its own forward whose own parameters are among weight and bias (not_covered)."""
    return _rule_of(module) is not None and not _other_parameters(module)


def not_covered(module: nn.Module) -> str | None:
    """Why a module of a layer type below is not covered (None for a covered module or another type): own
    parameters besides weight and bias, as the weight_g, weight_v of torch.nn.utils.weight_norm and the
    weight_orig of spectral_norm, from which a forward pre-hook computes the weight the forward uses (the
    rules give the gradient of that weight, not of those parameters)."""
    other = _other_parameters(module) if _rule_of(module) is not None else []
    if not other:
        return None
    return (
        f"holds parameters {', '.join(other)} besides weight and bias (torch.nn.utils.weight_norm or "
        "spectral_norm?), whose per-example gradients the hooks do not give"
    )


def _other_parameters(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters(recurse=False) if n not in ("weight", "bias")]


def token_form(module: nn.Module, call: Call, rows: int) -> Tokens:
    """(a (B, T, in) or ids (B, T), b (B, T, out)) of one call of a covered module on `rows` examples;
    NotCaptured if the call's tensors are not batch-first or the module is not covered."""
    rule = _rule_of(module)
    if rule is None:
        raise NotCaptured(f"{type(module).__name__} is not a layer type the hooks cover")
    why = not_covered(module)
    if why is not None:
        raise NotCaptured(f"{type(module).__name__} {why}")
    return rule.tokens(module, call, rows)


def per_example_grad(module: nn.Module, leaf: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, *shape) gradients of the parameter `leaf` ("weight" or "bias") of a covered module, from
    one call's token form, in the dtype of b, or of a where it is wider (_computed_in)."""
    out = b.new_empty((b.shape[0], *getattr(module, leaf).shape), dtype=_computed_in(a, b))
    write_per_example_grad(module, leaf, a, b, out, accumulate=False)
    return out


def write_per_example_grad(
    module: nn.Module, leaf: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool
) -> None:
    """per_example_grad written into `out` (B, *shape), or added to it when `accumulate`; `out` may be
    a strided view (its last dimension contiguous) and of another dtype than the one computed in. Outside
    the caller's torch.autocast (which casts the products to its dtype, not out's): under it a layer's
    input a is float32 and its output gradient b bfloat16, computed in float32."""
    dtype = _computed_in(a, b)
    if out.dtype != dtype:  # computed in the layer's dtype, converted once
        part = per_example_grad(module, leaf, a, b)
        if accumulate:
            out.add_(part)
        else:
            out.copy_(part)
        return
    a = a.to(dtype) if a.is_floating_point() else a  # an Embedding's ids stay integers
    with _autocast_off(out.device):
        _rule_of(module).write(module, a, b.to(dtype), leaf, out, accumulate)


def _computed_in(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """The dtype a call's gradients are computed in: b's, or floating a's where it is wider (autocast)."""
    return torch.promote_types(a.dtype, b.dtype) if a.is_floating_point() else b.dtype


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast disabled on `device` (CPU, CUDA) where the caller's is on; else nothing (entering an
    autocast context costs a few microseconds, twice a hooked parameter and pass)."""
    if device.type in ("cpu", "cuda") and _autocast_dtype(device.type) is not None:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def mixes_examples(module: nn.Module) -> bool:
    """Whether `module` in its current mode makes one example's output depend on the others of the
    batch (BatchNorm normalising with batch statistics: in training mode, or without running stats)."""
    batch_norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return isinstance(module, batch_norms) and (module.training or module.running_mean is None)


def _rule_of(module: nn.Module) -> _Rule | None:
    kind = type(module)
    if issubclass(kind, nn.Linear) and kind.forward is nn.Linear.forward:
        return _LINEAR
    if kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers."):
        return _CONV1D
    if (
        issubclass(kind, nn.Embedding)
        and kind.forward is nn.Embedding.forward
        and module.max_norm is None
        and not module.scale_grad_by_freq
    ):
        return _EMBEDDING
    if issubclass(kind, nn.LayerNorm) and kind.forward is nn.LayerNorm.forward:
        return _LAYER_NORM
    return None


def _batch_first(t: torch.Tensor, rows: int, tail: tuple[int, ...], what: str) -> torch.Tensor:
    """`t` as (rows, T, prod(tail)), refusing a tensor that is not (rows, ..., *tail)."""
    if t.dim() < 1 + len(tail) or t.shape[0] != rows or tuple(t.shape[t.dim() - len(tail) :]) != tail:
        raise NotCaptured(f"{what} of shape {tuple(t.shape)} is not (batch={rows}, ..., {', '.join(map(str, tail))})")
    return t.reshape(rows, -1, math.prod(tail))


def _dense_tokens(width_in: Callable[[nn.Module], int], width_out: Callable[[nn.Module], int]):
    def tokens(module: nn.Module, call: Call, rows: int) -> Tokens:
        return (
            _batch_first(call.input, rows, (width_in(module),), "input"),
            _batch_first(call.grad, rows, (width_out(module),), "output gradient"),
        )

    return tokens


def _dense_write(weight_is_out_by_in: bool):
    def write(module: nn.Module, a: torch.Tensor, b: torch.Tensor, leaf: str, out: torch.Tensor, accumulate: bool):
        if leaf != "weight":
            _sum_tokens(b, out, accumulate)
            return
        left, right = (b.transpose(1, 2), a) if weight_is_out_by_in else (a.transpose(1, 2), b)
        if accumulate:
            out.baddbmm_(left, right)
        elif a.shape[1] == 1:  # one position per example (an MLP): an outer product, each entry one rounded
            torch.mul(left, right, out=out)  # product as bmm's, written in place (bmm and a copy took 3.9x as long)
        elif _batched_gemm_pays(out):
            step = _examples_per_temporary(out)
            for start in range(0, out.shape[0], step):
                rows = slice(start, start + step)
                out[rows].copy_(torch.bmm(left[rows], right[rows]))
        else:
            torch.bmm(left, right, out=out)

    return write


# Bytes of the contiguous temporary a dense weight's gradients of several examples are formed in before
# they are copied into strided columns (at least one example per thread, whatever its size).
_TEMPORARY_BYTES = 32 * 2**20


# The largest per-example weight gradient (out * in entries) formed in temporaries; larger gemms use the
# threads on their own. Two threads, 64 examples, copy against in place (medians of 15 interleaved): 1.06-1.8x
# faster up to 256 x 64 with 32-128 tokens (mixed with 1 token), 0.5-0.9x from 256 x 256 up; 0.21x for a
# whole PerExampleGradients call of one Linear(1024, 1024) on 128 examples.
_SMALL_GEMM = 2**14


def _batched_gemm_pays(out: torch.Tensor) -> bool:
    """Whether to form a CPU bmm in contiguous temporaries and copy them into `out` (strided columns):
    there, bmm runs the batched gemm, its examples spread over the threads, where a strided result
    gets one small gemm per example that a second thread does not speed up. Same bits either way; the
    copy costs more than it saves with one thread or a large per-example gemm."""
    return (
        out.device.type == "cpu"
        and torch.get_num_threads() > 1
        and not out.is_contiguous()
        and math.prod(out.shape[1:]) <= _SMALL_GEMM
    )


def _examples_per_temporary(out: torch.Tensor) -> int:
    """How many examples' (out, in) gradients of `out` (B, out, in) one temporary holds: as many as fit in
    _TEMPORARY_BYTES, and at least one per thread so the batched gemm still spreads over them."""
    per_example = math.prod(out.shape[1:]) * out.element_size()
    return max(torch.get_num_threads(), _TEMPORARY_BYTES // max(per_example, 1))


def _sum_tokens(t: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """out (B, *shape) = or += the sum over tokens of t (B, T, prod(shape))."""
    flat = out.view(out.shape[0], -1)
    if accumulate:
        flat.add_(t.sum(1))
    else:
        torch.sum(t, 1, out=flat)


def _embedding_tokens(module: nn.Module, call: Call, rows: int) -> Tokens:
    ids = call.input
    if ids.dtype.is_floating_point or ids.dim() < 1 or ids.shape[0] != rows:
        raise NotCaptured(
            f"ids of shape {tuple(ids.shape)} and dtype {ids.dtype} are not integers of shape (batch={rows}, ...)"
        )
    return ids.reshape(rows, -1), _batch_first(call.grad, rows, (module.embedding_dim,), "output gradient")


def _embedding_write(
    module: nn.Module, ids: torch.Tensor, b: torch.Tensor, leaf: str, out: torch.Tensor, accumulate: bool
) -> None:
    rows, tokens = ids.shape
    if not accumulate:
        out.zero_()
    example = torch.arange(rows, device=ids.device)[:, None].expand(rows, tokens)
    if module.padding_idx is not None:  # torch gives the padding row no gradient
        used = ids != module.padding_idx
        example, ids, b = example[used], ids[used], b[used]
    out.index_put_((example, ids), b, accumulate=True)


def _layer_norm_tokens(module: nn.Module, call: Call, rows: int) -> Tokens:
    shape = tuple(module.normalized_shape)
    x = _batch_first(call.input, rows, shape, "input")
    x_hat = nn.functional.layer_norm(x, (x.shape[-1],), eps=module.eps)
    return x_hat, _batch_first(call.grad, rows, shape, "output gradient")


def _layer_norm_write(
    module: nn.Module, x_hat: torch.Tensor, b: torch.Tensor, leaf: str, out: torch.Tensor, accumulate: bool
) -> None:
    _sum_tokens(x_hat * b if leaf == "weight" else b, out, accumulate)


_LINEAR = _Rule(_dense_tokens(lambda m: m.in_features, lambda m: m.out_features), _dense_write(True))
_CONV1D = _Rule(_dense_tokens(lambda m: m.weight.shape[0], lambda m: m.weight.shape[1]), _dense_write(False))
_EMBEDDING = _Rule(_embedding_tokens, _embedding_write)
_LAYER_NORM = _Rule(_layer_norm_tokens, _layer_norm_write)
