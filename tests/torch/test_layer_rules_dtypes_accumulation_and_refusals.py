"""layer_rules on hand-made calls, against float64 NumPy: LayerNorm's own eps, accumulation into a destination
(of the computed dtype or another), the dtype under autocast's mix (a float32, b bfloat16), and the calls and
modules it refuses (a batch dimension that is not the rows', float ids, Embedding options it does not follow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tracin.torch.capture import Call, NotCaptured
from tracin.torch.layer_rules import covers, per_example_grad, token_form, write_per_example_grad


def _randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def test_layer_norm_weight_gradient_uses_the_modules_own_eps():
    """x_hat = (x - mean) / sqrt(var + eps) with the module's eps (0.5 here, far from torch's default 1e-5)."""
    x, b = _randn(3, 4, 6, seed=1) * 0.3, _randn(3, 4, 6, seed=2)
    module = nn.LayerNorm(6, eps=0.5)
    a_t, b_t = token_form(module, Call(torch.tensor(x, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)), 3)
    got = per_example_grad(module, "weight", a_t, b_t)
    x_hat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 0.5)
    np.testing.assert_allclose(got.numpy(), (x_hat * b).sum(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
def test_linear_weight_and_bias_gradients_are_added_to_the_destination_when_accumulating(out_dtype):
    """accumulate=True adds to what `out` holds (a tied weight's second holder), whether `out` has the dtype the
    gradients are computed in (float32 here) or another (float64: computed, then added)."""
    a, b = _randn(2, 5, 3, seed=3), _randn(2, 5, 4, seed=4)
    module = nn.Linear(3, 4)
    a_t, b_t = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    before_w, before_c = _randn(2, 4, 3, seed=5), _randn(2, 4, seed=6)
    out_w, out_c = torch.tensor(before_w, dtype=out_dtype), torch.tensor(before_c, dtype=out_dtype)
    write_per_example_grad(module, "weight", a_t, b_t, out_w, accumulate=True)
    write_per_example_grad(module, "bias", a_t, b_t, out_c, accumulate=True)
    np.testing.assert_allclose(out_w.numpy(), before_w + np.einsum("bto,bti->boi", b, a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_c.numpy(), before_c + b.sum(1), rtol=1e-5, atol=1e-5)


def test_layer_norm_bias_and_weight_accumulate_too():
    x, b = _randn(2, 3, 5, seed=7), _randn(2, 3, 5, seed=8)
    module = nn.LayerNorm(5)
    a_t, b_t = token_form(module, Call(torch.tensor(x, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)), 2)
    out = torch.ones(2, 5)
    write_per_example_grad(module, "bias", a_t, b_t, out, accumulate=True)
    np.testing.assert_allclose(out.numpy(), 1 + b.sum(1), rtol=1e-5, atol=1e-6)


def test_a_float32_input_with_a_bfloat16_output_gradient_is_computed_in_float32():
    """Under autocast a Linear's input is float32 and its output gradient bfloat16: the per-example gradient is
    float32, each entry the product of the input and the bfloat16 gradient's exact value (not rounded to bf16)."""
    a, b = _randn(3, 1, 4, seed=9), _randn(3, 1, 2, seed=10)
    b16 = torch.tensor(b, dtype=torch.float32).to(torch.bfloat16)
    got = per_example_grad(nn.Linear(4, 2), "weight", torch.tensor(a, dtype=torch.float32), b16)
    assert got.dtype == torch.float32
    want = np.einsum("bto,bti->boi", b16.double().numpy(), a)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)


def test_a_call_whose_first_dimension_is_not_the_batch_is_refused():
    """(6, 4) on a batch of 3 is not three examples' tokens: it would be read as 2 positions each, mixing
    examples 0 and 1 into example 0."""
    with pytest.raises(NotCaptured, match=r"input of shape \(6, 4\) is not \(batch=3, \.\.\., 4\)"):
        token_form(nn.Linear(4, 2), Call(torch.ones(6, 4), torch.ones(6, 2)), 3)
    with pytest.raises(NotCaptured, match=r"output gradient of shape \(6, 2\) is not \(batch=3, \.\.\., 2\)"):
        token_form(nn.Linear(4, 2), Call(torch.ones(3, 2, 4), torch.ones(6, 2)), 3)


