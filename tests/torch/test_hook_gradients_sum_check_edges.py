"""The hooked rows' batch-sum check (hook_gradients._unsummed, _unsummed_along) at its edges, against hand-worked
values: 16-bit rows whose norms overflow their dtype, the subnormal floor of p x q elements, sides that are not
finite, and a LayerNorm whose weight is a matrix (not a weight the directions apply to)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tracin.torch.first_rows_check import tolerances
from tracin.torch.hook_gradients import SUM_DIRECTIONS, HookGradients, _unsummed, _unsummed_along

CE = nn.CrossEntropyLoss(reduction="none")
SUBNORMAL16 = 2.0**-24  # float16's smallest step: tiny x eps


def _tolerance(dtype: torch.dtype) -> float:
    """The check's tolerance of one position in `dtype` (16 bits: at least eps x 1 position)."""
    tol = max(sum(tolerances(dtype)), sum(tolerances(dtype, 1, widened=False)))
    return max(tol, torch.finfo(dtype).eps) if torch.finfo(dtype).bits <= 16 else tol


def test_float16_rows_whose_norms_overflow_float16_still_show_a_missed_row():
    """Rows of +-1000 over 10000 columns: each row's norm, 1e5, is past float16's 65504, so it is taken in float32;
    a hooked sum off by a whole row (1e5) is 1 / sqrt(2) of the rows' Frobenius norm (sqrt(2) x 1e5), not hidden by
    an infinite scale."""
    rows = torch.full((2, 10000), 1000.0, dtype=torch.float16)
    rows[1] = -1000.0
    found = _unsummed(rows[0].clone(), torch.zeros(10000, dtype=torch.float16), rows)
    assert found is not None
    gap, tolerance = found
    assert gap == pytest.approx(1 / math.sqrt(2), rel=1e-4) and tolerance == pytest.approx(_tolerance(torch.float16))


def test_a_gap_of_one_float16_subnormal_step_an_element_is_no_miss():
    """float16 gradients underflow each side in its own way: a gap of one subnormal step in every element (rows of
    zeros: no scale to compare it with) is within the floor and passes; two steps are a miss, measured against a
    zero scale as the gap itself."""
    n = 100
    zeros, rows = torch.zeros(n, dtype=torch.float16), torch.zeros(3, n, dtype=torch.float16)
    assert _unsummed(torch.full((n,), SUBNORMAL16, dtype=torch.float16), zeros, rows) is None
    found = _unsummed(torch.full((n,), 2 * SUBNORMAL16, dtype=torch.float16), zeros, rows)
    assert found is not None and found[0] == math.inf


