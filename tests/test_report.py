"""Per-checkpoint self-influence and top-k contributions, and the checkpoint diagnostics of
tracin.report, against float64 NumPy references."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import tracin
from reference import factored_to_full
from tracin.report import checkpoint_contributions, checkpoint_diagnostics


def _full(rng, n, dims=(7, 3, 12), dtype=np.float32):
    return [rng.standard_normal((n, d)).astype(dtype) for d in dims]


# 2 checkpoints x 2 layers, as a factored export records them: one fingerprint per checkpoint
TWO_BY_TWO_DIMS = ((3, 4), (2, 5), (3, 4), (2, 5))
TWO_BY_TWO_WEIGHTS = [0.1, 0.1, 0.01, 0.01]
TWO_BY_TWO_METADATA = {"fingerprints": {"checkpoints": ["ck0", "ck1"]}}


def _factored(rng, n, dims=((4, 5), (3, 6))):
    return (
        [rng.standard_normal((n, p)).astype(np.float32) for p, _ in dims],
        [rng.standard_normal((n, q)).astype(np.float32) for _, q in dims],
    )


@pytest.mark.parametrize("device", ["cpu", "torch:cpu"])
def test_per_checkpoint_self_influence_matches_float64_terms(device):
    if device == "torch:cpu":
        pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    mats, w = _full(rng, 300), [0.5, -2.0, 0.1]
    got = tracin.self_influence(tracin.Gradients(mats, w), per_checkpoint=True, device=device)
    expected = np.stack([wc * (m.astype(np.float64) ** 2).sum(1) for wc, m in zip(w, mats, strict=True)], axis=1)
    assert got.dtype == np.float32 and got.shape == (300, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(got.sum(1), tracin.self_influence(tracin.Gradients(mats, w)), rtol=1e-5, atol=1e-5)


def test_per_checkpoint_self_influence_of_factored_and_stored_sets(tmp_path):
    rng = np.random.default_rng(1)
    left, right = _factored(rng, 200)
    w = [0.1, 0.01]
    expected = np.stack(
        [
            wc * (lf.astype(np.float64) ** 2).sum(1) * (rt.astype(np.float64) ** 2).sum(1)
            for wc, lf, rt in zip(w, left, right, strict=True)
        ],
        axis=1,
    )
    np.testing.assert_allclose(
        tracin.self_influence(tracin.FactoredGradients(left, right, w), per_checkpoint=True), expected, rtol=1e-5
    )
    mats = _full(rng, 200, dtype=np.float16)
    writer = tracin.GradientStore.create(
        tmp_path / "s", 200, [m.shape[1] for m in mats], [1.0, 2.0, 3.0], dtype="float16"
    )
    with writer:
        for c, m in enumerate(mats):
            writer.write(c, 0, m)
        store = writer.finalize()
    expected = np.stack([wc * (m.astype(np.float64) ** 2).sum(1) for wc, m in zip([1, 2, 3], mats, strict=True)], 1)
    np.testing.assert_allclose(tracin.self_influence(store, per_checkpoint=True), expected, rtol=1e-5)


def test_per_checkpoint_must_be_a_bool():
    with pytest.raises(TypeError, match="per_checkpoint must be True or False"):
        tracin.self_influence(np.ones((3, 2), np.float32), per_checkpoint="yes")


def _pair_terms(test, train, w, indices):
    """float64 (m, k, C) reference: w_c <t_c, x_c[indices]> per checkpoint."""
    return np.stack(
        [
            wc * np.einsum("td,tkd->tk", t.astype(np.float64), x.astype(np.float64)[indices])
            for wc, t, x in zip(w, test, train, strict=True)
        ],
        axis=2,
    )


@pytest.mark.parametrize("side", ["proponents", "opponents"])
def test_checkpoint_contributions_of_full_gradients_match_float64(side):
    rng = np.random.default_rng(2)
    train, test, w = _full(rng, 500), _full(rng, 9), [1.0, 0.3, -0.2]
    result = tracin.top_k(tracin.Gradients(test, w), tracin.Gradients(train, w), k=6, side=side)
    got = checkpoint_contributions(tracin.Gradients(test, w), tracin.Gradients(train, w), result)
    np.testing.assert_allclose(got, _pair_terms(test, train, w, result.indices), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.sum(2), result.values, rtol=1e-5, atol=1e-5)


def test_checkpoint_contributions_of_factored_gradients_match_float64():
    rng = np.random.default_rng(3)
    (left, right), (tl, tr), w = _factored(rng, 300), _factored(rng, 5), [0.1, 2.0]
    train, test = tracin.FactoredGradients(left, right, w), tracin.FactoredGradients(tl, tr, w)
    result = tracin.top_k(test, train, k=4)
    got = checkpoint_contributions(test, train, result)
    expected = _pair_terms(tl, left, w, result.indices) * _pair_terms(tr, right, [1, 1], result.indices)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_checkpoint_contributions_refuse_bad_results():
    rng = np.random.default_rng(4)
    train, test = tracin.Gradients(_full(rng, 20)), tracin.Gradients(_full(rng, 3))
    both = tracin.top_k(test, train, k=2, side="both")
    with pytest.raises(TypeError, match="pass .proponents or .opponents"):
        checkpoint_contributions(test, train, both)
    bad = both.proponents._replace(indices=both.proponents.indices + 20)
    with pytest.raises(ValueError, match=r"result.indices must lie in \[0, 20\)"):
        checkpoint_contributions(test, train, bad)
    with pytest.raises(ValueError, match="with m = 3 test rows"):
        checkpoint_contributions(test, train, both.proponents._replace(indices=both.proponents.indices[:2]))


def _bfloat16_round(a: np.ndarray) -> np.ndarray:
    """float64 values of the bfloat16 nearest to each float32 (ties to even), by bit arithmetic."""
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def _stored(path, mats, w, dtype):
    writer = tracin.GradientStore.create(path, len(mats[0]), [m.shape[1] for m in mats], w, dtype=dtype)
    with writer:
        for c, m in enumerate(mats):
            writer.write(c, 0, m)
        return writer.finalize()


@pytest.mark.parametrize("bf16_side", ["test", "train"])
def test_checkpoint_contributions_decode_each_side_with_its_own_dtype(tmp_path, bf16_side):
    # a bfloat16 side is stored as uint16 bits: decoding it with the other side's float32 code read
    # the bits as numbers (bf16 test) or float32 bits as bfloat16 (bf16 train, NaN)
    rng = np.random.default_rng(8)
    train, test, w = _full(rng, 80, dims=(16, 5)), _full(rng, 4, dims=(16, 5)), [0.5, 0.25]
    if bf16_side == "test":
        sets = _stored(tmp_path / "s", test, w, "bfloat16"), tracin.Gradients(train, w)
        test = [_bfloat16_round(m) for m in test]
    else:
        sets = tracin.Gradients(test, w), _stored(tmp_path / "s", train, w, "bfloat16")
        train = [_bfloat16_round(m) for m in train]
    result = tracin.top_k(*sets, k=5)
    got = checkpoint_contributions(*sets, result)
    np.testing.assert_allclose(got, _pair_terms(test, train, w, result.indices), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.sum(2), result.values, rtol=1e-5, atol=1e-5)


def test_checkpoint_contributions_sum_the_layers_of_each_checkpoint(tmp_path):
    # 2 checkpoints x 2 layers of a factored export (one fingerprint per checkpoint): one part per
    # checkpoint, as checkpoint_diagnostics groups them, not one per layer slot
    rng = np.random.default_rng(9)
    dims = TWO_BY_TWO_DIMS
    (left, right), (tl, tr) = _factored(rng, 70, dims=dims), _factored(rng, 6, dims=dims)
    w, meta = TWO_BY_TWO_WEIGHTS, TWO_BY_TWO_METADATA
    train = tracin.FactoredGradients(left, right, w, metadata=meta)
    test = tracin.FactoredGradients(tl, tr, w, metadata=meta)
    result = tracin.top_k(test, train, k=3)
    slots = _pair_terms(factored_to_full(tl, tr), factored_to_full(left, right), w, result.indices)
    got = checkpoint_contributions(test, train, result)
    assert got.shape == (6, 3, 2)
    np.testing.assert_allclose(got, slots[:, :, 0::2] + slots[:, :, 1::2], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.sum(2), result.values, rtol=1e-5, atol=1e-5)
    untagged = tracin.FactoredGradients(tl, tr, w)  # the train side's metadata is enough
    np.testing.assert_array_equal(checkpoint_contributions(untagged, train, result), got)
    per_slot = checkpoint_contributions(test, train, result, layers_per_checkpoint=1)
    np.testing.assert_allclose(per_slot, slots, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="layers_per_checkpoint must be a positive integer dividing"):
        checkpoint_contributions(test, train, result, layers_per_checkpoint=3)


def _cosine_terms(test, train, w, indices, run):
    """float64 (m, k, slots) reference: w_s <t_s, x_s> / (|t_c| |x_c|), c the checkpoint of slot s
    (`run` slots each), 0 where a norm is 0."""
    out = _pair_terms(test, train, w, indices)
    for c in range(0, len(w), run):
        tn = np.sqrt(sum((t.astype(np.float64) ** 2).sum(1) for t in test[c : c + run]))
        xn = np.sqrt(sum((x.astype(np.float64) ** 2).sum(1) for x in train[c : c + run]))[indices]
        norm = tn[:, None] * xn
        out[:, :, c : c + run] = (
            np.where(norm[..., None] > 0, out[:, :, c : c + run], 0) / np.where(norm > 0, norm, 1)[..., None]
        )
    return out


def test_checkpoint_contributions_of_a_normalized_result_sum_to_its_values():
    rng = np.random.default_rng(10)
    train, test, w = _full(rng, 90, dims=(6, 4, 5, 3)), _full(rng, 5, dims=(6, 4, 5, 3)), [1.0, 0.5, 0.2, 0.2]
    train[0][7] = 0  # a zero gradient at one checkpoint: its term is 0
    meta = {"fingerprints": {"checkpoints": ["ck0", "ck1"]}}  # 2 checkpoints of 2 slots each
    sets = tracin.Gradients(test, w, metadata=meta), tracin.Gradients(train, w, metadata=meta)
    result = tracin.top_k(*sets, k=90, normalize=True)
    got = checkpoint_contributions(*sets, result, normalize=True)
    slots = _cosine_terms(test, train, w, result.indices, run=2)
    np.testing.assert_allclose(got, slots[:, :, 0::2] + slots[:, :, 1::2], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.sum(2), result.values, rtol=1e-5, atol=1e-5)
    plain = tracin.top_k(*sets, k=90)
    got = checkpoint_contributions(*sets, plain)  # the parts of the plain score
    np.testing.assert_allclose(got.sum(2), (_pair_terms(test, train, w, plain.indices)).sum(2), rtol=1e-12)
    with pytest.raises(TypeError, match="normalize must be True or False"):
        checkpoint_contributions(*sets, result, normalize="yes")


def _unequal_norms(rng, n, dims, scale):
    """Full gradients whose norms spread over `scale`: plain scores and cosines differ."""
    return [(rng.standard_normal((n, d)) * rng.uniform(0.1, scale, (n, 1))).astype(np.float32) for d in dims]


@pytest.mark.parametrize("made_with", [True, False])
def test_checkpoint_contributions_warn_of_a_result_of_the_other_normalize(made_with):
    # review109 F4: a top_k(..., normalize=True) result split without normalize=True (or the reverse)
    # gave parts summing to about 3.9 for cosine scores of about 0.27, without an error
    rng = np.random.default_rng(30)
    dims, w = (16, 16, 16), [0.3, 0.2, 0.1]
    sets = tracin.Gradients(_unequal_norms(rng, 4, dims, 3), w), tracin.Gradients(_unequal_norms(rng, 300, dims, 3), w)
    result = tracin.top_k(*sets, k=5, normalize=made_with)
    np.testing.assert_allclose(
        checkpoint_contributions(*sets, result, normalize=made_with).sum(2), result.values, rtol=1e-5, atol=1e-6
    )
    message = (
        rf"result.values do not match the parts' sums for normalize={not made_with} \(20 of 20 pairs; largest "
        r"difference .* at test row \d, rank \d.*\): was result made by top_k with "
        rf"normalize={made_with}, or from other test/train gradients, or did its float32 score lose a "
        r"checkpoint's term to checkpoints about 1e30 or more apart in scale \(README, 'Numerical contract'\)\?"
    )
    with pytest.warns(RuntimeWarning, match=message) as caught:
        got = checkpoint_contributions(*sets, result, normalize=not made_with)
    assert caught[0].filename == __file__  # the user's call
    assert got.shape == (4, 5, 3)  # the parts of the other normalize, returned


def test_checkpoint_contributions_warn_of_a_result_of_other_gradients():
    rng = np.random.default_rng(31)
    dims, w = (8, 5), [1.0, 0.5]
    test, train = tracin.Gradients(_full(rng, 3, dims), w), tracin.Gradients(_full(rng, 60, dims), w)
    other = tracin.Gradients([m[::-1].copy() for m in train.matrices], w)  # the same rows, reordered
    result = tracin.top_k(test, other, k=4)
    with pytest.warns(RuntimeWarning, match=r"result.values do not match .* or from other test/train gradients, "):
        checkpoint_contributions(test, train, result)
    with pytest.warns(RuntimeWarning, match=r"\(1 of 12 pairs; .* at test row 2, rank 3"):  # one value off
        bad = tracin.TopK(tracin.top_k(test, train, k=4).values.copy(), tracin.top_k(test, train, k=4).indices)
        bad.values[2, 3] += 1
        checkpoint_contributions(test, train, bad)
    with pytest.raises(ValueError, match=r"result.values must be real numbers of the shape .* \(3, 4\)"):
        checkpoint_contributions(test, train, bad._replace(values=bad.values[:, :2]))


@pytest.mark.parametrize("device", ["cpu", "torch:cpu"])
def test_checkpoint_contributions_warn_but_split_a_score_that_lost_a_slot_far_apart_in_scale(device):
    # review112 F4: README's Numerical-contract example, checkpoints 1e30 apart: top_k scores 1e-30 for
    # an exact 1e-20 (the small slot's term lost in float32). Refused before; the exact float64 parts are
    # what explains the score, so they are returned, with a warning naming this cause.
    if device == "torch:cpu":
        pytest.importorskip("torch")
    w = [1.0, 1e-20]
    test = tracin.Gradients([np.array([[1.0]], np.float32), np.array([[1e-30]], np.float32)], w)
    train = tracin.Gradients([np.array([[1e-30]], np.float32), np.array([[1e30]], np.float32)], w)
    result = tracin.top_k(test, train, k=1, device=device)
    assert abs(result.values[0, 0] - 1e-30) <= 1e-35  # the documented lost slot
    message = r"largest difference 1e-20 .* float32 score lose a checkpoint's term to checkpoints about 1e30"
    with pytest.warns(RuntimeWarning, match=message) as caught:
        got = checkpoint_contributions(test, train, result)
    assert caught[0].filename == __file__
    small, large = float(np.float32(1e-30)), float(np.float32(1e30))
    np.testing.assert_array_equal(got, [[[1.0 * (1.0 * small), 1e-20 * (small * large)]]])  # w_c <g_c(t), g_c(i)>
    assert abs(got.sum() - 1e-20) <= 1e-6 * 1e-20  # the exact score of these float32 inputs, not 1e-30


def _bound_scale(test, train, w, indices, normalize):
    """float64 (m, k): sum_s |w_s| |g_s(t)| |g_s(i)| at the result's pairs, over |g(t)| |g(i)| (one
    checkpoint per slot) for cosine scores: the scale of the contract's error bound."""
    norm = lambda a: np.linalg.norm(a.astype(np.float64), axis=1)  # noqa: E731
    size = sum(abs(wc) * norm(t)[:, None] * norm(x) for wc, t, x in zip(w, test, train, strict=True))
    if normalize:
        size = sum(abs(wc) for wc in w) * np.ones_like(size)
    return np.take_along_axis(size, indices, 1)


