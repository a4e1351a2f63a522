"""Per-example gradients of the chosen parameters that layer_rules covers, from one batched forward
and backward pass (capture.stream), written straight into their columns of the (batch, d) output
inside the backward pass, each layer's as soon as its output gradient exists."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .capture import Call, NotCaptured, stream
from .data import Tree, batch_rows
from .first_rows_check import _autocast_dtype, coarsest, tolerances
from .layer_rules import covers, per_example_grad, token_form, write_per_example_grad
from .losses import LossFn

# An output tensor of more elements per example is not compared batched vs alone (per_example), so not kept past the
# forward that made it (model_outputs): a language model's (T, vocabulary) logits would otherwise stay in memory.
COMPARED_ELEMENTS = 2**20
# Fixed Gaussian directions a hooked weight's batch sum is compared along (_sketch, _unsummed_along), where that
# is cheaper than its full sum: a (p, q) weight's tokens cost K (p + q) against p q a token (_directional).
SUM_DIRECTIONS = 16
_SUM_SEED = 1


def parameter_owners(model: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """{id(parameter): [(module name, attribute), ...]}: every module holding it directly (tied
    parameters have several)."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for module_name, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((module_name, leaf))
    return owners


class HookGradients:
    """The chosen parameters every holder of which is a covered layer (`plan`: parameter name -> its
    holders; layer_rules.covers: not a module holding parameters besides weight and bias), their gradients
    from the captured calls of those layers (summed over calls and holders: a layer run twice, or a weight
    tied between an Embedding and a Linear)."""

    def __init__(self, model: nn.Module, names: Sequence[str], loss_fn: LossFn):
        self.model, self.loss_fn = model, loss_fn
        modules = dict(model.named_modules())
        owners = parameter_owners(model)
        params = dict(model.named_parameters())
        self.plan = {
            n: owners[id(params[n])] for n in names if all(covers(modules[m]) for m, _ in owners[id(params[n])])
        }
        self._modules = modules
        self.bytes_per_row: float | None = None  # captured inputs and output gradients per example, last pass
        # layers whose calls of batch 1 the last pass expanded to its batch (capture.stream), even when it raised
        self.expanded: set[str] = set()
        # the floating tensors of the model's output in the last pass (output_leaves), detached, those over
        # COMPARED_ELEMENTS per example replaced by empty ones (model_outputs); None when the model ran more or less
        # than once in it: compared with the examples' outputs alone (per_example, which sets it to None once read)
        self.outputs: list[torch.Tensor] | None = None
        # the per-example losses of the last pass ((rows,), detached; None when loss_fn returned another shape):
        # compared with each example's loss alone where an output's shape changes with the batch (per_example), and
        # checked for NaN or infinite losses by the export (_export.loss_watch)
        self.losses: torch.Tensor | None = None
        # {layer: (gap, tolerance)} of the last pass's layers whose rows do not sum to the batch's gradient (_unsummed)
        self.unsummed: dict[str, tuple[float, float]] = {}
        # the planned parameters whose batch sums are compared along SUM_DIRECTIONS directions (_directional)
        self.directional = {n for n, holders in self.plan.items() if _directional(modules, params[n], holders)}
        self._directions: dict[tuple, torch.Tensor] = {}

    @property
    def layers(self) -> list[str]:
        """Names of the modules whose calls are captured, in first-use order."""
        return list(dict.fromkeys(m for holders in self.plan.values() for m, _ in holders))

    def drop(self, layers: Sequence[str]) -> list[str]:
        """Removes the parameters held by any of `layers` from the plan; returns their names."""
        gone = [n for n, holders in self.plan.items() if any(m in layers for m, _ in holders)]
        for n in gone:
            del self.plan[n]
        return gone

    def __call__(
        self,
        state: Mapping[str, torch.Tensor],
        inputs: Tree,
        targets: Tree,
        out: torch.Tensor,
        columns: Mapping[str, tuple[int, int]],
    ) -> tuple[list[str], dict[str, str]]:
        """Writes each planned parameter's (batch, width) gradients into out[:, offset:offset + width]
        (columns: name -> (offset, width)). Returns the captured layers that did not run (they add
        nothing) and {layer: why} for those that ran on tensors that are not batch-first (their
        parameters' columns are left unwritten). Sets `unsummed` (_unsummed; _unsummed_along for the weights in
        `directional`): the layers whose rows do not sum to the gradient of the batch's summed loss, taken from the
        same backward pass."""
        rows = batch_rows(targets, "targets")
        held: dict[str, list[tuple[str, str]]] = {}  # layer -> [(parameter, attribute)] it holds
        for name, holders in self.plan.items():
            for m, leaf in holders:
                held.setdefault(m, []).append((name, leaf))
        written: set[str] = set()
        unusable: dict[str, str] = {}
        captured = [0]

        def consume(layer: str, index: int, call: Call) -> None:
            captured[0] += sum(t.numel() * t.element_size() for t in (call.input, call.grad))
            if layer in unusable:
                return
            module = self._modules[layer]
            try:
                a, b = token_form(module, call, rows)
            except NotCaptured as e:
                unusable[layer] = str(e)
                return
            sixteen_bit = _layer_norm_sums(module, call)
            for name, leaf in held[layer]:
                offset, width = columns[name]
                dest = out[:, offset : offset + width].view(rows, *getattr(module, leaf).shape)
                write_per_example_grad(module, leaf, a, b, dest, accumulate=name in written)
                written.add(name)
                if name in self.directional:  # the rows' sum along the directions: no weight-sized GEMM
                    part = _sketch(module, a, b, self._along(dest.shape[1], _sketch_dtype(b), b.device))
                elif leaf in sixteen_bit:  # autograd's own 16-bit sum over the positions (_layer_norm_sums)
                    part = sixteen_bit[leaf].to(dest.dtype)
                else:  # the call's rows summed: its tokens of every example as one example's (a GEMM for a Linear)
                    part = per_example_grad(
                        module, leaf, a.reshape(1, -1, *a.shape[2:]), b.reshape(1, -1, b.shape[-1])
                    )[0]
                hooked[name] = part if name not in hooked else hooked[name] + part
                tokens[name] = tokens.get(name, 0) + a.shape[0] * a.shape[1]
                dtypes[name] = max(dtypes.get(name, b.dtype), b.dtype, key=lambda d: torch.finfo(d).eps)

        self.expanded = set()
        self.outputs = self.losses = None
        self.unsummed = {}
        summed: dict[str, torch.Tensor | None] = dict.fromkeys(self.plan)  # autograd's, every use included
        hooked: dict[str, torch.Tensor] = {}  # the captured calls' gradients summed over the batch
        tokens: dict[str, int] = {}  # the positions those sums add up (examples x tokens, over the calls)
        dtypes: dict[str, torch.dtype] = {}  # the coarsest dtype of the output gradients they were computed from
        seen_losses: list[torch.Tensor] = []
        loss_fn = recording(self.loss_fn, seen_losses)
        with model_outputs(self.model, rows) as outputs:
            counts = stream(
                self.model, self.layers, state, loss_fn, inputs, targets, consume, self.expanded, summed=summed
            )
        self.losses = recorded_losses(seen_losses, rows)
        self.outputs = outputs[0] if len(outputs) == 1 else None
        self.bytes_per_row = captured[0] / rows
        for name, holders in self.plan.items():
            if name not in written and not any(m in unusable for m, _ in holders):
                offset, width = columns[name]
                out[:, offset : offset + width].zero_()  # its layers did not run
        # under torch.autocast, autograd's `summed` rounds once in its dtype (GEMMs accumulate in float32), not once a
        # position as a 16-bit model's own sums: that dtype's tolerances for one position (tokens: real misses pass).
        # (a LayerNorm run on a 16-bit input under CPU autocast: its hooked sums are autograd's own, _layer_norm_sums)
        autocast = _autocast_dtype(out.device.type) if out.device.type in ("cpu", "cuda") else None
        for name, holders in self.plan.items():
            if not any(m in unusable for m, _ in holders) and name in hooked:
                offset, width = columns[name]
                rows_of = out[:, offset : offset + width]
                count, dtype = tokens[name], dtypes[name]
                # (a 16-bit model's parameter keeps its own sums' tolerance: its LayerNorm sums positions in 16 bits)
                own = getattr(self._modules[holders[0][0]], holders[0][1]).dtype
                if autocast is not None and torch.finfo(own).eps < torch.finfo(autocast).eps:
                    count, dtype = 1, max(dtype, autocast, key=lambda d: torch.finfo(d).eps)
                if name in self.directional:
                    m, leaf = holders[0]
                    u = self._along(getattr(self._modules[m], leaf).shape[0], hooked[name].dtype, hooked[name].device)
                    found = _unsummed_along(hooked[name], summed[name], u, rows_of, count, dtype)
                else:
                    found = _unsummed(hooked[name], summed[name], rows_of, count, dtype)
                if found is not None:
                    self.unsummed.setdefault(holders[0][0], found)
        return [m for m, count in counts.items() if not count], unusable

    def _along(self, first: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The (SUM_DIRECTIONS, first) standard Gaussian directions of a weight whose first dimension is `first`:
        the same on every call and device (a fixed-seed CPU generator), kept for the next batches."""
        key = (first, dtype, device)
        if key not in self._directions:
            generator = torch.Generator().manual_seed(_SUM_SEED)
            u = torch.randn(SUM_DIRECTIONS, first, generator=generator, dtype=torch.float64, device="cpu")
            self._directions[key] = u.to(device, dtype)
        return self._directions[key]


def _layer_norm_sums(module: nn.Module, call: Call) -> dict[str, torch.Tensor]:
    """{leaf: gradient} of a LayerNorm's float32 weight and bias from one call on a 16-bit input under CPU
    autocast, as autograd computes them: torch's CPU LayerNorm backward on that input sums them over the positions
    in 16 bits (the bias's sum of one sign stalls: 0.27 of its size off at 4096 positions, 0.9 at 32768), which
    its own kernel, rerun on the same tensors and thread count, reproduces bit for bit; so only a use outside the
    call (a functional call, a hook) separates them. {} otherwise (the float32 sums of the token form apply)."""
    x, g = call.input, call.grad
    if (
        not isinstance(module, nn.LayerNorm)
        or x.device.type != "cpu"
        or not torch.is_autocast_enabled("cpu")
        or x.dtype not in (torch.bfloat16, torch.float16)
        or g.dtype != x.dtype
        or module.weight is None
        or module.weight.dtype == x.dtype
    ):
        return {}
    shape = list(module.normalized_shape)
    with torch.no_grad():
        _, mean, rstd = torch.ops.aten.native_layer_norm(x, shape, module.weight, module.bias, module.eps)
        _, weight, bias = torch.ops.aten.native_layer_norm_backward(
            g, x, shape, mean, rstd, module.weight, module.bias, [False, True, module.bias is not None]
        )
    return {"weight": weight} if bias is None else {"weight": weight, "bias": bias}


def _directional(modules: Mapping[str, nn.Module], parameter: torch.Tensor, holders: list[tuple[str, str]]) -> bool:
    """Whether a parameter's batch sum is compared along SUM_DIRECTIONS directions (_sketch): the weight of
    Linear, HF Conv1D or Embedding layers only (a (p, q) matrix whose rows sum as outer products or scattered
    rows), where K (p + q) a token is at most half the p q of the full sum (a tiny layer keeps the full sum)."""
    if parameter.dim() != 2 or any(leaf != "weight" or isinstance(modules[m], nn.LayerNorm) for m, leaf in holders):
        return False
    p, q = parameter.shape
    return 2 * SUM_DIRECTIONS * (p + q) <= p * q


def _sketch_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a batch sum is taken along the directions in: float64 for float64 gradients, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _sketch(module: nn.Module, a: torch.Tensor, b: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """u (K, p) times the weight gradient (p, q) of one call's tokens of every example summed, from its token form
    (layer_rules), without forming it: Linear sum_t (u b_t) a_t^T, Conv1D sum_t (u a_t) b_t^T, Embedding
    sum_t u[:, id_t] b_t^T (the padding row left out, as torch does); in u's dtype, K (p + q) a token."""
    grads = b.reshape(-1, b.shape[-1]).to(u.dtype)
    if isinstance(module, nn.Embedding):
        ids = a.reshape(-1)
        if module.padding_idx is not None:
            used = ids != module.padding_idx
            ids, grads = ids[used], grads[used]
        return u[:, ids] @ grads
    inputs = a.reshape(-1, a.shape[-1]).to(u.dtype)
    left, right = (grads, inputs) if isinstance(module, nn.Linear) else (inputs, grads)
    return (left @ u.T).T @ right  # 15-25% faster than (u @ left.T) @ right on one CPU thread


def _unsummed(
    hooked: torch.Tensor,
    total: torch.Tensor | None,
    rows: torch.Tensor,
    tokens: int = 1,
    dtype: torch.dtype | None = None,
) -> tuple[float, float] | None:
    """(gap, tolerance) when `hooked`, a parameter's gradient from the captured calls summed over the batch (what its
    per-example `rows`, (batch, width), sum to: each call's tokens of every example taken as one example's), differs
    from `total` (autograd's gradient of the batch's summed loss, every use of the parameter included; None: zero) by
    more than first_rows_check.tolerances of the coarser of their dtypes (rtol + atol; in 16 bits at least those of a
    reference summed over `tokens` positions in that dtype, and eps x `tokens`, the bound of such a sum: torch's CPU
    LayerNorm backward sums its weight's gradient over the batch's tokens in 16 bits, 4 (bfloat16) to 6 (float16) eps
    off at 2048 tokens on 4 threads, 34 eps (bfloat16) on one, so a 16-bit check sees gross misses only) times the
    larger of the norm of `total` and the Frobenius norm of `rows` (plus one subnormal step of their dtype an element),
    the gap measured in the 2-norm: a use of the parameter outside its layer's forward (a functional call, a forward
    hook) that the hooks do not see. Rounding makes about eps times that scale (random
    signs over the rows; the norm of `total` where the rows point one way), while a use missed in one row of a batch
    of B rows misses about that row's norm, ~1 / sqrt(B) of the rows' norm (at least 1 / B of the scale): in float32
    one row of up to ~8000 is seen (a gap over the floor where the rows and `total` are all zero: math.inf, not a
    ZeroDivisionError). None when they agree or either side is not finite (a NaN example: scoring names
    it). Costs one GEMM-sized sum per call (no pass over `rows`) and the parameter's gradient in the hooked backward
    pass; the rows' norms (one pass over them) only where the gap is over the tolerance times |total| (rows that
    cancel: a well-fit batch). `dtype`: the dtype whose tolerances apply, where the gradients were computed in a
    coarser one than `rows` and `hooked` are held in (token_projection: 16-bit output gradients projected in
    float32); default the coarser of theirs."""
    sums = hooked.reshape(-1).double()
    want = _dense(total, hooked).reshape(-1).double()
    return _judged(sums, want, rows, tokens, coarsest([rows, hooked]) if dtype is None else dtype, sums.numel())


def _unsummed_along(
    hooked: torch.Tensor,
    total: torch.Tensor | None,
    u: torch.Tensor,
    rows: torch.Tensor,
    tokens: int,
    dtype: torch.dtype,
) -> tuple[float, float] | None:
    """_unsummed of a (p, q) weight along its K fixed Gaussian directions u (K, p) (HookGradients._along): `hooked`
    is u times the captured calls' batch sum ((K, q), _sketch), `total` autograd's (p, q) gradient (None: zero),
    `dtype` the one the hooked gradients were computed in. ||u X||_F^2 / K is an unbiased estimate of ||X||_F^2 (each
    row of u X is a Gaussian combination of X's rows), so the gap and the size of `total` are ||u (hooked -
    total)||_F / sqrt(K) and ||u total||_F / sqrt(K), judged as in _unsummed: the same tolerance times the same scale
    (the larger of that size and the rows' exact Frobenius norm), the floor of p q elements. A miss parallel to
    `total` (rows pointing one way: the 1 / B case) keeps its exact ratio to the size. Otherwise a miss's estimate
    is its norm times sqrt(chi^2_K / K) at worst (rank one; a miss of rank r and even singular values has r K
    degrees of freedom): with K = 16 a rank-one miss twice the tolerance escapes with probability 1e-3, three times
    4e-6, where the rows' norm sets the scale (4e-3 and 3e-5, an F(16, 16) law, where the estimated size of a near
    rank-one `total` does), and a miss in one row of B in float32, ~1 / sqrt(B) of the scale where the rows point
    every way, is 100x the tolerance at B = 8000; rounding, spread over many ranks, is inflated by at most 2x
    (chi^2_16 > 64: 1e-7), far within the tolerance's margin over it. Costs K (p + q) a token (_sketch) and one pass
    over `total`, against p q a token for the full sum."""
    k, first = u.shape
    want = torch.zeros_like(hooked) if total is None else u @ _dense(total, u).reshape(first, -1).to(u.dtype)
    sums, want = ((t / math.sqrt(k)).reshape(-1).double() for t in (hooked, want))
    return _judged(sums, want, rows, tokens, dtype, first * hooked.shape[1])


def _dense(total: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """`total` as a dense tensor (nn.Embedding(sparse=True) gives a sparse one); None: a zero one like `like`."""
    if total is None:
        return torch.zeros_like(like)
    return total.to_dense() if total.is_sparse else total


def _judged(
    sums: torch.Tensor, want: torch.Tensor, rows: torch.Tensor, tokens: int, dtype: torch.dtype, elements: int
) -> tuple[float, float] | None:
    """_unsummed's verdict on float64 `sums` against `want` (flat), `elements` the parameter's size."""
    wide = torch.float32 if rows.element_size() < 4 else rows.dtype
    tolerance = max(sum(tolerances(dtype)), sum(tolerances(dtype, tokens, widened=False)))
    if torch.finfo(dtype).bits <= 16:  # autograd's own 16-bit sum over the positions: eps each, at worst
        tolerance = max(tolerance, torch.finfo(dtype).eps * tokens)
    # one subnormal step an element: 16-bit gradients underflow, each side in its own way
    floor = math.sqrt(elements) * torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    gap, size = (t.item() for t in torch.linalg.vector_norm(torch.stack([sums - want, want]), dim=1))
    if not math.isfinite(gap) or gap <= tolerance * size + floor:
        return None
    norms = torch.linalg.vector_norm(rows, dim=1, dtype=wide).double()  # rows' norms: no (batch, width) temporary
    scale = max(torch.linalg.vector_norm(norms).item(), size)
    if not math.isfinite(scale) or gap <= tolerance * scale + floor:
        return None
    return (gap / scale if scale > 0 else math.inf), tolerance  # zero rows and total: a gap over the floor is all miss


def recording(loss_fn: LossFn, seen: list) -> LossFn:
    """loss_fn, appending what each call returns to `seen`; functools.wraps of the function (a module's forward,
    unless the module overrides __call__) so that losses.loss_mismatch reads the user's signature and code."""
    target = loss_fn
    if isinstance(loss_fn, nn.Module) and type(loss_fn).__call__ is nn.Module.__call__:
        target = loss_fn.forward

    @functools.wraps(target)
    def recorded(outputs, targets):
        losses = loss_fn(outputs, targets)
        seen.append(losses)
        return losses

    return recorded


def recorded_losses(seen: list, rows: int) -> torch.Tensor | None:
    """The per-example losses of `rows` examples that `recording` saw, detached (rows,) on their device: one call's,
    or one call's per example (a (1,) each: one example at a time); None when the calls returned anything else."""
    if not seen or not all(isinstance(t, torch.Tensor) for t in seen):
        return None
    shapes = [(rows,)] if len(seen) == 1 else [(1,)] * rows
    if [tuple(t.shape) for t in seen] != shapes:
        return None
    return torch.cat([t.detach() for t in seen]) if len(seen) > 1 else seen[0].detach().clone()


def output_leaves(output: object) -> list[torch.Tensor]:
    """The floating tensors of a model's output tree (a tensor; tuples and lists; dicts and other Mappings, Hugging
    Face ModelOutput included, in their own order), detached, depth first."""
    if isinstance(output, torch.Tensor):
        return [output.detach()] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in output_leaves(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in output_leaves(v)]
    return []


@contextmanager
def model_outputs(model: nn.Module, rows: int) -> Iterator[list[list[torch.Tensor]]]:
    """A list receiving output_leaves of each output `model` returns while the context is open (a forward hook) on
    batches of `rows` examples; a tensor of more than rows x COMPARED_ELEMENTS elements is replaced, as it is
    captured, by an empty (its first dimension, 0) one (compared with nothing), so that it is freed with its pass."""
    seen: list[list[torch.Tensor]] = []

    def kept(t: torch.Tensor) -> torch.Tensor:
        return t if t.numel() <= rows * COMPARED_ELEMENTS else t.new_zeros(t.shape[0], 0)

    handle = model.register_forward_hook(
        lambda module, args, output: seen.append([kept(t) for t in output_leaves(output)])
    )
    try:
        yield seen
    finally:
        handle.remove()
