"""The first-batch check shared by the batched gradient paths (hooks, per-token Kronecker projections):
their rows on the first rows of the first batch against per-example autograd, one example at a time."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.utils._pytree import tree_leaves

from .._retyped import retyped
from .capture import device_failure, probe_forward
from .data import Tree, call_model, doubled, slice_rows, tree_map
from .losses import LossFn, losses_of, model_caller, refuse_checkpointing

CHECKED_ROWS = 2  # rows of the first batch recomputed one by one (>= 2 sees a layer mixing the examples)
# |got - want| <= rtol |want| + atol * (largest |want| of the compared columns; for a Kronecker segment at
# least the size its projected numbers have without cancellation: token_projection._spread). float32 and float64:
# RTOL and ATOL. A bfloat16 / float16 model's batched rows round as its dtype does, so the reference is
# taken in float32 (the 16-bit state and floating inputs widened for the reference pass only, the
# user's model untouched; a few 1e-7 off float64), and per-example autograd is run in the model's own
# dtype too: its gap to the float32 reference is what the model's own rounding gives, growing with depth
# and tokens. atol is the larger of 2 eps of the coarsest dtype and OWN_FACTOR times that gap (of the
# same compared columns). Measured, hook gap / own-dtype gap on full rows: <= 1.08 clean (bfloat16 and
# float16, GPT-2 12 layers at 512 tokens, 20-layer MLPs, Embedding-Linear-LayerNorm-Linear at 16-1024
# tokens); a layer mixing the examples by 10% of a batch mean: 2.6 at 1024 tokens, 12 at 16 (float16:
# 18, 60) with 2 threads; with 1 thread the own-dtype gap is larger and 10% at 1024 tokens passes
# (20% is caught with both; tests/torch/test_first_rows_check.py). A mixing of 5% at 1024 tokens (1.34)
# passes: a coupling below the model's own rounding is accepted. (A Kronecker segment's few projected
# numbers make a noisy gap: token_projection._own_gap.)
# A model that cannot run widened (a cast to bfloat16 inside its forward meets a float32 weight), or
# whose forward runs under torch.autocast, is checked against its own (autocast's) dtype alone: atol
# max(2 eps, eps / 2 * sqrt(T)) = max(4 u, u sqrt(T)), u = eps / 2 that dtype's unit roundoff (bfloat16 2^-8,
# float16 2^-11). Both sides round in it: the reference's T-term sums and the batched pass's, whose per-token
# output gradients flip by an ulp where its GEMMs sum in another order than one example's (another thread
# count, another batch), and a sum cancelling over the tokens (LayerNorm's weight) keeps those flips, ~u sqrt(T)
# of its terms' size. Measured, the clean gap over u sqrt(T) of the compared scale (MLPs with a LayerNorm and
# token models, T = 1 to 512, bfloat16 and float16, 1 and 2 threads, ~500 runs, fx227 and fr242): <= 0.86 (one
# thread, T = 7: 2.3 u, under the 4 u floor), <= 0.12 from 7 to 512 tokens on fr242's models; eps / 4 * sqrt(T)
# (0.5) gave the hooks up at T = 7 (tests/torch/test_per_example.py), eps * sqrt(T) (2) let a layer mixing the
# examples by 10% of a batch mean through at 256 tokens (1.5). That mixing (bfloat16): 12 at T = 1, 8 at 16,
# 2.8 at 64, 1.5 at 256 (all caught), float16 10.5; each batch's outputs batched vs alone are compared too. A
# head's weight also used outside its forward by 30%: 10-14 at 16, 4-7 at 64, 1.7-3.5 at 256 (and the sum check
# of every hooked pass, hook_gradients._unsummed, sees it: 10x its tolerance).
# A gradient that cancels upstream of its layer is float32 noise on both sides: T5's decoder q and k with one
# key (softmax over one position), whose output gradient is the rounding of a fused attention backward, eps
# times sizes the layer's hooks never see (|dO| |V| |K|); its own size, or its inputs' and output gradients',
# does not bound that noise. A float32 Kronecker segment that disagrees is looked at again in float64
# (in_float64, token_projection.KroneckerRows._beyond_rounding): rounding shrinks there by eps64 / eps32 ~ 2e-9,
# a layer mixing the examples or a weight also used elsewhere does not; it is refused when the float64 rows
# still disagree beyond atol times the size of its float32 numbers (either side's: at least its noise) or
# their own. torch mode='full' looks at model outputs that differ batched vs alone the same way before taking a
# batch as depending on the rest of it (per_example.PerExampleGradients._beyond_rounding), and so at hooked rows
# that disagree in float32 before giving the hooks up (_disagree_in_float64), as mode='factored' / 'last_layer' at
# their factors (last_layer.LinearFactors._verdict_widened; not under the caller's torch.autocast): a well-fit
# float32 regression's residual (output - target, 1e-4 of outputs ~1) differs batched vs alone by float32 rounding.
RTOL, ATOL = 1e-4, 1e-5
OWN_FACTOR = 1.5


def tolerances(dtype: torch.dtype, tokens: int = 1, widened: bool = True, own_gap: float = 0.0) -> tuple[float, float]:
    """(rtol, atol) of the check for gradients computed in `dtype`, each summed over `tokens` positions,
    against a reference `widened` to float32 (else one in `dtype` itself); `own_gap`: the largest
    |own-dtype autograd - widened reference| over the largest |reference| of the compared columns."""
    eps = torch.finfo(dtype).eps
    if not counts_tokens(dtype, widened):
        return max(RTOL, eps), max(ATOL, 2 * eps, OWN_FACTOR * own_gap)
    return eps, max(2 * eps, eps / 2 * math.sqrt(max(tokens, 1)))


def coarsest(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """The floating dtype of `tensors` with the largest eps (float32 when none is floating)."""
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=torch.float32)


def tokens_of_one(model: nn.Module, layers: Sequence[str], state: Mapping[str, torch.Tensor], one: Tree) -> int:
    """The most positions (tokens) a gradient of one of `layers` sums over for one example: per layer,
    its calls' output elements over the last (feature) dimension, summed over calls; from a forward
    pass without gradients (capture.probe_forward) of `one`, the inputs of one example (batch size 1)."""
    modules = dict(model.named_modules())
    counts = dict.fromkeys(layers, 0)

    def counter(name: str):
        def count(module, args, output):
            if isinstance(output, torch.Tensor):
                counts[name] += output.numel() // output.shape[-1] if output.dim() > 1 and output.shape[-1] else 1

        return count

    handles = [modules[n].register_forward_hook(counter(n)) for n in layers]
    try:
        probe_forward(model, state, one, lambda: counts.update(dict.fromkeys(layers, 0)))
    finally:
        for h in handles:
            h.remove()
    return max(counts.values(), default=1)


def tokens_counted(
    reference: Reference, model: nn.Module, layers: Sequence[str], state: Mapping[str, torch.Tensor], one: Tree
) -> int:
    """tokens_of_one where the tolerance depends on it (a 16-bit reference that was not widened:
    tolerances), else 1 without its forward pass."""
    return tokens_of_one(model, layers, state, one) if counts_tokens(reference.dtype, reference.own is not None) else 1


def counts_tokens(dtype: torch.dtype, widened: bool) -> bool:
    """Whether the tolerance grows with the tokens summed: a 16-bit reference that was not widened."""
    return not widened and torch.finfo(dtype).eps > torch.finfo(torch.float32).eps


DIRECTIONS = 3  # random (u, v) pairs a factored layer is checked along
_DIRECTION_SEED = 0


def directions(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """DIRECTIONS standard Gaussian float32 pairs (u, v) for a (rows, cols) matrix, as U (DIRECTIONS,
    rows) and V (DIRECTIONS, cols): the same on every call and device (a fixed-seed CPU generator)."""
    generator = torch.Generator().manual_seed(_DIRECTION_SEED)
    u, v = (torch.randn(DIRECTIONS, n, generator=generator, device="cpu") for n in (rows, cols))
    return u.to(device), v.to(device)


def directions_agree(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when every directional derivative `got` (factors) is within rtol (|want| + scale) of `want`
    (autograd), rtol of the check for `dtype`, `scale` the size a derivative along Gaussian directions
    typically has (||u|| ||v|| ||left|| ||right|| / sqrt(len(u) len(v))); or both hold the same
    non-finite value. All float64 tensors of one shape."""
    return bool(_excess(got, want, tolerances(dtype)[0], scale).max().item() <= 0)  # False for NaN


