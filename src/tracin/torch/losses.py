"""The loss function: checked up front (callable, reduction), run on a model with a checkpoint's tensors swapped in, and
its output checked (one loss per example, depending on the parameters, not on the model's own tensors in place of the
checkpoint's); activation checkpointing, which per-example gradients cannot run through, refused."""

from __future__ import annotations

import inspect
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_unflatten
from torch.utils.checkpoint import CheckpointError, CheckpointFunction

from .data import Tree, call_model, slice_rows, tree_map

LossFn = Callable[[object, Tree], torch.Tensor]
# torch.utils.checkpoint(use_reentrant=True) warns so when no input of the checkpointed block requires
# gradients: then its output does not either, and no gradient reaches the parameters inside the block
_NO_INPUT_GRAD = "None of the inputs have requires_grad=True"


def check_loss_fn(loss_fn: object) -> None:
    """Refuses non-callables, classes whose call builds an object (nn.CrossEntropyLoss for
    nn.CrossEntropyLoss(reduction='none'); _builds_an_object) and loss modules with a reduction other than 'none',
    up front. Its signature is
    not checked here: a module's __call__ or forward pre-hook, or a functools.wraps wrapper, may supply
    arguments its signature shows; a call's TypeError is explained (loss_mismatch) when it does not bind."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}")
    if isinstance(loss_fn, type) and _builds_an_object(loss_fn):
        raise TypeError(_class_given(loss_fn))
    reduction = getattr(loss_fn, "reduction", "none")
    if reduction != "none":
        raise ValueError(
            f"loss_fn has reduction={reduction!r}; TracIn needs one loss per example: build it with "
            f"reduction='none' (e.g. nn.CrossEntropyLoss(reduction='none'))"
        )


def _builds_an_object(cls: type) -> bool:
    """Whether calling the class `cls` with (outputs, targets) builds an instance of it, never losses: an nn.Module
    (a loss module's class given for an instance of it), or a class whose __new__ is not its own Python function
    (object's or a builtin type's, which build an object). A class whose __new__ is written in Python (e.g.
    `def __new__(cls, outputs, targets): return F.cross_entropy(outputs, targets, reduction='none')`), or whose
    metaclass has its own __call__, may return anything: it is called like a function."""
    if issubclass(cls, nn.Module):
        return True
    return type(cls).__call__ is type.__call__ and not isinstance(cls.__new__, types.FunctionType)


def _class_given(cls: type) -> str:
    """Why a class is not a loss_fn: calling it builds an object (nn.CrossEntropyLoss(outputs, targets) a
    module whose weight is the outputs), so an instance is meant."""
    name = f"nn.{cls.__name__}" if getattr(nn, cls.__name__, None) is cls else cls.__qualname__
    if issubclass(cls, nn.modules.loss._Loss):
        instance = f"{name}(reduction='none')"
    elif issubclass(cls, nn.Module):
        instance = f"{name}(...), built with one loss per example"
    else:
        instance = f"an instance of {name}, or a function"
    return (
        f"loss_fn is the class {name}, not a loss: tracin calls loss_fn(outputs, targets), and calling a class "
        f"builds an object from them. Pass an instance: {instance}"
    )


def loss_mismatch(loss_fn: object, error: TypeError) -> str | None:
    """Why loss_fn cannot be called as loss_fn(outputs, targets), for the TypeError `error` its call raised:
    its signature (a module's forward, unless the module overrides __call__) does not bind two positional
    arguments. None when it binds, its signature is unknown (a builtin), a forward pre-hook may change the
    arguments, or `error` was raised inside the function (a functools.wraps wrapper supplied the arguments its
    signature lacks: the call bound, the error is the function's own)."""
    target: object = loss_fn
    if isinstance(loss_fn, nn.Module) and type(loss_fn).__call__ is nn.Module.__call__:
        if loss_fn._forward_pre_hooks or torch.nn.modules.module._global_forward_pre_hooks:
            return None
        target = loss_fn.forward
    code = getattr(inspect.unwrap(target), "__code__", None)  # type: ignore[arg-type]
    frame = error.__traceback__
    while frame is not None:  # raised inside the function: its call bound (a wrapper supplied the rest)
        if code is not None and frame.tb_frame.f_code is code:
            return None
        frame = frame.tb_next
    try:
        signature = inspect.signature(target)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(None, None)
    except TypeError as e:
        name = getattr(target, "__qualname__", type(loss_fn).__name__)
        return (
            f"loss_fn is called as loss_fn(outputs, targets): the model's outputs and the batch's targets, two "
            f"positional arguments, returning one loss per example; {name}{signature} cannot take them ({e}). "
            f"Wrap it, e.g. lambda outputs, targets: ... (the call raised: {error})"
        )
    return None


def check_losses(losses: object, rows: int, outputs: object = None) -> None:
    """Refuses a loss_fn whose output on a batch of `rows` is not a (rows,) tensor of losses; where
    `outputs` (the model's, when given) holds that very tensor as `.loss` (a Hugging Face model's batch
    mean, computed when the inputs hold labels), the message says so."""
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor of per-example losses, got {type(losses).__name__}")
    if losses.shape != (rows,):
        hint = ""
        if losses.dim() == 0 and losses is _model_loss(outputs):  # before the 1-row squeeze hint
            hint = (
                " It is the model's own outputs.loss: a Hugging Face model's loss (computed when the inputs "
                "hold labels) is the mean over the batch's tokens, which mixes the examples. Compute one loss "
                "per example from outputs.logits instead, e.g. for a causal LM cross_entropy(outputs.logits[:, "
                ":-1].transpose(1, 2), labels[:, 1:], reduction='none').sum(1) (labels -100: no loss)."
            )
        elif losses.dim() == 0 and rows == 1:
            hint = (
                " On a batch of one row, a 0-d loss is most often a batch dimension dropped by .squeeze() "
                "without a dim (in loss_fn or the model's output): squeeze a named dim (.squeeze(-1)) or "
                "reshape(-1); the same loss runs on batches of two rows or more, so a dataset whose last batch "
                "holds one row, or a single query, meets it. Or a mean- or sum-reduced loss: return one loss "
                "per example (reduction='none')."
            )
        elif losses.dim() == 0:
            hint = (
                " It looks mean- or sum-reduced: a reduced loss mixes the examples of a batch, so "
                "per-example gradients cannot be taken from it. Return one loss per example "
                "(reduction='none')."
            )
        elif losses.dim() >= 2 and losses.shape[0] == rows:
            hint = _unreduced_hint(losses.shape)
        raise ValueError(
            f"loss_fn must return per-example losses of shape ({rows},) for a batch of "
            f"{rows}; got shape {tuple(losses.shape)}.{hint}"
        )


def _model_loss(outputs: object) -> object:
    """outputs.loss (or outputs["loss"] of a Mapping) where the model's outputs hold one, else None."""
    try:
        if isinstance(outputs, Mapping):
            return outputs.get("loss")
        return getattr(outputs, "loss", None)
    except Exception:  # an output object whose attribute access fails: no hint
        return None


def _unreduced_hint(shape: torch.Size) -> str:
    """How to turn losses of `shape` (rows, ...), an elementwise loss with reduction='none' on outputs of that
    shape, into one loss per example."""
    if len(shape) == 2 and shape[1] == 1:  # (rows, 1): a regression or binary head
        return (
            " An elementwise loss with reduction='none' (nn.MSELoss, nn.BCEWithLogitsLoss, nn.L1Loss) returns "
            f"the shape of the outputs, {tuple(shape)} for one output per example: squeeze it, e.g. "
            "loss_fn=lambda outputs, targets: loss(outputs, targets).squeeze(-1)"
        )
    return (
        " That is one loss per element (an elementwise loss with reduction='none', or per-token losses): reduce "
        "each example's own, e.g. loss_fn=lambda outputs, targets: loss(outputs, targets).flatten(1).sum(1) (or "
        ".mean(1), the per-example part of reduction='mean')"
    )


def model_caller(
    model: nn.Module, state: Mapping[str, torch.Tensor], tie_weights: bool = True
) -> Callable[..., object]:
    """A callable running `model` with the tensors of `state` in place of its own (tie_weights=False:
    each name of a tied tensor takes its own entry of `state`, as torch.func.functional_call). A module
    reached under several names (self.b = self.a) gets its own tensors back after each call in the slots
    left holding one of `state`'s tensors (a tensor a forward put in a slot is kept): functional_call
    swaps them in under each name and puts back what it found under the second, its own first tensor (torch
    2.x), which left the caller's model holding a checkpoint's tensors in place of its parameters."""
    shared = _shared_modules(model)

    def call(*args, **kwargs):
        if not shared:
            return functional_call(model, dict(state), args, kwargs, tie_weights=tie_weights)
        saved = [(slots, dict(slots)) for m in shared for slots in (m._parameters, m._buffers)]
        given = {id(t) for t in state.values()}
        try:
            return functional_call(model, dict(state), args, kwargs, tie_weights=tie_weights)
        finally:
            for slots, own in saved:
                for key, tensor in own.items():
                    # only a slot left holding one of state's tensors: one a forward put there (a cache
                    # grown in forward) is kept, as for a module reached under one name
                    if key in slots and id(slots[key]) in given:
                        slots[key] = tensor

    return call


def _shared_modules(model: nn.Module) -> list[nn.Module]:
    """The submodules of `model` reached under more than one name."""
    seen: set[int] = set()
    shared: dict[int, nn.Module] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        if id(m) in seen:
            shared[id(m)] = m
        seen.add(id(m))
    return list(shared.values())


def losses_of(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    loss_fn: LossFn,
    inputs: Tree,
    targets: Tree,
    tie_weights: bool = True,
) -> torch.Tensor:
    """loss_fn(model(inputs) with `state`'s tensors, targets); a TypeError of the loss call explained when
    loss_fn's signature cannot take (outputs, targets) (loss_mismatch)."""
    return _loss_call(loss_fn, call_model(model_caller(model, state, tie_weights), inputs), targets)


def _loss_call(loss_fn: LossFn, outputs: object, targets: Tree) -> torch.Tensor:
    """loss_fn(outputs, targets), a TypeError explained as losses_of does."""
    try:
        return loss_fn(outputs, targets)
    except TypeError as e:
        why = loss_mismatch(loss_fn, e)
        if why is None:
            hint = container_outputs(outputs)
            if hint is None:
                raise
            why = f"{e} ({hint})"
        raise TypeError(why) from e


def container_outputs(outputs: object) -> str | None:
    """For a TypeError of loss_fn(outputs, targets) where the model returned a tuple, list or dict (logits and
    features, say), which loss_fn gets whole: what the model returned and how to pick the logits in loss_fn.
    None for other outputs (a tensor: the error is the loss's own)."""
    if isinstance(outputs, Mapping) and outputs:
        items = list(outputs.items())
        first = items[0][0]
        pick = f"outputs[{first!r}]"
        kind = "dict"
    elif isinstance(outputs, (tuple, list)) and outputs:
        items = list(enumerate(outputs))
        pick, kind = "outputs[0]", "tuple" if isinstance(outputs, tuple) else "list"
    else:
        return None

    def described(value: object) -> str:
        if isinstance(value, torch.Tensor):
            return f"{tuple(value.shape)}"
        return type(value).__name__

    listed = ", ".join(f"{key!r}: {described(v)}" if kind == "dict" else described(v) for key, v in items[:4])
    more = ", ..." if len(items) > 4 else ""
    return (
        f"the model returned a {kind} of {len(items)} ({listed}{more}), which loss_fn gets whole as its outputs: "
        f"where loss_fn takes one tensor, pick it, e.g. loss_fn=lambda outputs, targets: loss({pick}, targets)"
    )


def random_forward(
    model: nn.Module, state: Mapping[str, torch.Tensor], loss_fn: LossFn, inputs: Tree, targets: Tree
) -> bool:
    """True when three forward passes on the same rows give different losses (dropout with
    training=True, sampling: per-example gradients then differ from run to run)."""
    with torch.no_grad():
        first, *others = (losses_of(model, state, loss_fn, inputs, targets) for _ in range(3))
    return not all(torch.equal(first, other) or torch.allclose(first, other, equal_nan=True) for other in others)


def check_loss_on(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    names: list[str],
    loss_fn: LossFn,
    inputs: Tree,
    targets: Tree,
    rows: int,
) -> None:
    """Runs loss_fn once on a batch of `rows` and refuses it unless it gives (rows,) losses that
    depend on the chosen parameters `names` (a constant or detached loss has no gradient to trace).
    A block checkpointed with use_reentrant=True whose inputs need no gradient (nothing before it is
    chosen) cuts its parameters off the losses: refused as checkpointing (refuse_checkpointing) when
    some chosen parameter then gets no gradient, or is used inside the block and outside it (its inside part
    dropped: _used_without_grad), at the cost of one backward and one forward pass of the rows. Torch's
    warning from another thread while this check runs (the model's block run in a worker thread, as
    nn.DataParallel does, or an unrelated thread's) costs the same passes; it refuses the chosen parameters
    used inside a cut block in whichever thread, when they then get no gradient or also one from outside.
    A torch.compile'd model is checked uncompiled (_uncompiled); a compiled submodule of an uncompiled
    model is not (its cut block's warning comes when it is traced only: such a block goes unseen).
    A block run under torch.utils.checkpoint(use_reentrant=False) is refused when the backward to the chosen
    parameters recomputes it (one backward pass of the rows, only when the forward ran such a block): it
    recomputes the block after the checkpoint's tensors are swapped out, from the model's own weights (the rows
    would be silently wrong at any checkpoint but those weights); a head after the block alone is exported, and
    another thread's block is not taken for the model's. A loss_fn reading one of the model's own parameters
    (_refuse_live_parameters) or buffers or frozen parameters that the checkpoint holds otherwise
    (_refuse_live_buffers) is refused."""
    model = _uncompiled(model)
    leaves = {n: state[n].detach().requires_grad_(True) for n in names}
    with torch.enable_grad(), _checkpoint_warnings() as cut:
        outputs = call_model(model_caller(model, {**state, **leaves}), inputs)
        losses = _loss_call(loss_fn, outputs, targets)
    if cut.ran and losses.requires_grad and _recomputes(cut, losses, leaves):
        raise _checkpointing(
            "torch.utils.checkpoint(use_reentrant=False) recomputes its block in the backward pass, after the "
            "checkpoint's tensors are swapped out, from the model's own weights: every row but those at the "
            "model's current weights would be silently wrong"
        )
    check_losses(losses, rows, outputs)
    _refuse_live_parameters(model, {**state, **leaves}, losses)
    _refuse_live_buffers(model, state, loss_fn, outputs, targets, losses)
    if cut or cut.elsewhere:
        unreached = _unreached(losses, leaves)
        used = _used_without_grad(model, state, leaves, loss_fn, inputs, targets)
        if not cut:  # only another thread warned: refused for what this model's blocks use, whichever thread ran them
            unreached = [n for n in unreached if n in used]
        inside = [n for n in used if n not in unreached]
        if unreached or inside:
            raise _checkpointing(
                f"torch.utils.checkpoint(use_reentrant=True) warned {_NO_INPUT_GRAD!r}, and no gradient reaches "
                f"{_listed(unreached + inside)} through it"
                + (" (used inside the block, where their gradient is dropped, and also outside)" if inside else "")
            )
    if cut:
        message, category, filename, lineno = cut[0]  # shown as torch shows it: once per location by default
        warnings.warn_explicit(
            message, category, filename, lineno, module=torch.utils.checkpoint.__name__, registry=_registry()
        )
    if not losses.requires_grad:
        raise ValueError(
            f"loss_fn's losses do not depend on the chosen parameters ({_listed(names)}): they are constant or "
            "detached from the model's outputs (.detach(), .item(), a NumPy round trip, torch.no_grad()), so "
            "every gradient would be zero. Compute the losses from the outputs with torch operations"
        )
    _refuse_coupled(loss_fn, outputs, targets, losses.detach(), rows)


def _refuse_live_parameters(model: nn.Module, called: Mapping[str, torch.Tensor], losses: torch.Tensor) -> None:
    """ValueError when the losses depend on one of the model's own trainable parameters, as the model holds it (not
    a tensor of `called`, the state the forward ran with): loss_fn reads it directly (the model returns hidden
    states and loss_fn applies model.head, a weight penalty in loss_fn), or the forward reaches it other than as a
    registered parameter. tracin swaps a checkpoint's tensors in for the forward only: such a loss sees the model's
    current values, whose gradient is never taken, and every row would be silently wrong. One backward pass of the
    checked rows, pruned to the paths reaching those parameters (none: no work)."""
    given = {id(t) for t in called.values()}
    live = {id(p): p for p in model.parameters() if p.requires_grad and id(p) not in given}
    if not live or not losses.requires_grad:
        return
    try:
        grads = torch.autograd.grad(losses.sum(), list(live.values()), retain_graph=True, allow_unused=True)
    except RuntimeError as e:
        refuse_checkpointing(e)
        raise
    aliases: dict[int, list[str]] = {}  # a tied parameter's every name: loss_fn may read it under its second
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    read = [_named(aliases[i]) for i, g in zip(live, grads, strict=True) if g is not None]
    if read:
        raise ValueError(
            f"loss_fn reads the model's parameter{'s' if len(read) > 1 else ''} {_listed(read)} "
            "directly, outside the model's forward: loss_fn applies a layer of the model to its outputs (e.g. "
            "model.head(hidden)) or adds a weight penalty (e.g. model.fc.weight.pow(2).sum()). tracin runs the "
            "forward with each checkpoint's tensors in place of the parameters and calls loss_fn after it, where "
            "it sees the model's current values, whose gradients are not taken: every row would be wrong. Apply "
            "the layer inside the model's forward (wrap the model and its head in one nn.Module returning what "
            "loss_fn needs), and leave regularizers out of loss_fn: TracIn traces each example's own loss. (A "
            "forward reaching the parameter other than through its module, e.g. a reference kept in a plain "
            "list, is refused so too)"
        )


def _refuse_live_buffers(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    loss_fn: LossFn,
    outputs: object,
    targets: Tree,
    losses: torch.Tensor,
) -> None:
    """ValueError when loss_fn reads one of the model's buffers or frozen parameters (autograd cannot see them:
    _refuse_live_parameters does not) as the model holds it, where `state` holds another value: loss_fn is called
    again on the same `outputs` with those tensors' .data swapped for the state's (put back after: a loss_fn
    holding the tensor itself, not reading the attribute, is caught too), and when its losses then change, with
    each alone, to name it. Not judged for a loss_fn whose losses change on a second call as they are (it draws
    random numbers). Costs loss_fn calls only (two; one more per such tensor when it reads one), no forward
    pass."""
    own = {n: t for n, t in model.named_buffers(remove_duplicate=False)}
    own.update((n, p) for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad)
    differing: dict[int, tuple[list[str], torch.Tensor, torch.Tensor]] = {}
    for n, t in own.items():
        given = state.get(n)
        if id(t) in differing:
            differing[id(t)][0].append(n)
        elif isinstance(given, torch.Tensor) and given is not t and given.shape == t.shape:
            value = given.detach().to(t.device, t.dtype)
            if not torch.equal(value, t):
                differing[id(t)] = ([n], t, value)
    if not differing:
        return
    detached = tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, outputs)
    before = losses.detach()

    def changed() -> bool:
        with torch.no_grad():
            again = _loss_call(loss_fn, detached, targets).detach()
        return not (torch.equal(again, before) or torch.allclose(again, before, rtol=1e-6, atol=0, equal_nan=True))

    def changed_with(tried: list[tuple[list[str], torch.Tensor, torch.Tensor]]) -> bool:
        kept = [tensor.data for _, tensor, _ in tried]
        try:  # .data swapped, not written: no copy of the model's tensors (a frozen base model's), no version
            # counter bumped (FreshBuffers would take it for a forward's write), an expanded buffer settable
            for _, tensor, value in tried:
                tensor.data = value
            return changed()
        finally:
            for (_, tensor, _), old in zip(tried, kept, strict=True):
                tensor.data = old

    # an inference tensor (a model loaded under torch.inference_mode) cannot be set in place here
    settable = [d for d in differing.values() if torch.is_inference_mode_enabled() or not d[1].is_inference()]
    if not settable or changed() or not changed_with(settable):  # changed(): random losses, nothing to compare
        return
    read = [_named(names) for names, tensor, value in settable if changed_with([(names, tensor, value)])]
    if read:
        raise ValueError(
            f"loss_fn reads the model's buffer or frozen parameter{'s' if len(read) > 1 else ''} {_listed(read)} "
            "directly, outside the model's forward (e.g. logits + model.log_prior): tracin runs the forward with "
            "each checkpoint's tensors, buffers included, in place of the model's and calls loss_fn after it, "
            "where it sees the model's current values, not the checkpoint's (they differ): every row would be "
            "wrong. Use it inside the model's forward (wrap the model in an nn.Module returning what loss_fn needs)"
        )


def _named(names: list[str]) -> str:
    """A parameter's names quoted: 'a', or 'a' (also 'b') for a tied one."""
    return repr(names[0]) + (f" (also {', '.join(map(repr, names[1:]))})" if len(names) > 1 else "")


_COUPLING_ROWS = 4  # rows whose loss in the batch is compared with their loss alone (_refuse_coupled)
_COUPLING_TOLERANCE = 1e-2  # |in batch - alone| over the larger |loss| (floor: 1e-3 of the rows' largest)


def _refuse_coupled(loss_fn: LossFn, outputs: object, targets: Tree, losses: torch.Tensor, rows: int) -> None:
    """ValueError when loss_fn's loss of one of the first _COUPLING_ROWS examples differs, given the same model
    outputs, in the batch of `rows` (`losses`) and alone (loss_fn on that row of `outputs` and `targets`) by more
    than _COUPLING_TOLERANCE of the larger |loss| (at least 1e-3 of the rows' largest) and still does in float64
    (the outputs and targets as float64 copies: rounding of a loss that is a small difference of large terms
    shrinks ~2e-9-fold, a coupling does not). Such a loss (centred or scaled by the batch, contrastive over it)
    is no per-example loss: its rows would be zero or change with the batch. Not judged (nothing raised) for a
    batch of one row, outputs with a tensor that is not (rows, ...) (sequence-first, a 0-d auxiliary loss), or
    a loss_fn that fails on one row or in float64 (the export's other paths explain those), or one drawing random
    numbers (_random_loss). Costs loss_fn calls only, no forward pass."""
    flat, spec = tree_flatten(outputs)
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    if rows < 2 or not tensors or any(t.dim() == 0 or t.shape[0] != rows for t in tensors):
        return
    found = _coupled_row(loss_fn, flat, spec, targets, losses, rows)
    if found is None:
        return
    if all(t.dtype == torch.float64 for t in tensors + [losses] if t.is_floating_point()):
        wide = found
    else:
        wide_flat = [_float64(t) if isinstance(t, torch.Tensor) else t for t in flat]
        try:
            wide_targets = tree_map(_float64, targets)
            with torch.no_grad():
                wide_losses = loss_fn(tree_unflatten(wide_flat, spec), wide_targets)
        except Exception:
            return
        if not isinstance(wide_losses, torch.Tensor) or wide_losses.shape != (rows,):
            return
        wide = _coupled_row(loss_fn, wide_flat, spec, wide_targets, wide_losses, rows)
    if wide is None or _random_loss(loss_fn, outputs, targets, losses):
        return
    row, mine, one, gap = wide
    raise ValueError(
        f"loss_fn's loss of one example depends on the other examples of its batch: given the same model outputs, "
        f"row {row}'s loss is {mine:.6g} in a batch of {rows} rows and {one:.6g} alone (by {gap:.1e} of its size, "
        f"tolerance {_COUPLING_TOLERANCE:.0e}, also in float64). A loss centred or scaled by the batch "
        "(loss - loss.mean(), loss / len(batch)), contrastive over the batch (InfoNCE: softmax over the batch's "
        "similarities) or weighted across it is no per-example loss: its rows would be zero (a centred loss) or "
        "change with the batch they are computed in (a scaled one: with batch_size, and in a last, shorter batch). "
        "loss_fn must return each example's own loss, computed from its own outputs and targets only "
        "(reduction='none', nothing divided by the batch size)"
    )


def _coupled_row(
    loss_fn: LossFn, flat: list, spec: TreeSpec, targets: Tree, losses: torch.Tensor, rows: int
) -> tuple[int, float, float, float] | None:
    """(row, its loss in the batch, alone, their gap) of the first of the first _COUPLING_ROWS rows whose loss
    alone (loss_fn on that row of the outputs `flat` (tree_flatten's leaves, of `spec`) and of `targets`) differs
    from `losses[row]` (the batch's) beyond _COUPLING_TOLERANCE; None when all agree, or a loss alone cannot be
    had (loss_fn fails on one row, returns no (1,) tensor, or a non-finite loss on one side only)."""
    largest = losses[: min(rows, _COUPLING_ROWS)].detach().abs().nan_to_num(0, 0, 0).max().double()
    for i in range(min(rows, _COUPLING_ROWS)):
        one_row = [t[i : i + 1] if isinstance(t, torch.Tensor) else t for t in flat]
        try:
            with torch.no_grad():
                alone = loss_fn(tree_unflatten(one_row, spec), slice_rows(targets, i, i + 1))
        except Exception:
            return None
        if not isinstance(alone, torch.Tensor) or alone.numel() != 1:
            return None
        mine, one = losses[i].detach().double(), alone.detach().reshape(()).double().to(losses.device)
        if mine == one or (mine.isnan() and one.isnan()):
            continue
        if not (mine.isfinite() and one.isfinite()):
            return None
        gap = ((mine - one).abs() / torch.stack([mine.abs(), one.abs(), 1e-3 * largest]).max()).item()
        if gap > _COUPLING_TOLERANCE:
            return i, mine.item() + 0.0, one.item() + 0.0, gap  # + 0.0: no -0 in the error
    return None


def _random_loss(loss_fn: LossFn, outputs: object, targets: Tree, losses: torch.Tensor) -> bool:
    """Whether loss_fn gives other `losses` on the same outputs (it draws random numbers: a loss alone then differs
    from run to run, whatever the batch)."""
    with torch.no_grad():
        again = loss_fn(outputs, targets)
    return not (torch.equal(again.detach(), losses) or torch.allclose(again.detach(), losses, equal_nan=True))


def _float64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double() if t.is_floating_point() else t


class _Uncompiled(nn.Module):
    """A torch.compile'd model's module, run uncompiled under the compiled model's names ('_orig_mod.')."""

    def __init__(self, compiled: nn.Module):
        super().__init__()
        self._orig_mod = compiled._orig_mod

    def forward(self, *args, **kwargs):
        return self._orig_mod(*args, **kwargs)


def _uncompiled(model: nn.Module) -> nn.Module:
    """`model` run uncompiled when torch.compile made it (a compiled forward warns _NO_INPUT_GRAD when it is
    traced, not when it runs: a cut block went unseen); other models as they are."""
    frames = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing compiled
    return _Uncompiled(model) if frames is not None and isinstance(model, frames.OptimizedModule) else model


def refuse_checkpointing(e: RuntimeError) -> None:
    """ValueError (from `e`) when `e` is torch.utils.checkpoint refusing per-example autograd: a
    CheckpointError (use_reentrant=False: the recomputed forward differs from the first, whose calls
    the capture's hooks changed), or use_reentrant=True's refusal of torch.autograd.grad."""
    if isinstance(e, CheckpointError) or "torch.utils.checkpoint" in str(e):
        raise _checkpointing(f"{type(e).__name__}: {str(e).splitlines()[0]}") from e


def _checkpointing(why: str) -> ValueError:
    return ValueError(
        "the model checkpoints its activations (torch.utils.checkpoint in its forward), which per-example "
        "gradients cannot run through; turn it off for the export (it saves memory in training, and the "
        "export keeps one batch's activations only): e.g. model.gradient_checkpointing_disable() (Hugging "
        "Face transformers), model.set_grad_checkpointing(False) (timm), or call the checkpointed modules "
        f"directly ({why})"
    )


class _Cut(list):
    """A _checkpoint_warnings' list of its thread's _NO_INPUT_GRAD warnings; `elsewhere`: one came meanwhile
    from a thread collecting none; `ran`: a block ran under torch.utils.checkpoint(use_reentrant=False)
    meanwhile in its thread, or in a thread collecting none; `recomputed`: the backward passes (autograd graph
    tasks) that recomputed such a block since (which may come after the list is closed)."""

    elsewhere = False
    ran = False

    def __init__(self) -> None:
        super().__init__()
        self.recomputed: set[int] = set()  # the autograd graph tasks a block was recomputed in


def _recomputes(cut: _Cut, losses: torch.Tensor, leaves: Mapping[str, torch.Tensor]) -> bool:
    """Whether the backward pass from the summed `losses` to `leaves` (the one the rows take) recomputes a
    block run under torch.utils.checkpoint(use_reentrant=False) (one backward pass of the checked rows): a
    block of another thread's model, or one the chosen parameters' gradients do not pass through (a head
    after it, mode="last_layer"), is not."""
    total = losses.sum()
    tasks: list[int] = []
    total.grad_fn.register_prehook(lambda grads: tasks.append(torch._C._current_graph_task_id()))
    try:
        torch.autograd.grad(total, list(leaves.values()), retain_graph=True, allow_unused=True)
    except RuntimeError as e:
        refuse_checkpointing(e)
        raise
    return bool(cut.recomputed.intersection(tasks))


def _noting_recomputed(generator: Callable) -> Callable:
    """torch.utils.checkpoint's non-reentrant `generator`, noting each block it runs in _Cut.ran, and each
    recomputation of it (torch calls the block's function it is given in the backward only) in _Cut.recomputed:
    the calling thread's innermost list, or every active one when that thread collects none (the model's block
    run in a worker thread)."""

    def noted(fn: Callable, *args, **kwargs):
        cut = getattr(_collecting, "cut", None)
        with _INSTALL:
            cuts = [cut] if cut is not None else list(_installed["active"].values())
        for other in cuts:
            other.ran = True

        def recomputing(*a, **k):
            task = torch._C._current_graph_task_id()
            for other in cuts:
                other.recomputed.add(task)
            return fn(*a, **k)

        return generator(recomputing, *args, **kwargs)

    noted.__wrapped__ = generator  # a module importing the name while it is swapped holds this: put back too
    return noted


class _CheckpointWarnings:
    """Stands in for the `warnings` module inside torch.utils.checkpoint while some thread is in
    _checkpoint_warnings: that thread's _NO_INPUT_GRAD warnings go to its list, before any filter or
    registry sees them; one from a thread collecting none goes to warnings.warn and flags every list
    (`elsewhere`: the model may run its block in a worker thread); every other warning goes to warnings.warn
    unchanged."""

    def __getattr__(self, name: str) -> object:
        return getattr(warnings, name)

    @staticmethod
    def warn(message, category=None, stacklevel: int = 1, source=None, **kwargs) -> None:
        if str(message).startswith(_NO_INPUT_GRAD):
            cut = getattr(_collecting, "cut", None)
            if cut is not None:
                where = sys._getframe(stacklevel)  # the frame warnings.warn would name (0: this one)
                kind = category or (type(message) if isinstance(message, Warning) else UserWarning)
                cut.append((message, kind, where.f_code.co_filename, where.f_lineno))
                return
            with _INSTALL:
                for other in _installed["active"].values():
                    other.elsewhere = True
        warnings.warn(message, category, stacklevel + 1, source, **kwargs)


_collecting = threading.local()  # .cut: the _Cut of the innermost _checkpoint_warnings of this thread
# "active": the _Cut of every _checkpoint_warnings under way; "saved": torch.utils.checkpoint's own `warnings`,
# "generator": its own _checkpoint_without_reentrant_generator, "holders": the modules it is swapped in
_installed: dict[str, object] = {"active": {}}  # "active" by id: a _Cut equals any list with its items
_INSTALL = threading.Lock()
_GENERATOR = "_checkpoint_without_reentrant_generator"


def _generator_holders() -> list[types.ModuleType]:
    """torch.utils.checkpoint and each loaded torch module calling its _GENERATOR by a name of its own."""
    names = ("torch.utils.checkpoint", "torch.distributed._composable.checkpoint_activation")
    return [sys.modules[n] for n in names if n in sys.modules]


def _original(generator: object) -> object:
    """torch's generator behind a _noting_recomputed wrapper (itself if it is none)."""
    return (
        getattr(generator, "__wrapped__", generator)
        if getattr(generator, "__module__", None) == __name__
        else generator
    )


@contextmanager
def _checkpoint_warnings() -> Iterator[_Cut]:
    """Collects (message, category, filename, lineno) of every _NO_INPUT_GRAD warning raised inside, in this
    thread, whatever the caller's filters and whatever was shown before, and notes (`elsewhere`) one shown
    meanwhile by a thread collecting none, and (`ran`) a non-reentrant checkpointed block run (torch's
    _checkpoint_without_reentrant_generator swapped alike); every other warning, and every warning of other
    threads, is shown as it would have been (no catch_warnings: its change of the filters' version makes Python
    forget the warnings it showed once per location, and the model's own would then be shown again on every
    export; no swap of warnings.showwarning, filters or registries, which are the whole process's). Safe in several
    threads at once and nested: torch.utils.checkpoint's `warnings` is replaced by the first entry and put
    back by the last exit (under a lock)."""
    cut = _Cut()
    outer = getattr(_collecting, "cut", None)
    _collecting.cut = cut
    with _INSTALL:
        if not _installed["active"]:
            _installed["saved"] = torch.utils.checkpoint.warnings
            torch.utils.checkpoint.warnings = _CheckpointWarnings()
            _installed["generator"] = generator = torch.utils.checkpoint._checkpoint_without_reentrant_generator
            noted = _noting_recomputed(generator)
            # torch.distributed._composable.checkpoint took the name at its import: swapped there too (also where
            # it took an earlier swap's wrapper, imported during an export: torch imports it lazily)
            _installed["holders"] = [
                m for m in _generator_holders() if _original(m.__dict__.get(_GENERATOR)) is generator
            ]
            for holder in _installed["holders"]:
                setattr(holder, _GENERATOR, noted)
        _installed["active"][id(cut)] = cut
    try:
        yield cut
    finally:
        with _INSTALL:
            del _installed["active"][id(cut)]
            if not _installed["active"]:
                torch.utils.checkpoint.warnings = _installed.pop("saved")
                generator = _installed.pop("generator")
                for holder in _installed.pop("holders"):
                    setattr(holder, _GENERATOR, generator)
        _collecting.cut = outer


def _registry() -> dict:
    """torch.utils.checkpoint's registry of warnings shown (where its _NO_INPUT_GRAD warning is noted)."""
    return vars(torch.utils.checkpoint).setdefault("__warningregistry__", {})


class _Watched(torch.Tensor):
    """A chosen parameter in _used_without_grad's forward pass: `uses` gets its name (`chosen`) when a torch
    operation takes it (also inside lists, tuples, dicts) while gradients are off inside a reentrant checkpointed
    block's forward (CheckpointFunction.forward on the stack: a no_grad use elsewhere, a logged weight norm,
    an EMA update, is not one), in whichever thread runs the block (a tensor's own __torch_function__: a
    TorchFunctionMode is one thread's). Results are plain tensors."""

    chosen: str
    uses: set[str]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            watched = [a for a in tree_leaves((args, kwargs)) if isinstance(a, _Watched)]
            if watched and _in_checkpointed_block():
                for a in watched:
                    a.uses.add(a.chosen)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _in_checkpointed_block() -> bool:
    """Whether a reentrant checkpoint's forward (CheckpointFunction.forward) is on the Python stack."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not _BLOCK_FORWARD:
        frame = frame.f_back
    return frame is not None


_BLOCK_FORWARD = CheckpointFunction.forward.__code__


def _used_without_grad(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    leaves: Mapping[str, torch.Tensor],
    loss_fn: LossFn,
    inputs: Tree,
    targets: Tree,
) -> list[str]:
    """The names of `leaves` a forward pass with gradients on passes to some torch operation run without
    them (a reentrant checkpointed block's forward, in any thread): a leaf used there and also outside gets a
    gradient from the outside use alone (one more forward pass of the rows)."""
    uses: set[str] = set()
    watched = {}
    for n, t in leaves.items():
        watched[n] = torch.Tensor._make_subclass(_Watched, t.detach(), True)
        watched[n].chosen, watched[n].uses = n, uses
    with torch.enable_grad(), _checkpoint_warnings():
        losses_of(model, {**state, **watched}, loss_fn, inputs, targets)
    return [n for n in leaves if n in uses]


def _unreached(losses: torch.Tensor, leaves: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of `leaves` the summed `losses` get no gradient from."""
    if not losses.requires_grad:
        return list(leaves)
    try:
        grads = torch.autograd.grad(losses.sum(), list(leaves.values()), allow_unused=True)
    except RuntimeError as e:
        refuse_checkpointing(e)
        raise
    return [n for n, g in zip(leaves, grads, strict=True) if g is None]


def _listed(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
