"""One batched forward and backward pass recording, for chosen modules, every call's input and the
gradient of the summed per-example losses w.r.t. that call's output.

When no layer mixes the examples of a batch, row i of an output gradient is dL_i/dy_i, so the
per-example gradient of a parameter used only inside these modules' forward follows from the
(input, output gradient) pairs alone (layer_rules), without per-example autograd. Shared by the
full-gradient hook path (hook_gradients, which consumes each call inside the backward pass, as soon
as its gradient exists, while it is still in cache; autograd itself keeps the output gradients until
the pass ends, so a pass holds about as much as `capture` returns), the factored modes (last_layer)
and per-token projections.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .data import Tree, batch_rows, call_model, doubled, slice_rows
from .losses import LossFn, check_losses, losses_of, model_caller, refuse_checkpointing


def one_at_a_time(expanded: set[str], rows: int) -> str:
    """Words for a hooked pass that failed after running the layers `expanded` on batch-1 tensors in a batch of
    `rows` (stream expands such a call, taken for one shared by the batch, to the batch)."""
    named = ", ".join(repr(n) for n in sorted(expanded))
    return (
        f"layer{'s' if len(expanded) > 1 else ''} {named} ran on batch-1 tensors in a batch of {rows} rows, which "
        "the hooks take for a call shared by the batch and expand to it; a layer run on one example at a time (a "
        "loop over the rows) then computes something else"
    )


def fails_without_hooks(
    model: nn.Module, state: Mapping[str, torch.Tensor], loss_fn: LossFn, inputs: Tree, targets: Tree
) -> bool:
    """Whether the batch's forward and loss fail without the hooks too (under no_grad): the hooked pass's
    error is then the model's or the data's own, not one of a layer the hooks expanded to the batch."""
    try:
        with torch.no_grad():
            losses_of(model, state, loss_fn, inputs, targets)
    except Exception:  # KeyboardInterrupt and other BaseExceptions pass
        return True
    return False


class NotCaptured(ValueError):
    """A module ran in a way the capture cannot use (output not one tensor, no tensor input)."""


class Refused(ValueError):
    """The pass met a model that no gradient path can run (activation checkpointing:
    losses.refuse_checkpointing): to be raised as it is, not taken for a failure of the hooks."""


@dataclass
class Call:
    """One forward call of a captured module: its first input (detached) and the gradient of
    sum_i L_i w.r.t. its output (same shape as the output; zeros where the loss does not use it)."""

    input: torch.Tensor
    grad: torch.Tensor


Consumer = Callable[[str, int, Call], None]  # (module name, index of the call in forward order, the call)


def capture(
    model: nn.Module,
    names: Sequence[str],
    state: Mapping[str, torch.Tensor],
    loss_fn: LossFn,
    inputs: Tree,
    targets: Tree,
    expanded: set[str] | None = None,
    summed: dict[str, torch.Tensor | None] | None = None,
) -> dict[str, list[Call]]:
    """{module name: its calls, in order} for the modules `names`, from one forward pass of the model
    with `state`'s tensors and one backward pass of the summed (batch,) losses. A call whose input (of 2
    or more dimensions) and output have batch size 1 in a batch of more rows (shared by all, broadcast
    later) is recorded expanded to the batch, its output replaced by the expanded tensor; `expanded` as
    stream's; `summed` as stream's (the gradients of the summed losses w.r.t. the tensors of `state` it names)."""
    calls: dict[str, dict[int, Call]] = {n: {} for n in names}

    def keep(name: str, index: int, call: Call) -> None:
        calls[name][index] = call

    stream(model, names, state, loss_fn, inputs, targets, keep, expanded, summed=summed)
    return {n: [by_index[i] for i in sorted(by_index)] for n, by_index in calls.items()}


def stream(
    model: nn.Module,
    names: Sequence[str],
    state: Mapping[str, torch.Tensor],
    loss_fn: LossFn,
    inputs: Tree,
    targets: Tree,
    consume: Consumer,
    expanded: set[str] | None = None,
    expanded_shapes: dict[str, tuple[int, ...]] | None = None,
    summed: dict[str, torch.Tensor | None] | None = None,
) -> dict[str, int]:
    """The pass of `capture`, handing each call to consume(name, index, call) instead of keeping it:
    inside the backward pass when its output gradient is complete (in backward order), after it with
    a zero gradient for calls the loss does not reach. Returns {name: number of calls}. `expanded`, when
    given, gets the names of the modules whose calls were expanded to the batch as it goes (kept when the
    pass raises): a module run on one example at a time (a loop over the rows) is expanded too, which
    changes what the model computes, and so is one called on a tensor without a batch dimension whose first
    dimension is 1 (T5's relative_attention_bias on a (1, k_len) grid of buckets when the decoder has one
    position). `expanded_shapes`, when given, gets each such module's input shape before its first expansion.
    `summed`, when given, names tensors of `state` (its keys) that get, from the same backward pass, the gradient of
    the summed losses w.r.t. each, all its uses in the model included (None where the losses do not reach it): the
    reference a consumer's per-example rows must sum to (hook_gradients)."""
    modules = dict(model.named_modules())
    leaves = {n: state[n].detach().requires_grad_(True) for n in summed or {}}
    if leaves:
        state = {**state, **leaves}
    rows = batch_rows(targets, "targets")
    sources: list[torch.Tensor] = []  # the captured outputs as the layers returned them
    pending: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}  # calls whose gradient is not yet in
    counts = dict.fromkeys(names, 0)

    def hook_for(name):
        def record(module, args, kwargs, output):
            first = _first_input(args, kwargs)
            if not isinstance(first, torch.Tensor) or not isinstance(output, torch.Tensor):
                raise NotCaptured(f"layer {name!r} must take a tensor and return one tensor to be captured")
            x = first.detach()
            if rows > 1 and x.dim() > 1 and output.dim() and x.shape[0] == 1 and output.shape[0] == 1:
                # shared by the batch and broadcast later (position embeddings on ids of shape (1, T)): one
                # copy per example keeps each example's output gradient apart; 1-D inputs (wpe(arange(1)))
                # have no batch dimension to expand, and an expanded output would change the model's shapes
                x, output = x.expand(rows, *x.shape[1:]), output.expand(rows, *output.shape[1:])
                if expanded is not None:
                    expanded.add(name)
                if expanded_shapes is not None:
                    expanded_shapes.setdefault(name, tuple(first.shape))
            # dL/dy needs y in the graph; where nothing upstream needs gradients, start the graph here
            source = output if output.requires_grad else output.detach().requires_grad_(True)
            key = (name, counts[name])
            counts[name] += 1
            pending[key] = (x, source)
            sources.append(source)
            # a copy behind a tap: in-place ops after the layer (ReLU(inplace=True)) change the copy,
            # neither the graph start nor the tensor whose gradient the tap hands over
            return _Tap.apply(source, lambda g: hand_over(key, g))

        return record

    def hand_over(key: tuple[str, int], g: torch.Tensor) -> None:
        x, _ = pending.pop(key)
        consume(*key, Call(x, g))

    handles = [modules[n].register_forward_hook(hook_for(n), with_kwargs=True) for n in names]
    try:
        with torch.enable_grad():
            losses = losses_of(model, state, loss_fn, inputs, targets)
    finally:
        for h in handles:
            h.remove()
    check_losses(losses, rows)
    if sources and losses.requires_grad:
        # the gradients returned are those the taps already handed over: dropped at once
        try:
            grads = torch.autograd.grad(losses.sum(), [*sources, *leaves.values()], allow_unused=True)
        except RuntimeError as e:
            try:
                refuse_checkpointing(e)
            except ValueError as refusal:
                raise Refused(str(refusal)) from e
            raise
        if summed is not None:
            summed.update(zip(leaves, grads[len(sources) :], strict=True))
    for key, (_, y) in list(pending.items()):
        hand_over(key, torch.zeros_like(y))
    return counts