def checked_rows(inputs: Tree, targets: Tree, batch: int) -> tuple[Tree, Tree, int]:
    """The first min(CHECKED_ROWS, batch) rows of a batch: (inputs, targets, their count)."""
    rows = min(CHECKED_ROWS, batch)
    return slice_rows(inputs, 0, rows), slice_rows(targets, 0, rows), rows


def example_gradients(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    names: Sequence[str],
    loss_fn: LossFn,
    inputs: Tree,
    targets: Tree,
    rows: int,
) -> Iterator[list[torch.Tensor]]:
    """For example i = 0 .. rows - 1 in turn, the dense gradients of its loss w.r.t. `names` (in that
    order, zeros for an unused parameter, all zeros where its loss depends on none of them: a per-example
    branch, a routed expert), by torch.autograd.grad on that example alone; ValueError for a model
    checkpointing its activations (losses.refuse_checkpointing). A model or loss failing on one row
    that runs on two raises its error saying so (one_row_error)."""
    leaves = {n: state[n].detach().requires_grad_(True) for n in names}
    for i in range(rows):
        x, y = slice_rows(inputs, i, i + 1), slice_rows(targets, i, i + 1)
        with torch.enable_grad():
            try:
                loss = losses_of(model, {**state, **leaves}, loss_fn, x, y).sum()
            except Exception as e:
                explained = one_row_error(e, model, state, loss_fn, x, y)
                if explained is None:
                    raise
                raise explained from e
            if loss.grad_fn is None:  # the example's loss depends on none of `names` (a branch, a routed expert)
                parts = [None] * len(names)
            else:
                try:
                    parts = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
                except RuntimeError as e:
                    refuse_checkpointing(e)
                    explained = one_row_error(e, model, state, loss_fn, x, y, backward=names)
                    if explained is None:
                        raise
                    raise explained from e
        # nn.Embedding(sparse=True) gives a sparse gradient
        yield [_dense(g, leaves[n]) for n, g in zip(names, parts, strict=True)]