@pytest.mark.parametrize("normalize", [False, True])
def test_checkpoint_contributions_accept_errors_up_to_tf32s_but_not_far_beyond(normalize):
    # precision="tf32" (CUDA) is within about 1e-3 of sum_s |w_s| |g_s(t)| |g_s(i)|: such a result passes
    rng = np.random.default_rng(32)
    dims, w = (40, 24), [0.7, -0.4]
    test, train = _unequal_norms(rng, 3, dims, 5), _unequal_norms(rng, 50, dims, 5)
    sets = tracin.Gradients(test, w), tracin.Gradients(train, w)
    result = tracin.top_k(*sets, k=6, normalize=normalize)
    size = _bound_scale(test, train, w, result.indices, normalize)
    sign = np.where(np.arange(size.size).reshape(size.shape) % 2, 1.0, -1.0)
    near = tracin.TopK(result.values + 2e-3 * sign * size, result.indices)
    np.testing.assert_allclose(
        checkpoint_contributions(*sets, near, normalize=normalize).sum(2), result.values, rtol=1e-5, atol=1e-6
    )
    far = tracin.TopK(result.values + 2e-2 * sign * size, result.indices)
    with pytest.warns(RuntimeWarning, match=r"\(18 of 18 pairs; largest difference"):
        checkpoint_contributions(*sets, far, normalize=normalize)