def device_failure(e: BaseException) -> bool:
    """Whether `e` is a failure of the device itself (out of memory, an illegal memory access, a
    device-side assert: torch.AcceleratorError, or a RuntimeError 'CUDA error: ...' before torch 2.8),
    not to be taken for a model a gradient path cannot run. Out of memory (torch.cuda.OutOfMemoryError)
    is the one a path needing less memory may avoid: callers with such a fallback test for it apart."""
    accelerator = getattr(torch, "AcceleratorError", torch.cuda.OutOfMemoryError)
    return isinstance(e, (torch.cuda.OutOfMemoryError, accelerator)) or (
        isinstance(e, RuntimeError) and str(e).startswith("CUDA error")
    )


class _Tap(torch.autograd.Function):
    """Identity (a copy) whose backward hands the output gradient to a callback on its way through."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, hand_over: Callable[[torch.Tensor], None]) -> torch.Tensor:
        ctx.hand_over = hand_over
        return y.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.hand_over(g)
        return g, None


def bytes_of_one(model: nn.Module, names: Sequence[str], state: Mapping[str, torch.Tensor], one: Tree) -> int:
    """Bytes a pass of `stream` captures per example for the modules `names` (every call's first input
    and its output gradient, which has the output's shape; a call shared by the batch counts once per
    example, as stream expands it), from a forward pass without gradients (probe_forward) of `one`, the
    inputs of one example (batch size 1): about a third of the cost of a pass of stream on it."""
    modules = dict(model.named_modules())
    total = [0]

    def count(module, args, kwargs, output):
        first = _first_input(args, kwargs)
        total[0] += sum(t.numel() * t.element_size() for t in (first, output) if isinstance(t, torch.Tensor))

    handles = [modules[n].register_forward_hook(count, with_kwargs=True) for n in names]
    try:
        probe_forward(model, state, one, lambda: total.__setitem__(0, 0))
    finally:
        for h in handles:
            h.remove()
    return total[0]


def ids_alone_and_twice(
    model: nn.Module, names: Sequence[str], state: Mapping[str, torch.Tensor], inputs: Tree
) -> tuple[dict[str, list[tuple[int, int]]], dict[str, list[tuple[int, int]]]]:
    """Per module of `names`, (ids.dim(), first dimension, 0 for a 0-d id) of each call on a tensor first input,
    in a forward pass (probe_forward) of example 0 alone, then of example 0 twice: ids one per example grow
    between the two. The same example twice, not two examples: a model trimming the batch's padding gives both
    passes the same T, whatever the other rows' lengths."""
    modules = dict(model.named_modules())
    one = slice_rows(inputs, 0, 1)
    calls: list[dict[str, list[tuple[int, int]]]] = []
    for probe in (one, doubled(one)):
        seen: dict[str, list[tuple[int, int]]] = {n: [] for n in names}

        def look(name: str, seen=seen):
            def note(module, args, kwargs, output):
                ids = _first_input(args, kwargs)
                if isinstance(ids, torch.Tensor):
                    seen[name].append((ids.dim(), ids.shape[0] if ids.dim() else 0))

            return note

        handles = [modules[n].register_forward_hook(look(n), with_kwargs=True) for n in names]
        try:
            probe_forward(model, state, probe, lambda seen=seen: [v.clear() for v in seen.values()])
        finally:
            for h in handles:
                h.remove()
        calls.append(seen)
    alone, twice = calls
    return alone, twice