def one_row_error(
    e: Exception,
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    loss_fn: LossFn,
    inputs: Tree,
    targets: Tree,
    backward: Sequence[str] = (),
) -> Exception | None:
    """For `e`, raised by the model and loss on one example (`inputs`, `targets`: a batch of one row), an
    error of the same type (a ValueError where that type cannot be built from a message) adding that
    tracin ran them on a batch of one row, when they run on that example twice (a batch of two rows);
    naming the model's output that loses dimensions at one row (.squeeze() without a dim: 0-d where the
    loss expects (1,)) when there is one, and the model's BatchNorm modules without running statistics
    (they normalize over the batch in eval mode too). None (raise `e` as it is) when they fail on two rows too, for
    the device's failures and out of memory. Reruns the passes: for an error about to be raised only;
    `backward`: for an error of the backward pass, the parameters whose gradients it took (rerun too)."""
    if device_failure(e) or isinstance(e, MemoryError):
        return None
    twice = [doubled(tree) for tree in (inputs, targets)]
    try:
        with torch.enable_grad():
            leaves = {n: state[n].detach().requires_grad_(True) for n in backward}
            loss = losses_of(model, {**state, **leaves}, loss_fn, *twice).sum()
            if leaves and loss.grad_fn is not None:
                torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    except Exception:
        return None  # not about one row
    dropped = _dimensions_dropped(_output_shapes(model, state, inputs), _output_shapes(model, state, twice[0]))
    if dropped:
        cause = (
            f"the model's output has shape {dropped[0]} on one row and {dropped[1]} on two: a batch dimension "
            "dropped at one row, likely by .squeeze() without a dim (an output squeezed to 0-d); keep it with "
            ".squeeze(-1) or .flatten()"
        )
    else:
        cause = "they run on two rows (the same example twice)"
    batch_stats = batch_statistics_note(model)
    if batch_stats is not None:
        cause += f"; {batch_stats}"
    message = (
        f"{e}\n(tracin runs the model and loss_fn on single examples, a batch of one row, for per-example "
        f"gradients and their check; this failed there, while {cause})"
    )
    return retyped(e, message)


def batch_statistics_note(model: nn.Module) -> str | None:
    """What to do about the model's BatchNorm modules without running statistics, which normalize over the
    batch even in eval mode (no per-example gradient for an example alone); None when it has none."""
    names = [
        n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
    ]
    if not names:
        return None
    verb = "normalizes" if len(names) == 1 else "normalize"
    return (
        f"{', '.join(repr(n) for n in names)} (BatchNorm without running statistics) {verb} over the batch even "
        "in eval mode, which tracin runs the model in: an example alone has no per-example gradient there, "
        "whatever layers= chooses; give them running statistics (track_running_stats=True) or use a per-example "
        "norm (LayerNorm, GroupNorm)"
    )