@pytest.mark.parametrize("normalize", [False, True])
def test_checkpoint_contributions_bound_negative_weights_by_their_size(normalize):
    # the error bound sums |w_s| |g_s(t)| |g_s(i)|: negative weights (negated rates) must not make it negative
    rng = np.random.default_rng(34)
    train, test, w = _full(rng, 60), _full(rng, 4), [-1.0, -0.3, -0.2]
    sets = tracin.Gradients(test, w), tracin.Gradients(train, w)
    result = tracin.top_k(*sets, k=5, normalize=normalize)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 rounding of a right result is no mismatch
        got = checkpoint_contributions(*sets, result, normalize=normalize)
    np.testing.assert_allclose(got.sum(2), result.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_checkpoint_contributions_accept_cancelling_dot_products(normalize):
    # train rows orthogonal (in float64) to every test row: scores far below |w| |g(t)| |g(i)|, of which
    # float32's rounding in top_k is a large fraction (a check relative to the values would refuse them)
    rng = np.random.default_rng(33)
    d, w = 4096, [1.0, 0.5]
    test = [rng.standard_normal((3, d)).astype(np.float32) for _ in w]
    train = []
    for t in test:
        basis = np.linalg.qr(t.astype(np.float64).T)[0]  # (d, 3)
        x = rng.standard_normal((40, d))
        train.append((x - (x @ basis) @ basis.T).astype(np.float32))
    sets = tracin.Gradients(test, w), tracin.Gradients(train, w)
    result = tracin.top_k(*sets, k=10, normalize=normalize)
    got = checkpoint_contributions(*sets, result, normalize=normalize)
    reference = _cosine_terms if normalize else lambda *a, run: _pair_terms(*a)
    exact = reference(test, train, w, result.indices, run=1)
    np.testing.assert_allclose(got, exact, rtol=1e-12, atol=1e-12)
    sums, scale = got.sum(2), _bound_scale(test, train, w, result.indices, normalize)
    assert np.abs(sums).max() < 1e-6 * scale.min()
    assert np.abs(sums - result.values).max() <= 1e-5 * scale.min()  # within the contract
    assert (np.abs(sums - result.values) / np.abs(sums)).max() > 1e-2  # but a large part of these scores


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_checkpoint_contributions_of_half_precision_stores_sum_to_their_values(tmp_path, dtype, normalize):
    rng = np.random.default_rng(34)
    dims, w = (64, 9, 30), [2.0, -0.5, 0.25]
    test, train = _unequal_norms(rng, 5, dims, 4), _unequal_norms(rng, 200, dims, 4)
    sets = _stored(tmp_path / "test", test, w, dtype), _stored(tmp_path / "train", train, w, dtype)
    for side in ("proponents", "opponents"):
        result = tracin.top_k(*sets, k=7, side=side, normalize=normalize)
        got = checkpoint_contributions(*sets, result, normalize=normalize)
        np.testing.assert_allclose(got.sum(2), result.values, rtol=1e-5, atol=1e-5)
        with pytest.warns(RuntimeWarning, match=f"was result made by top_k with normalize={normalize}"):
            checkpoint_contributions(*sets, result, normalize=not normalize)


def test_checkpoint_contributions_of_normalized_factored_gradients_match_float64():
    rng = np.random.default_rng(11)
    dims = TWO_BY_TWO_DIMS
    (left, right), (tl, tr) = _factored(rng, 40, dims=dims), _factored(rng, 4, dims=dims)
    w, meta = TWO_BY_TWO_WEIGHTS, TWO_BY_TWO_METADATA
    test = tracin.FactoredGradients(tl, tr, w, metadata=meta)
    train = tracin.FactoredGradients(left, right, w, metadata=meta)
    result = tracin.top_k(test, train, k=5, normalize=True, side="opponents")
    got = checkpoint_contributions(test, train, result, normalize=True)
    slots = _cosine_terms(factored_to_full(tl, tr), factored_to_full(left, right), w, result.indices, run=2)
    np.testing.assert_allclose(got, slots[:, :, 0::2] + slots[:, :, 1::2], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.sum(2), result.values, rtol=1e-5, atol=1e-5)


def test_checkpoint_contributions_keep_one_gather_budget_over_all_blocks(monkeypatch):
    # 20 blocks (10 checkpoints x 2 factors): the test chunk was sized by the widest block while
    # the gathered float64 rows of every block were held at once (~26x the budget here, 1.8 GiB
    # for the demo's train_all_checkpoints at the default budget)
    import tracemalloc

    import tracin.report

    monkeypatch.setattr(tracin.report, "_GATHER_BYTES", 1 << 20)
    rng = np.random.default_rng(12)
    dims = ((128, 65), (10, 129)) * 10
    (left, right), (tl, tr) = _factored(rng, 600, dims=dims), _factored(rng, 300, dims=dims)
    meta = {"fingerprints": {"checkpoints": [f"ck{c}" for c in range(10)]}}
    train = tracin.FactoredGradients(left, right, metadata=meta)
    test = tracin.FactoredGradients(tl, tr, metadata=meta)
    result = tracin.top_k(test, train, k=50)
    tracemalloc.start()
    try:
        got = checkpoint_contributions(test, train, result)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < got.nbytes + (8 << 20), f"peak {peak / 2**20:.1f} MiB for a 1 MiB gather budget"
    slots = _pair_terms(tl, left, [1] * 20, result.indices) * _pair_terms(tr, right, [1] * 20, result.indices)
    np.testing.assert_allclose(got, slots[:, :, 0::2] + slots[:, :, 1::2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("normalize", [False, True])
def test_checkpoint_contributions_split_k_to_keep_the_budget_for_wide_rows(monkeypatch, normalize):
    # review4 F3: the test chunk bottomed out at one test row, whose k train rows were still gathered in
    # float64 three times over (24 MiB here for a 1 MiB budget; 1.5 GiB for a (2, 256, 4) result at
    # width 262144 and the default budget)
    import tracemalloc

    import tracin.report

    budget = 1 << 20
    monkeypatch.setattr(tracin.report, "_GATHER_BYTES", budget)
    rng = np.random.default_rng(21)
    dims, w = (4096,) * 4, [1.0, 0.5, -0.25, 2.0]  # a float64 row of 128 KiB: 8 rows fill the budget
    train, test = _full(rng, 400, dims=dims), _full(rng, 3, dims=dims)
    train[0][7] = 0  # a zero checkpoint gradient: its cosine part is 0
    tg, xg = tracin.Gradients(test, w), tracin.Gradients(train, w)
    result = tracin.top_k(tg, xg, k=64, normalize=normalize)
    result = tracin.TopK(result.values.copy(), result.indices.copy())
    result.indices[0, -1] = 7  # the zero row among the pairs, with its score
    want = (
        _cosine_terms(test, train, w, result.indices, 1) if normalize else _pair_terms(test, train, w, result.indices)
    )
    result.values[0, -1] = want[0, -1].sum()
    tracemalloc.start()
    try:
        got = checkpoint_contributions(tg, xg, result, normalize=normalize)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < got.nbytes + 2 * budget, f"peak {peak / 2**20:.1f} MiB for a 1 MiB budget"
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_checkpoint_contributions_in_pieces_of_rows_and_columns_match_float64(tmp_path, monkeypatch):
    # every piece shape at a tiny budget: one test row x some columns, ragged last pieces, a bfloat16 store
    import tracin.report

    rng = np.random.default_rng(22)
    dims, w = (16, 5), [0.5, -1.0]
    train, test = _full(rng, 300, dims=dims), _full(rng, 5, dims=dims)
    store = _stored(tmp_path / "s", train, w, "bfloat16")
    tg = tracin.Gradients(test, w)
    result = tracin.top_k(tg, tracin.Gradients(train, w), k=11)
    want = _pair_terms(test, train, w, result.indices)
    want_bf16 = _pair_terms(test, [_bfloat16_round(m) for m in train], w, result.indices)
    for rows in (3, 4, 7, 23, 24, 25, 60, 200):  # float64 rows the budget holds (one row: 168 bytes)
        monkeypatch.setattr(tracin.report, "_GATHER_BYTES", rows * 8 * sum(dims))
        got = checkpoint_contributions(tg, tracin.Gradients(train, w), result)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=f"budget of {rows} rows")
        from_store = checkpoint_contributions(tg, store, result)
        np.testing.assert_allclose(from_store, want_bf16, rtol=1e-12, atol=1e-12, err_msg=f"bfloat16, {rows} rows")


def test_checkpoint_contributions_read_only_the_train_rows_of_the_result(tmp_path, monkeypatch):
    # the whole train set was taken with kernel_side(0, n_rows): a store of many files is read into
    # memory, not mapped (255 MiB for a (10, 5) result on a 253 MiB store with ulimit -n 128)
    import tracin.report

    rng = np.random.default_rng(13)
    train, test, w = _full(rng, 3000, dims=(16, 5)), _full(rng, 4, dims=(16, 5)), [0.5, 0.25]
    store = _stored(tmp_path / "s", train, w, "float32")
    monkeypatch.setattr(tracin.report, "_SKIP_BYTES", 8 * 21 * 3, raising=False)  # new read past 3 rows
    result = tracin.top_k(tracin.Gradients(test, w), store, k=5)
    read = []
    original = store.kernel_side

    def kernel_side(start=0, stop=None):
        read.append((start, stop))
        return original(start, stop)

    monkeypatch.setattr(store, "kernel_side", kernel_side)
    got = checkpoint_contributions(tracin.Gradients(test, w), store, result)
    np.testing.assert_allclose(got, _pair_terms(test, train, w, result.indices), rtol=1e-12, atol=1e-12)
    wanted = np.unique(result.indices)
    rows = sum(stop - start for start, stop in read)
    assert rows <= 4 * wanted.size, f"read {rows} rows for {wanted.size} wanted: {read}"
    covered = np.concatenate([np.arange(start, stop) for start, stop in read])
    assert np.isin(wanted, covered).all()


def _late_checkpoint_drowns_signal(rng, n=400, noisy=40):
    """Three checkpoints: the first two separate `noisy` rows (large gradients there), the last has
    large gradients on other rows and dominates the sum."""
    mats = [rng.standard_normal((n, 8)).astype(np.float32) * 0.1 for _ in range(3)]
    mats[0][:noisy] *= 10
    mats[1][:noisy] *= 8
    mats[2][noisy : 2 * noisy + 40] *= 60
    return mats


def test_diagnostics_shares_and_overlap_match_numpy(tmp_path):
    mats = _late_checkpoint_drowns_signal(np.random.default_rng(5))
    w = [1.0, 1.0, 0.5]
    diag = checkpoint_diagnostics(
        tracin.Gradients(mats, w),
        top=40,
        path=tmp_path / "d.png",
        traced=2,
        labels=["epoch 10", "epoch 20", "epoch 30"],
    )
    terms = np.stack([wc * (m.astype(np.float64) ** 2).sum(1) for wc, m in zip(w, mats, strict=True)], 1)
    best = set(np.argsort(-terms.sum(1), kind="stable")[:40])
    np.testing.assert_allclose(diag.share_all, terms.sum(0) / terms.sum(), rtol=1e-6)
    top_terms = terms[sorted(best)]
    np.testing.assert_allclose(diag.share_top, top_terms.sum(0) / top_terms.sum(), rtol=1e-6)
    for c in range(3):
        prefix = set(np.argsort(-terms[:, : c + 1].sum(1), kind="stable")[:40])
        assert diag.overlap[c] == len(prefix & best) / 40
    assert diag.overlap[1] < 0.2 and diag.overlap[2] == 1.0  # the late checkpoint replaces the ranking
    assert set(range(40)) == set(np.argsort(-terms[:, :2].sum(1))[:40])  # the early ones find the noisy rows
    assert diag.figure == tmp_path / "d.png" and diag.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diagnostics_sum_the_layers_of_each_checkpoint(tmp_path):
    rng = np.random.default_rng(6)
    left, right = _factored(rng, 100, dims=((3, 4), (2, 5), (3, 4), (2, 5)))  # 2 checkpoints x 2 layers
    w = [0.1, 0.1, 0.01, 0.01]
    diag = checkpoint_diagnostics(tracin.FactoredGradients(left, right, w), layers_per_checkpoint=2)
    slots = np.stack(
        [
            wc * (lf.astype(np.float64) ** 2).sum(1) * (rt.astype(np.float64) ** 2).sum(1)
            for wc, lf, rt in zip(w, left, right, strict=True)
        ],
        1,
    )
    np.testing.assert_allclose(diag.terms, slots[:, 0::2] + slots[:, 1::2], rtol=1e-5)
    assert diag.top == 10 and diag.figure is None
    with pytest.raises(ValueError, match="layers_per_checkpoint must be a positive integer dividing the set's 4"):
        checkpoint_diagnostics(tracin.FactoredGradients(left, right, w), layers_per_checkpoint=3)
    with pytest.raises(ValueError, match="top must be an integer from 1 to the 100 train rows"):
        checkpoint_diagnostics(tracin.FactoredGradients(left, right, w), top=0)
    with pytest.raises(ValueError, match="labels must name each of the 4 checkpoints"):
        checkpoint_diagnostics(tracin.FactoredGradients(left, right, w), path=tmp_path / "x.png", labels=["a"])


def test_diagnostics_take_numpy_integers_but_not_bools(tmp_path):
    rng = np.random.default_rng(12)
    left, right = _factored(rng, 50, dims=((3, 4), (2, 5), (3, 4), (2, 5)))
    train = tracin.FactoredGradients(left, right, [0.1, 0.1, 0.01, 0.01])
    plain = checkpoint_diagnostics(train, top=7, layers_per_checkpoint=2)
    numpy = checkpoint_diagnostics(
        train, top=np.int64(7), layers_per_checkpoint=np.int32(2), path=tmp_path / "d.png", traced=np.int64(1)
    )
    assert numpy.top == 7 and type(numpy.top) is int and numpy.figure == tmp_path / "d.png"
    np.testing.assert_array_equal(numpy.terms, plain.terms)
    np.testing.assert_array_equal(numpy.overlap, plain.overlap)
    for bad in (True, np.bool_(True), 7.0):
        with pytest.raises(ValueError, match="top must be an integer from 1 to the 50 train rows"):
            checkpoint_diagnostics(train, top=bad)
    with pytest.raises(ValueError, match="layers_per_checkpoint must be a positive integer"):
        checkpoint_diagnostics(train, layers_per_checkpoint=np.bool_(True))


def test_diagnostics_group_layers_from_metadata_in_memory_as_in_a_store(tmp_path):
    # 2 checkpoints x 2 layers, as a factored export records them: one fingerprint per checkpoint
    rng = np.random.default_rng(7)
    dims = TWO_BY_TWO_DIMS
    left, right = _factored(rng, 60, dims=dims)
    w, meta = TWO_BY_TWO_WEIGHTS, TWO_BY_TWO_METADATA
    writer = tracin.GradientStore.create(tmp_path / "s", 60, dims, w, factored=True, metadata=meta)
    with writer:
        for c, pair in enumerate(zip(left, right, strict=True)):
            writer.write(c, 0, pair)
        store = writer.finalize()
    memory = checkpoint_diagnostics(tracin.FactoredGradients(left, right, w, metadata=meta), top=6)
    stored = checkpoint_diagnostics(store, top=6)
    slots = np.stack(
        [
            wc * (lf.astype(np.float64) ** 2).sum(1) * (rt.astype(np.float64) ** 2).sum(1)
            for wc, lf, rt in zip(w, left, right, strict=True)
        ],
        1,
    )
    assert memory.terms.shape == stored.terms.shape == (60, 2)
    np.testing.assert_allclose(memory.terms, slots[:, 0::2] + slots[:, 1::2], rtol=1e-5)
    np.testing.assert_array_equal(memory.terms, stored.terms)
    np.testing.assert_array_equal(memory.overlap, stored.overlap)


def test_tracin_report_is_reachable_from_import_tracin_and_imported_on_first_use():
    code = (
        "import sys, tracin\n"
        "assert 'tracin.report' not in sys.modules\n"
        "assert 'report' in dir(tracin) and 'tracin.report' not in sys.modules\n"
        "assert tracin.report.checkpoint_contributions is sys.modules['tracin.report'].checkpoint_contributions\n"
        "try:\n    tracin.no_such_name\nexcept AttributeError as e:\n    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "module 'tracin' has no attribute 'no_such_name'"


def _two_checkpoints() -> tracin.Gradients:
    rng = np.random.default_rng(21)
    return tracin.Gradients([rng.standard_normal((12, 3)).astype(np.float32) for _ in range(2)])


def test_diagnostics_figure_is_the_png_written(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "No artists with labels found to put in legend" without traced
        diag = checkpoint_diagnostics(_two_checkpoints(), path=tmp_path / "diag")
    assert diag.figure == tmp_path / "diag.png" and diag.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diag.png"]
    upper = checkpoint_diagnostics(_two_checkpoints(), path=str(tmp_path / "d.PNG")).figure
    assert upper == tmp_path / "d.PNG" and upper.read_bytes()[:4] == b"\x89PNG"


def test_plotting_keeps_the_callers_backend_and_opens_no_pyplot_figure(tmp_path):
    # a notebook's inline or interactive backend stays: plt.show() still works after the call
    script = f"""
import matplotlib
matplotlib.use("svg")  # stands in for a notebook's or a desktop's backend
import matplotlib.pyplot as plt
import numpy as np, tracin
from tracin.report import checkpoint_diagnostics, plot_checkpoint_diagnostics
plt.figure()
train = tracin.Gradients([np.random.default_rng(0).standard_normal((20, 3), dtype=np.float32) for _ in range(2)])
diag = checkpoint_diagnostics(train, path={str(tmp_path / "a.png")!r}, traced=1)
print(matplotlib.get_backend(), plt.get_fignums())
plot_checkpoint_diagnostics(diag, {str(tmp_path / "b.png")!r})
print(matplotlib.get_backend(), plt.get_fignums())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["svg [1]", "svg [1]"]
    assert (tmp_path / "a.png").read_bytes()[:4] == (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "name,message",
    [
        ("x.pdf", r"the figure is a PNG, so path must end in \.png \(or have no suffix\), got '.*x\.pdf'"),
        ("missing/x.png", r"path: the directory '.*missing' of '.*x\.png' does not exist"),
        # review4 F2: a figure the directory check passed but the save could not write raised after the
        # self-influence pass (minutes on a store), and the numbers were lost
        ("n" * 300 + ".png", r"path: cannot write the figure to '.*nnn\.png': File name too long"),
    ],
)
def test_diagnostics_refuse_a_figure_path_before_the_work(name, message, tmp_path, monkeypatch):
    from tracin import report

    def no_work(*args, **kwargs):
        raise AssertionError("self_influence ran before the path was checked")

    monkeypatch.setattr(report, "self_influence", no_work)
    with pytest.raises(ValueError, match=message):
        checkpoint_diagnostics(_two_checkpoints(), path=tmp_path / name)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs a sysfs /sys (Linux), where no file can be made")
def test_diagnostics_refuse_an_unwritable_directory_before_the_work(monkeypatch):
    from tracin import report

    monkeypatch.setattr(report, "self_influence", lambda *a, **k: pytest.fail("self_influence ran"))
    with pytest.raises(ValueError, match=r"path: cannot write the figure to '/sys/kernel/tracin-diag\.png': \w"):
        checkpoint_diagnostics(_two_checkpoints(), path="/sys/kernel/tracin-diag.png")


def test_diagnostics_probe_keeps_an_existing_figure_until_it_is_replaced(tmp_path, monkeypatch):
    from tracin import report

    old = tmp_path / "d.png"
    old.write_bytes(b"old figure")
    monkeypatch.setattr(report, "plot_checkpoint_diagnostics", lambda diag, path, **kw: path)
    diag = checkpoint_diagnostics(_two_checkpoints(), path=old)
    assert diag.figure == old and old.read_bytes() == b"old figure"  # probed in append mode: not truncated
    checkpoint_diagnostics(_two_checkpoints(), path=tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png"]  # the probe of new.png left nothing


def test_diagnostics_without_matplotlib_fail_before_the_work(tmp_path, monkeypatch):
    from tracin import report

    monkeypatch.setattr(report, "self_influence", lambda *a, **k: pytest.fail("self_influence ran"))
    for module in ("matplotlib", "matplotlib.figure"):  # as if not installed (and not imported yet)
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match="plotting the diagnostics needs matplotlib"):
        checkpoint_diagnostics(_two_checkpoints(), path=tmp_path / "d.png")


@pytest.mark.parametrize("make", [lambda: map(str, [10, 20]), lambda: (f"epoch {e}" for e in (1, 2))])
def test_diagnostics_read_one_shot_labels_once(make, tmp_path, monkeypatch):
    from tracin import report

    seen = []
    monkeypatch.setattr(report, "plot_checkpoint_diagnostics", lambda d, p, labels, traced: seen.append(labels) or p)
    checkpoint_diagnostics(_two_checkpoints(), path=tmp_path / "d.png", labels=make())
    assert seen == [[str(s) for s in make()]]


@pytest.mark.parametrize(
    "name,error,message",
    [
        ("", ValueError, r"path must name a file \(the PNG to write\), got ''"),
        ("figs/", ValueError, r"path must name a file \(the PNG to write\), got '.*figs/'"),
        ("figs/..", ValueError, r"path must name a file \(the PNG to write\), got '.*figs/\.\.'"),
        (".png", ValueError, r"path must name a file before its \.png suffix, got '.*\.png'"),
        ("figs/.PNG", ValueError, r"path must name a file before its \.png suffix"),
        ("folder.png", ValueError, r"path: '.*folder\.png' is a directory, not a file"),
        ("folder", ValueError, r"path: '.*folder\.png' is a directory, not a file"),  # .png added
        ("figs", ValueError, r"path: 'figs' is a directory, not a file"),  # review29 F3: was written to figs.png
        (b"x.png", TypeError, r"path must be a str or os\.PathLike of a str, got bytes"),
        (3, TypeError, r"path must be a str or os\.PathLike of a str, got int"),
    ],
)
def test_diagnostics_refuse_a_path_that_names_no_file_before_the_work(name, error, message, tmp_path, monkeypatch):
    from tracin import report

    monkeypatch.setattr(report, "self_influence", lambda *a, **k: pytest.fail("self_influence ran"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "figs").mkdir()
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(error, match=message):
        checkpoint_diagnostics(_two_checkpoints(), path=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figs", "folder.png"] and not list(
        (tmp_path / "figs").iterdir()
    )


def test_diagnostics_take_any_path_like(tmp_path):
    class PathLike:
        def __init__(self, path):
            self.path = path

        def __fspath__(self):
            return self.path

    diag = checkpoint_diagnostics(_two_checkpoints(), path=PathLike(str(tmp_path / "like")))
    assert diag.figure == tmp_path / "like.png" and diag.figure.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(TypeError, match="path must be a str or os.PathLike of a str, got PathLike"):
        checkpoint_diagnostics(_two_checkpoints(), path=PathLike(b"x.png"))
    with pytest.raises(TypeError, match="labels must be one name per checkpoint"):
        checkpoint_diagnostics(_two_checkpoints(), path=tmp_path / "x.png", labels="ab")


def test_diagnostics_refuse_a_dangling_link_before_the_work(tmp_path, monkeypatch):
    from tracin import report

    monkeypatch.setattr(report, "self_influence", lambda *a, **k: pytest.fail("self_influence ran"))
    (tmp_path / "d.png").symlink_to(tmp_path / "gone" / "d.png")
    with pytest.raises(ValueError, match=r"path: '.*d\.png' is a link to '.*gone/d\.png', in a directory that does"):
        checkpoint_diagnostics(_two_checkpoints(), path=tmp_path / "d.png")


def test_diagnostics_write_through_a_link_to_a_file_not_made_yet(tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "d.png").symlink_to("figures/new.png")  # relative to the link's folder
    diag = checkpoint_diagnostics(_two_checkpoints(), path=tmp_path / "d.png")
    assert diag.figure == tmp_path / "d.png" and (tmp_path / "figures" / "new.png").read_bytes()[:4] == b"\x89PNG"


def test_diagnostics_check_labels_and_traced_without_a_figure():
    with pytest.raises(ValueError, match="traced must be a number of checkpoints from 1 to 2, got 99"):
        checkpoint_diagnostics(_two_checkpoints(), traced=99)
    with pytest.raises(ValueError, match="labels must name each of the 2 checkpoints, got 1"):
        checkpoint_diagnostics(_two_checkpoints(), labels=["only one"])


def test_diagnostics_of_a_whitening_match_float64_whitened_self_influence():
    rng = np.random.default_rng(8)
    mats = [(rng.standard_normal((60, 5)) * [5, 1, 1, 0.2, 0.1]).astype(np.float32) for _ in range(2)]
    weights, damping = [0.5, 0.25], 0.3
    train = tracin.Gradients(mats, weights)
    whitening = tracin.Whitening.fit(train, damping=damping)
    diag = checkpoint_diagnostics(train, top=6, whitening=whitening)
    exact = []
    for w, m in zip(weights, mats, strict=True):
        x = m.astype(np.float64)
        r = x.T @ x / len(x)
        inverse = np.linalg.inv(r + damping * np.trace(r) / len(r) * np.eye(len(r)))
        exact.append(w * np.einsum("id,de,ie->i", x, inverse, x))
    np.testing.assert_allclose(diag.terms, np.stack(exact, 1), rtol=1e-5)
    whitened = whitening.apply(train)  # review29 F2: its plain self-influence was taken as the whitened one
    with pytest.raises(ValueError, match=r"train is whitened \(metadata\['whitening'\]\).*whitening="):
        checkpoint_diagnostics(whitened)
    with pytest.raises(ValueError, match=r"train is whitened"):
        tracin.self_influence(whitened)


def test_diagnostics_warn_that_shares_of_negative_weights_are_not_fractions():
    diag_input = tracin.Gradients(_two_checkpoints().matrices, [1.0, -0.5])
    with pytest.warns(UserWarning, match=r"negative checkpoint weights.*do not lie in \[0, 1\]"):
        diag = checkpoint_diagnostics(diag_input)
    assert diag.share_all.sum() == pytest.approx(1.0) and diag.share_all[1] < 0


@pytest.mark.parametrize("side", ["test", "train"])
def test_checkpoint_contributions_refuse_nan_rows_as_top_k_does(side):
    rng = np.random.default_rng(4)
    test, train = _full(rng, 5), _full(rng, 30)
    result = tracin.top_k(tracin.Gradients(test), tracin.Gradients(train), k=4)
    bad = test if side == "test" else train
    row = 3 if side == "test" else int(result.indices[2, 1])
    bad[1][row, 2] = np.nan
    with pytest.raises(ValueError, match=rf"{side} checkpoint 1 contains NaN or Inf values, first in rows \[{row}\]"):
        checkpoint_contributions(tracin.Gradients(test), tracin.Gradients(train), result)
    with pytest.raises(ValueError, match=rf"{side} checkpoint 1 contains NaN or Inf values, first in rows \[{row}"):
        tracin.top_k(tracin.Gradients(test), tracin.Gradients(train), k=4)


def test_diagnostics_figure_is_written_whole_keeping_the_old_one_on_a_failed_save(tmp_path, monkeypatch):
    # review48 F1: the PNG was saved in place, so a save failing part-way (a full disk) left half a PNG
    # over the good figure
    from matplotlib.figure import Figure

    path = tmp_path / "d.png"
    checkpoint_diagnostics(_two_checkpoints(), path=path)
    os.chmod(path, 0o640)
    good = path.read_bytes()
    save = Figure.savefig

    def fail_part_way(self, fname, *args, **kwargs):
        if isinstance(fname, (str, os.PathLike)):
            Path(fname).write_bytes(b"\x89PNG half")
        else:
            fname.write(b"\x89PNG half")
            fname.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", fail_part_way)
    with pytest.raises(OSError, match="No space left on device"):
        checkpoint_diagnostics(_two_checkpoints(), path=path, labels=["a", "b"])
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["d.png"]
    monkeypatch.setattr(Figure, "savefig", save)
    checkpoint_diagnostics(_two_checkpoints(), path=path, labels=["a", "b"])
    assert path.read_bytes() != good and path.read_bytes()[:4] == b"\x89PNG"
    assert os.stat(path).st_mode & 0o777 == 0o640 and sorted(p.name for p in tmp_path.iterdir()) == ["d.png"]


@pytest.mark.parametrize("count,traced", [(1, 1), (1, None), (2, 2), (12, 3)])
def test_diagnostics_legend_covers_no_bar_or_point(count, traced, tmp_path, monkeypatch):
    # review48 F2: with one checkpoint both bars fill the axes and loc="best" put the legend over one
    from matplotlib.figure import Figure

    figures = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: figures.append(fig) or savefig(fig, *a, **kw))
    rng = np.random.default_rng(count)
    train = tracin.Gradients([rng.standard_normal((20, 3)).astype(np.float32) for _ in range(count)])
    checkpoint_diagnostics(train, path=tmp_path / "d.png", traced=traced)
    (fig,) = figures
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    names = [t.get_text() for legend in legends for t in legend.get_texts()]
    assert names == ["top 2 rows by self-influence", "all rows", *([f"traced: up to {traced}"] if traced else [])]
    (box,) = [legend.get_window_extent() for legend in legends]
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent()) and not box.overlaps(ax.xaxis.label.get_window_extent())


@pytest.mark.parametrize(
    "count,name", [(40, "step {}000"), (40, "{}"), (16, "{}"), (12, "step {}000"), (10, "ep {}5"), (3, "{}")]
)
def test_diagnostics_tick_labels_do_not_overlap(count, name, tmp_path, monkeypatch):
    # review48 F3: every checkpoint was labelled, so 40 labels like a Trainer's ("step 1000", ...) overlapped
    # their neighbours on both panels
    import math

    from matplotlib.figure import Figure

    figures = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: figures.append(fig) or savefig(fig, *a, **kw))
    rng = np.random.default_rng(count)
    train = tracin.Gradients([rng.standard_normal((20, 3)).astype(np.float32) for _ in range(count)])
    labels = [name.format(c + 1) for c in range(count)]
    checkpoint_diagnostics(train, path=tmp_path / "d.png", labels=labels, traced=min(7, count))
    (fig,) = figures
    for ax in fig.axes:
        ticks = sorted({*ax.get_xticks(), *ax.get_xticks(minor=True)})  # a tick at every checkpoint
        assert ticks == list(range(count)), ticks
        shown = [t for t in ax.get_xticklabels() if t.get_text()]
        assert 1 <= len(shown) <= 15 and shown[-1].get_text() == labels[-1]
        assert [t.get_text() for t in shown] == [labels[round(t.get_position()[0])] for t in shown]
        boxes = [t.get_window_extent() for t in shown]
        assert all(fig.bbox.x0 <= b.x0 and b.x1 <= fig.bbox.x1 and fig.bbox.y0 <= b.y0 for b in boxes)
        angle = shown[0].get_rotation()
        if angle == 0:  # side by side, apart
            assert all(a.x1 <= b.x0 for a, b in zip(boxes[:-1], boxes[1:], strict=True)), [t.get_text() for t in shown]
        else:  # slanted, parallel: their lines at least a line's height apart
            assert angle == 45 and all(t.get_rotation() == 45 for t in shown)
            height = shown[0].get_fontsize() * fig.dpi / 72
            gaps = np.diff([b.x1 for b in boxes]) * math.sin(math.radians(angle))
            assert gaps.min() >= 1.2 * height, gaps
    rotated = fig.axes[0].get_xticklabels()[0].get_rotation() != 0
    assert rotated == (name.startswith("step") and count >= 12)


def test_diagnostics_labels_are_drawn_as_given_not_as_math_text(tmp_path, monkeypatch):
    # review76 F6: labels went to matplotlib as math text: r"$\step$1" failed (ParseFatalException) after the
    # whole self-influence pass, and "cost $6 and $7" was typeset as math, its dollars dropped
    from matplotlib.figure import Figure

    figures = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: figures.append(fig) or savefig(fig, *a, **kw))
    rng = np.random.default_rng(76)
    train = tracin.Gradients([rng.standard_normal((10, 3)).astype(np.float32) for _ in range(3)])
    labels = [r"$\step$1", "cost $6 and $7", "cost S6 and S7"]  # '$' and 'S' are about as wide in the default font
    path = checkpoint_diagnostics(train, path=tmp_path / "d.png", labels=labels, traced=1).figure
    assert path.stat().st_size > 0
    (fig,) = figures
    for ax in fig.axes:
        shown = [t for t in ax.get_xticklabels() if t.get_text()]
        assert [t.get_text() for t in shown] == labels
        widths = [t.get_window_extent().width for t in shown]
        assert widths[1] == pytest.approx(widths[2], abs=2), widths  # typeset as math: "6and" in italics, narrower
    (legend,) = fig.legends
    traced = [t for t in legend.get_texts() if t.get_text().startswith("traced")]
    assert [t.get_text() for t in traced] == [r"traced: up to $\step$1"]
    assert not traced[0].get_parse_math()


@pytest.mark.parametrize("count,name", [(40, "epoch-{}-step-{}000"), (12, "step {}000"), (3, "{}")])
def test_diagnostics_axis_labels_and_tick_labels_lie_inside_the_figure(count, name, tmp_path, monkeypatch):
    # review85 F4: with 40 slanted labels the right panel's y-label "overlap of the top 10 with all checkpoints"
    # was taller than its shortened axes and ran past the top of the PNG (cut off)
    from matplotlib.figure import Figure

    figures = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: figures.append(fig) or savefig(fig, *a, **kw))
    rng = np.random.default_rng(85)
    train = tracin.Gradients([rng.standard_normal((100, 4)).astype(np.float32) * (1 + c / 5) for c in range(count)])
    labels = [name.format(c * 25, c) for c in range(count)]
    checkpoint_diagnostics(train, path=tmp_path / "d.png", labels=labels, traced=min(17, count))
    (fig,) = figures
    outside = []
    for ax in fig.axes:
        texts = [ax.yaxis.label, ax.xaxis.label, ax.title, *(t for t in ax.get_xticklabels() if t.get_text())]
        for text in texts:
            box = text.get_window_extent()
            if not (
                fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1
            ):
                outside.append((text.get_text(), box.bounds))
        label = ax.yaxis.label
        assert label.get_window_extent().y0 >= fig.legends[0].get_window_extent().y1  # above the legend
        assert not any(label.get_window_extent().overlaps(t.get_window_extent()) for t in ax.get_xticklabels())
        assert " ".join(label.get_text().split()) in (
            "share of summed self-influence",
            "overlap of the top 10 with all checkpoints",
        )
        if count == 3:  # room enough: one line
            assert "\n" not in label.get_text()
    assert not outside, outside


@pytest.mark.parametrize(("n", "top"), [(25, 3), (9, 1), (1, 1), (100, 10)])
def test_diagnostics_default_top_is_a_tenth_of_the_rows_rounded_up(n, top):
    """top=None ranks the ceiling of 10% of the rows, at least 1 (r297 M40: rounded down, 25 rows ranked 2)."""
    rng = np.random.default_rng(n)
    diag = checkpoint_diagnostics(tracin.Gradients([rng.standard_normal((n, 3)).astype(np.float32)] * 2))
    assert diag.top == top


def test_diagnostics_overlap_ranks_the_running_sum_of_the_checkpoints_not_each_alone():
    """overlap[c] compares the top rows of checkpoints 0..c summed with those of all (r297 M41: of checkpoint c
    alone, which the data of the shares test cannot tell apart); float64 NumPy reference."""
    rng = np.random.default_rng(7)
    mats = [rng.standard_normal((30, 4)).astype(np.float32) for _ in range(4)]
    w = [1.0, 0.7, 0.5, 0.3]
    diag = checkpoint_diagnostics(tracin.Gradients(mats, w), top=6)
    terms = np.stack([wc * (m.astype(np.float64) ** 2).sum(1) for wc, m in zip(w, mats, strict=True)], 1)
    best = set(np.argsort(-terms.sum(1), kind="stable")[:6])
    running = [len(set(np.argsort(-terms[:, : c + 1].sum(1), kind="stable")[:6]) & best) / 6 for c in range(4)]
    alone = [len(set(np.argsort(-terms[:, c], kind="stable")[:6]) & best) / 6 for c in range(4)]
    assert running != alone  # the data tell the two apart
    np.testing.assert_array_equal(diag.overlap, running)


def test_checkpoint_contributions_warn_of_a_nan_in_result_values():
    """A NaN score matches no parts' sum: warned like any other mismatch (r329 mutant: `diff > allowed`, False for
    NaN, let it pass silently)."""
    rng = np.random.default_rng(32)
    dims, w = (8, 5), [1.0, 0.5]
    test, train = tracin.Gradients(_full(rng, 3, dims), w), tracin.Gradients(_full(rng, 60, dims), w)
    made = tracin.top_k(test, train, k=4)
    values = made.values.copy()
    values[1, 2] = np.nan
    with pytest.warns(RuntimeWarning, match=r"\(1 of 12 pairs; largest difference nan at test row 1, rank 2"):
        checkpoint_contributions(test, train, tracin.TopK(values, made.indices))


def test_diagnostics_rank_tied_rows_smaller_index_first():
    """Rows 0 and 1 tie over all checkpoints (4 + 0, 0 + 4): the top-1 row is row 0 (ties: smaller index first,
    as the shares and the overlap are documented), whose self-influence is all checkpoint 0's, and which
    checkpoint 0 alone also ranks first (r329 mutant: argsort ascending reversed took row 1)."""
    mats = [np.array([[2.0], [0.0], [1.0]], np.float32), np.array([[0.0], [2.0], [1.0]], np.float32)]
    diag = checkpoint_diagnostics(tracin.Gradients(mats, [1.0, 1.0]), top=1)
    np.testing.assert_array_equal(diag.share_top, [1.0, 0.0])
    np.testing.assert_array_equal(diag.overlap, [1.0, 1.0])


def test_checkpoint_contributions_refuse_an_index_one_past_the_last_train_row():
    """Index n_rows is out of range as the docs say (r329 mutant: `> n_rows` let it reach the gather)."""
    rng = np.random.default_rng(33)
    train, test = tracin.Gradients(_full(rng, 20)), tracin.Gradients(_full(rng, 3))
    made = tracin.top_k(test, train, k=2)
    indices = made.indices.copy()
    indices[2, 1] = 20
    with pytest.raises(ValueError, match=r"result.indices must lie in \[0, 20\) \(the train rows\), got values from"):
        checkpoint_contributions(test, train, tracin.TopK(made.values, indices))


def test_checkpoint_contributions_take_the_checkpoints_from_the_test_sides_metadata_alone():
    """Only the test side records the 2 checkpoints x 2 layers (a train set rebuilt from arrays): one part per
    checkpoint all the same (r329 mutant: the train side's metadata alone was read, and the 4 layer slots
    came back as 4 'checkpoints')."""
    rng = np.random.default_rng(34)
    (left, right), (tl, tr) = _factored(rng, 40, dims=TWO_BY_TWO_DIMS), _factored(rng, 5, dims=TWO_BY_TWO_DIMS)
    w = TWO_BY_TWO_WEIGHTS
    test = tracin.FactoredGradients(tl, tr, w, metadata=TWO_BY_TWO_METADATA)
    train = tracin.FactoredGradients(left, right, w)
    result = tracin.top_k(test, train, k=3)
    slots = _pair_terms(factored_to_full(tl, tr), factored_to_full(left, right), w, result.indices)
    got = checkpoint_contributions(test, train, result)
    assert got.shape == (5, 3, 2)
    np.testing.assert_allclose(got, slots[:, :, 0::2] + slots[:, :, 1::2], rtol=1e-12, atol=1e-12)