def test_the_floor_along_the_directions_counts_the_weights_p_by_q_elements():
    """_unsummed_along of a (64, 4) weight: its floor is one float16 subnormal step for each of its 256 elements
    (sqrt(256) = 16 steps), not for each of the K x q = 64 entries of its sketch (8 steps): a sketched gap of 12
    steps passes, one of 20 does not."""
    p, q = 64, 4
    u = torch.randn(SUM_DIRECTIONS, p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = torch.zeros(3, p * q, dtype=torch.float16)
    for steps, passes in [(12, True), (20, False)]:
        # ||hooked||_F / sqrt(K) = c sqrt(K q) / sqrt(K) = c sqrt(q) = 2 c: c = steps / 2
        hooked = torch.full((SUM_DIRECTIONS, q), steps / 2 * SUBNORMAL16, dtype=torch.float64)
        found = _unsummed_along(hooked, None, u, rows, 1, torch.float16)
        assert (found is None) == passes, (steps, found)


def test_sides_that_are_not_finite_are_left_to_scoring():
    """A NaN in the hooked sum (a NaN example) or in the rows (the scale then NaN) gives no verdict: None, not a
    NaN gap flagged as a missed use (scoring names the NaN rows)."""
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(3, 8, generator=g, dtype=torch.float64)
    total = rows.sum(0)
    assert _unsummed(total + 1.0, total, rows) is not None  # a real miss, for contrast
    assert _unsummed(torch.full((8,), math.nan, dtype=torch.float64), total, rows) is None
    nan_rows = rows.clone()
    nan_rows[1, 2] = math.nan
    assert _unsummed(total + 1.0, total, nan_rows) is None


class _Norm2D(nn.Module):
    """A LayerNorm over (64, 64) positions: its weight is a (64, 64) matrix, big enough for the directions were it
    a Linear's, but scaled elementwise."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.head = nn.LayerNorm((64, 64)), nn.Linear(64, 3)
        with torch.no_grad():
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def forward(self, x):
        return self.head(self.norm(x).mean(1))


def test_a_layer_norms_matrix_weight_is_summed_in_full_and_its_rows_are_exact():
    """Only Linear, Conv1D and Embedding weights are compared along the directions: a LayerNorm's (64, 64) weight
    keeps the full sum, which the hooked rows pass (no layer flagged), the rows those of float64 autograd."""
    model = _Norm2D().double()
    names = [n for n, _ in model.named_parameters()]
    hooks = HookGradients(model, names, CE)
    assert hooks.directional == set()
    columns, offset = {}, 0
    for n, p in model.named_parameters():
        columns[n], offset = (offset, p.numel()), offset + p.numel()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 64, 64, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
    out = torch.empty(4, offset, dtype=torch.float64)
    assert hooks(model.state_dict(), {"x": x}, y, out, columns) == ([], {})
    assert hooks.unsummed == {}
    params = [p for _, p in model.named_parameters()]
    want = []
    for i in range(4):
        grads = torch.autograd.grad(CE(model(x[i : i + 1]), y[i : i + 1]).sum(), params)
        want.append(torch.cat([t.reshape(-1) for t in grads]))
    want = torch.stack(want).numpy()
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def _token_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.float().transpose(1, 2), y, reduction="none").sum(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_sixteen_bit_layer_norm_of_one_long_sequence_is_judged_over_all_its_positions(dtype):
    """A 16-bit LayerNorm's backward sums its weight's gradient over the batch's positions in 16 bits (one thread:
    the coarsest order, 0.085 of its size off in bfloat16, 0.009 in float16, at 2048 positions): one example of
    2048 positions is judged as a sum of 2048 positions (eps x 2048), not of one (eps: flagged as a missed use)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 5)).to(dtype)
    params = dict(model.named_parameters())
    columns, width = {}, 0
    for name, p in params.items():
        columns[name], width = (width, p.numel()), width + p.numel()
    x, y = torch.randn(1, 2048, 6).to(dtype), torch.randint(0, 5, (1, 2048))
    hooks = HookGradients(model, list(params), _token_ce)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hooks(dict(model.state_dict()), x, y, torch.empty(1, width, dtype=dtype), columns)
    finally:
        torch.set_num_threads(threads)
    assert hooks.unsummed == {}


class _NormOfTwoDtypes(nn.Module):
    """A float32 LayerNorm called on a bfloat16 copy of its input (its output, so its output gradient, bfloat16)
    and on the float32 input, no autocast."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.norm(x.bfloat16()).float() + self.norm(x))


def test_a_parameter_whose_calls_have_output_gradients_of_two_dtypes_is_judged_in_the_coarser():
    """The LayerNorm's weight sums its bfloat16 call's gradient over 4 x 256 positions in bfloat16 (one thread:
    0.014 of its size off): judged at bfloat16's tolerance over those positions, the coarser of its calls' dtypes,
    it passes; at float32's (1.1e-4) it would be flagged as a use the hooks do not see."""
    model = _NormOfTwoDtypes()
    params = dict(model.named_parameters())
    columns, width = {}, 0
    for name, p in params.items():
        columns[name], width = (width, p.numel()), width + p.numel()
    x, y = torch.randn(4, 256, 16), torch.randint(0, 5, (4, 256))
    hooks = HookGradients(model, list(params), lambda out, t: CE(out.transpose(1, 2), t).sum(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hooks(dict(model.state_dict()), x, y, torch.empty(4, width), columns)
    finally:
        torch.set_num_threads(threads)
    assert hooks.unsummed == {}