def _output_shapes(model: nn.Module, state: Mapping[str, torch.Tensor], inputs: Tree) -> list[tuple] | None:
    """The shapes of the tensors of the model's output on `inputs` (None when the forward fails)."""
    try:
        with torch.enable_grad():
            output = call_model(model_caller(model, state), inputs)
    except Exception:
        return None
    return [tuple(t.shape) for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def _dimensions_dropped(one: list[tuple] | None, two: list[tuple] | None) -> tuple[tuple, tuple] | None:
    """(shape on one row, shape on two) of the first output tensor with fewer dimensions on one row."""
    if one is None or two is None or len(one) != len(two):
        return None
    return next(((a, b) for a, b in zip(one, two, strict=True) if len(a) < len(b)), None)


class Reference(NamedTuple):
    """The check's one-example gradients: `rows` the reference (float32-widened when `own` is not None),
    `own` the same by autograd in the model's own dtypes (None when nothing was widened, or autocast
    ran inside the forward), `dtype` the coarsest dtype they were computed in (the state's, or autocast's)."""

    rows: list[list[torch.Tensor]]
    own: list[list[torch.Tensor]] | None
    dtype: torch.dtype


def reference_gradients(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    names: Sequence[str],
    loss_fn: LossFn,
    inputs: Tree,
    targets: Tree,
    rows: int,
) -> Reference:
    """The check's reference: example_gradients of the first `rows` examples in the model's own dtypes
    and, when `state` holds 16-bit floating tensors, again with those (and the 16-bit floating `inputs`
    and `targets`) widened to float32: copies, made on the first batch only, about 4 bytes per 16-bit
    element of the whole state whatever the chosen layers. Nothing is widened when the model cannot run
    so (a RuntimeError: a cast inside its forward meets a widened weight, or the device has no room) or
    when the copy would not fit in the device's memory (_room_for: on CPU, with a margin). A module run
    under torch.autocast makes the reference one of autocast's dtype, not widened."""
    seen: set[torch.dtype] = set()
    with _autocast_seen(seen):
        own = list(example_gradients(model, state, names, loss_fn, inputs, targets, rows))
        narrow = [t for t in state.values() if _narrow(t)]
        wide = None
        if narrow and not seen and _room_for(narrow):
            try:
                wide = _widened_gradients(model, state, names, loss_fn, inputs, targets, rows)
            except RuntimeError as e:  # torch.cuda.OutOfMemoryError included; the widened copy is freed by now
                if device_failure(e) and not isinstance(e, torch.cuda.OutOfMemoryError):
                    raise
    dtype = coarsest([*state.values(), *(torch.empty(0, dtype=d) for d in seen)])
    return Reference(own, None, dtype) if wide is None else Reference(wide, own, dtype)


@contextmanager
def _autocast_seen(seen: set[torch.dtype]) -> Iterator[None]:
    """Adds to `seen` the dtype of torch.autocast wherever a module's forward starts under it."""

    def look(module, args):
        for device in ("cpu", "cuda"):
            dtype = _autocast_dtype(device)
            if dtype is not None:
                seen.add(dtype)

    handle = register_module_forward_pre_hook(look)
    try:
        yield
    finally:
        handle.remove()


def _autocast_dtype(device: str) -> torch.dtype | None:
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if device == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def active_autocast() -> list[str]:
    """'device dtype' of every torch.autocast active here (CPU, CUDA), e.g. ['cpu bfloat16']."""
    found = ((device, _autocast_dtype(device)) for device in ("cpu", "cuda"))
    return [f"{device} {str(dtype).removeprefix('torch.')}" for device, dtype in found if dtype is not None]


def autocast_note() -> str:
    """For a check's failure: ' (under torch.autocast ...: its rounding may be the cause)', when one is active."""
    active = active_autocast()
    if not active:
        return ""
    return (
        f" (the export runs under torch.autocast, {', '.join(active)}: its low-precision rounding may be the "
        "cause; call export_gradients outside autocast)"
    )


def available_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated on `device` now: CUDA's free memory; on CPU, Linux's MemAvailable
    (/proc/meminfo: free memory and the page cache it can drop), else the free pages os.sysconf counts. None
    where unknown (another device or system): no check is made there."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


# a copy made on CPU leaves this much of it again free: the widened model's activations and per-example
# gradients, and the rest of the process (CPU memory runs out in the OOM killer, not in an error to catch)
CPU_MARGIN = 2


def _copy_bytes(tensors: list[torch.Tensor], size: int) -> int:
    return sum(size * t.numel() for t in tensors)


def _room_for(narrow: list[torch.Tensor], size: int = 4) -> bool:
    """False when copies of `narrow` of `size` bytes per element (float32: 4) would not fit in the free memory
    of their CUDA device, or, on CPU, CPU_MARGIN times them in its available memory (available_memory; True
    where that is unknown, an allocation failure being caught instead)."""
    device = narrow[0].device
    free = available_memory(device)
    if free is None:
        return True
    return _copy_bytes(narrow, size) * (CPU_MARGIN if device.type == "cpu" else 1) < free


def float64_room(state: Mapping[str, torch.Tensor]) -> str | None:
    """None when in_float64's copy of `state` fits in its device's memory (_room_for), else why not, for a
    refusal that stands without its float64 second look ('the float64 check was skipped for lack of memory: ...
    needs about 2.10 GB, and cpu has 1.50 GB available')."""
    floating = [t for t in state.values() if t.is_floating_point()]
    if not floating or _room_for(floating, 8):
        return None
    device = floating[0].device
    need = _copy_bytes(floating, 8) * (CPU_MARGIN if device.type == "cpu" else 1)
    return (
        "the float64 check was skipped for lack of memory: a float64 copy of the model's state "
        + ("and its activations " if device.type == "cpu" else "")
        + f"needs about {_gigabytes(need)}, and {device.type} has {_gigabytes(available_memory(device) or 0)} "
        "available"
    )


def _gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def in_float64(
    state: Mapping[str, torch.Tensor], inputs: Tree, targets: Tree
) -> tuple[dict[str, torch.Tensor], Tree, Tree] | None:
    """(state, inputs, targets) with every floating tensor as a float64 copy (8 bytes per floating element
    of the whole state; a check's second look at a disagreement: token_projection's _beyond_rounding), or
    None when the copy would not fit in its device's memory (float64_room says why)."""
    if float64_room(state) is not None:
        return None
    return {n: as_float64(t) for n, t in state.items()}, as_float64(inputs), as_float64(targets)


def as_float64(tree: Tree) -> Tree:
    """`tree` with every floating tensor as a float64 copy (one already float64 as it is), the rest as it is."""
    return tree_map(lambda t: t.double() if t.is_floating_point() else t, tree)


def _widened_gradients(model, state, names, loss_fn, inputs, targets, rows) -> list[list[torch.Tensor]]:
    wide = {n: t.float() if _narrow(t) else t for n, t in state.items()}
    x, y = (tree_map(lambda t: t.float() if _narrow(t) else t, tree) for tree in (inputs, targets))
    return list(example_gradients(model, wide, names, loss_fn, x, y, rows))


def _narrow(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.element_size() < 4


def _dense(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient as a dense tensor: zeros when unused, densified when sparse."""
    if g is None:
        return torch.zeros_like(like)
    return g.to_dense() if g.is_sparse else g


def gap(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The largest finite |a - b| over the largest finite |b| of (a, b) pairs of same-shape tensors."""
    diffs, sizes = zip(*(((a.to(b.dtype) - b).abs(), b.abs()) for a, b in pairs), strict=True)
    return largest_finite(diffs) / max(largest_finite(sizes), 1e-30)


def largest_finite(tensors: Iterable[torch.Tensor]) -> float:
    """The largest finite value over non-negative `tensors` (0 where none is finite)."""
    return torch.stack([t.nan_to_num(0, 0, 0).max().double() for t in tensors]).max().item()


def agrees(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype | None = None,
    tokens: int = 1,
    widened: bool = True,
    own_gap: float = 0.0,
    floor: float = 0.0,
) -> bool:
    """True when every `got` is within rtol |want| + atol * scale of its `want` (pairs of same-shape
    tensors, scale the largest finite |want| of all pairs, at least `floor`), or holds the same non-finite
    value; compared pair by pair: no gathered copy. Tolerances of `dtype` (the coarsest dtype the gradients
    were computed in; default want's) for gradients summed over `tokens` positions against a reference
    `widened` to float32 or not, `own_gap` the gap of autograd in the model's own dtype to it, relative to
    the same scale (tolerances). `floor`: the size the compared numbers have before a cancellation (a
    projected gradient summing to about 0, its rounding that of the uncancelled terms: a Kronecker segment's
    random-sign size, token_projection), 0 where `want` is its own size."""
    rtol, atol = tolerances(dtype or pairs[0][1].dtype, tokens, widened, own_gap)
    scale = max(largest_finite(want.abs() for _, want in pairs), floor)
    excess = torch.stack([_excess(got.to(want.dtype), want, rtol).max() for got, want in pairs])
    return bool(excess.double().max().item() <= atol * max(scale, 1e-30))  # False for NaN


def _excess(got: torch.Tensor, want: torch.Tensor, rtol: float, scale: Any = 0) -> torch.Tensor:
    """|got - want| - rtol (|want| + scale), 0 where both hold the same non-finite value (an example whose
    loss or gradient is NaN or infinite: its row is exported as it is, and scoring names it), NaN where
    only one side is not finite."""
    same = (got == want) | (got.isnan() & want.isnan())
    return ((got - want).abs() - rtol * (want.abs() + scale)).masked_fill(same, 0)