def ids_shared_by_the_batch(
    model: nn.Module, names: Sequence[str], state: Mapping[str, torch.Tensor], inputs: Tree
) -> set[str]:
    """The modules `names` called on 1-D ids that are not one per example: whose lengths do not grow from
    example 0 alone to example 0 twice (ids_alone_and_twice; wpe(arange(T)), where ids one per example (B,)
    or flattened (B * T,) double; T may equal the rows of a batch by chance). A module whose calls differ in
    number between the two is taken as shared (its full per-example gradients are exact either way)."""
    calls = ids_alone_and_twice(model, names, state, inputs)
    alone, twice = ({n: [first for dim, first in seen[n] if dim == 1] for n in names} for seen in calls)
    return {
        n
        for n in names
        if len(alone[n]) != len(twice[n]) or any(a == b for a, b in zip(alone[n], twice[n], strict=True))
    }


def probe_forward(model: nn.Module, state: Mapping[str, torch.Tensor], one: Tree, restart: Callable[[], None]) -> None:
    """A forward pass of `one` with `state` for the hooks of a probe: without gradients; when that raises a
    RuntimeError (a forward that differentiates inside itself, as forces = -dE/dx, needs autograd), once
    more with gradients, after `restart()` clears what the hooks counted."""
    try:
        with torch.no_grad():
            call_model(model_caller(model, state), one)
    except RuntimeError as e:
        if device_failure(e):
            raise
        restart()
        with torch.enable_grad():
            call_model(model_caller(model, state), one)


def _first_input(args: tuple, kwargs: dict) -> object:
    """A module call's first argument, positional or by keyword (None without arguments)."""
    return args[0] if args else next(iter(kwargs.values()), None)