def test_float_embedding_ids_are_refused():
    with pytest.raises(NotCaptured, match=r"ids of shape \(3, 2\) and dtype torch.float32 are not integers"):
        token_form(nn.Embedding(5, 4), Call(torch.zeros(3, 2), torch.ones(3, 2, 4)), 3)


@pytest.mark.parametrize("options", [{"max_norm": 1.0}, {"scale_grad_by_freq": True}])
def test_embeddings_whose_gradient_is_not_the_scattered_output_gradient_are_not_covered(options):
    """scale_grad_by_freq divides each row's gradient by its id's count in the batch (not per example), max_norm
    renormalises rows in the forward: the scatter of b is not their gradient."""
    module = nn.Embedding(5, 4, **options)
    assert not covers(module)
    with pytest.raises(NotCaptured, match="not a layer type the hooks cover"):
        token_form(module, Call(torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2, 4)), 3)
    assert covers(nn.Embedding(5, 4))


def test_embedding_rows_accumulate_and_skip_the_padding_row():
    """ids (2, 3) with padding_idx 0: example i's gradient is b scattered onto its ids' rows, row 0 left as it
    was (torch gives the padding row no gradient); accumulate=True adds that onto what `out` holds."""
    ids = torch.tensor([[1, 0, 1], [3, 2, 0]])
    b = _randn(2, 3, 4, seed=11)
    before = _randn(2, 5, 4, seed=12)
    out = torch.tensor(before, dtype=torch.float32)
    write_per_example_grad(
        nn.Embedding(5, 4, padding_idx=0), "weight", ids, torch.tensor(b, dtype=torch.float32), out, True
    )
    want = before.copy()
    for i in range(2):
        for t in range(3):
            if ids[i, t] != 0:
                want[i, ids[i, t]] += b[i, t]
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_a_callers_bfloat16_autocast_does_not_round_the_products(accumulate, strided):
    """Under the caller's torch.autocast (CPU, bfloat16) float32 tokens still give float32-exact gradients: the
    rules run with autocast off, where bmm would otherwise round its operands to bfloat16 (3 significant digits)."""
    a, b = _randn(3, 4, 5, seed=13), _randn(3, 4, 6, seed=14)
    wide = torch.zeros(3, 6, 5 + 2 * strided)
    out = wide[:, :, :5] if strided else wide
    with torch.autocast("cpu", dtype=torch.bfloat16):
        write_per_example_grad(
            nn.Linear(5, 6),
            "weight",
            torch.tensor(a, dtype=torch.float32),
            torch.tensor(b, dtype=torch.float32),
            out,
            accumulate,
        )
    np.testing.assert_allclose(out.numpy(), np.einsum("bto,bti->boi", b, a), rtol=1e-5, atol=1e-5)


def test_strided_weight_gradients_formed_in_several_temporaries_are_all_written():
    """With two threads a strided destination's small (128 x 128) per-example gemms are formed 512 examples
    (32 MiB) at a time and copied into place: 513 examples need two temporaries, the example on each side of
    the boundary included."""
    rng = np.random.default_rng(15)
    a, b = rng.standard_normal((513, 2, 128)), rng.standard_normal((513, 2, 128))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        wide = torch.full((513, 128, 129), np.nan)
        out = wide[:, :, :128]
        write_per_example_grad(
            nn.Linear(128, 128),
            "weight",
            torch.tensor(a, dtype=torch.float32),
            torch.tensor(b, dtype=torch.float32),
            out,
            accumulate=False,
        )
    finally:
        torch.set_num_threads(threads)
    want = np.einsum("bto,bti->boi", b, a)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
    assert torch.isnan(wide[:, :, 128]).all()  # the column past the view untouched
