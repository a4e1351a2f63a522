"""The preconditioner transforms on their own: shared checks, layer placement of factored rows, and
Adam's formulas against float64 NumPy on hand-made moments."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from tracin._export.preconditioner import (
    AdamMoments,
    Preconditioned,
    adam_settings,
    check_moments,
    check_preconditioner,
)
from tracin._export.rank_one import RankOneAdam, _scales, layer_groups


def _moments(rng, shapes, step=3.0, b1=0.9, b2=0.99, eps=1e-3):
    return [
        AdamMoments(
            rng.normal(size=int(np.prod(s))).astype(np.float32),
            rng.uniform(0.1, 2, int(np.prod(s))).astype(np.float32),
            step,
            b1,
            b2,
            eps,
        )
        for s in shapes
    ]


def test_full_rows_follow_the_formulas_per_parameter():
    rng = np.random.default_rng(0)
    moments = _moments(rng, [(2, 3), (2,)])
    moments[1] = AdamMoments(moments[1].m, moments[1].v, 7.0, 0.5, 0.9, 1e-2)  # its own step and hyperparameters
    g = rng.normal(size=(4, 8)).astype(np.float32)
    m = np.concatenate([a.m for a in moments]).astype(np.float64)
    v = np.concatenate([a.v for a in moments]).astype(np.float64)
    t, b1, b2, eps = (np.repeat([getattr(a, k) for a in moments], [6, 2]) for k in ("step", "b1", "b2", "eps"))
    adam = Preconditioned("adam", lambda c: moments, {}).apply(g, 0, 0)
    np.testing.assert_allclose(adam, g / (np.sqrt(v / (1 - b2**t)) + eps), rtol=1e-6)
    update = Preconditioned("adam_update", lambda c: moments, {}).apply(g, 0, 0)
    m2, v2 = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g.astype(np.float64) ** 2
    np.testing.assert_allclose(
        update, (m2 / (1 - b1 ** (t + 1))) / (np.sqrt(v2 / (1 - b2 ** (t + 1))) + eps), rtol=1e-5
    )


def test_moments_are_read_once_per_checkpoint_and_must_cover_the_row():
    rng = np.random.default_rng(1)
    calls = []
    t = Preconditioned("adam", lambda c: calls.append(c) or _moments(rng, [(3,)]), {"b1": 0.9})
    block = np.ones((2, 3), np.float32)
    t.apply(block, 0, 0), t.apply(block, 0, 0), t.apply(block, 1, 0)
    assert calls == [0, 1] and t.to_dict() == {"kind": "adam", "b1": 0.9}
    with pytest.raises(ValueError, match="the optimizer state has 3 entries for a row of 4"):
        t.apply(np.ones((2, 4), np.float32), 2, 0)


def test_layers_are_placed_by_shape_with_or_without_bias():
    params = [("a.weight", (4, 3)), ("a.bias", (4,)), ("b.weight", (2, 4))]
    assert layer_groups(params, [(4, 4), (2, 4)]) == [(0, True, 4), (2, False, 2)]
    with pytest.raises(ValueError, match=r"factored layer of dims \(3, 5\) has no \(out, in\) weight"):
        layer_groups([("k", (4, 3)), ("b", (3,))], [(3, 5)])


def test_rank_one_scales_match_the_factorisation_of_v_plus_eps_squared():
    """v_hat + eps^2 (each parameter's eps: the bias's here differs) factorised as r c^T / sum(r); eps is large
    against v here so that leaving it out, or using the weight's for the bias, would fail."""
    rng = np.random.default_rng(2)
    weight, bias = _moments(rng, [(4, 3), (4,)], step=2.0, b2=0.95, eps=0.3)
    bias = AdamMoments(bias.m, bias.v, bias.step, bias.b1, bias.b2, 0.7)
    left, right = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)
    got_l, got_r = RankOneAdam(lambda c: [weight, bias], [(0, True, 4)], {}).apply((left, right), 0, 0)
    v = np.hstack([weight.v.reshape(4, 3) + 0.0, bias.v.reshape(4, 1)]).astype(np.float64) / (1 - 0.95**2)
    v += np.array([0.3**2] * 3 + [0.7**2])
    r, c = v.sum(1), v.sum(0)
    np.testing.assert_allclose(got_l, left * np.sqrt(r.sum() / r), rtol=1e-6)
    np.testing.assert_allclose(got_r, right / np.sqrt(c), rtol=1e-6)
    scale_l, scale_r = _scales([weight, bias], 0, True, 4)
    np.testing.assert_allclose(scale_l, np.sqrt(r.sum() / r), rtol=1e-13)
    np.testing.assert_allclose(scale_r, 1 / np.sqrt(c), rtol=1e-13)


def test_rank_one_scales_add_each_parameters_eps_root_to_v_plus_eps_squared():
    """optax's eps_root (a preconditioner_options key) joins eps^2 under the factorisation: v_hat + eps^2 + eps_root,
    each parameter's own; large against v here, so that leaving it out would fail."""
    rng = np.random.default_rng(5)
    weight, bias = _moments(rng, [(4, 3), (4,)], step=2.0, b2=0.95, eps=0.1)
    weight, bias = (dataclasses.replace(a, eps_root=root) for a, root in ((weight, 0.5), (bias, 2.0)))
    v = np.hstack([weight.v.reshape(4, 3), bias.v.reshape(4, 1)]).astype(np.float64) / (1 - 0.95**2)
    v += np.array([0.1**2 + 0.5] * 3 + [0.1**2 + 2.0])
    r, c = v.sum(1), v.sum(0)
    left, right = _scales([weight, bias], 0, True, 4)
    np.testing.assert_allclose(left, np.sqrt(r.sum() / r), rtol=1e-13)
    np.testing.assert_allclose(right, 1 / np.sqrt(c), rtol=1e-13)


def test_rank_one_scales_of_a_rank_one_v_far_above_eps_squared_are_its_exact_factors():
    """v = r c^T (Adafactor's factored state; entries 1e-10 to 1e-2, eps 1e-8): the scales are sqrt(s / r) and
    1 / sqrt(c) of v itself to 1e-5 of eps^2 / v's smallest, so that (v + eps^2)'s rows are exactly v's."""
    rng = np.random.default_rng(4)
    r, c = 10.0 ** rng.uniform(-5, -1, 6), 10.0 ** rng.uniform(-5, -1, 5)
    v = r[:, None] * c[None]
    weight = AdamMoments(np.zeros(20, np.float32), v[:, :4].ravel(), 1e9, 0.9, 0.999, 1e-8)
    bias = AdamMoments(np.zeros(6, np.float32), v[:, 4].copy(), 1e9, 0.9, 0.999, 1e-8)
    left, right = _scales([weight, bias], 0, True, 6)
    rows, cols = v.sum(1), v.sum(0)
    np.testing.assert_allclose(left, np.sqrt(rows.sum() / rows), rtol=1e-7)
    np.testing.assert_allclose(right, 1 / np.sqrt(cols), rtol=1e-7)
    np.testing.assert_allclose(1 / (left[:, None] * right[None]) ** 2, v, rtol=1e-7)  # r c^T / s is v


def test_options_and_modes_are_checked():
    assert adam_settings(None) == {"b1": 0.9, "b2": 0.999, "eps": 1e-8}
    assert adam_settings({"eps": 1e-6})["eps"] == 1e-6
    with pytest.raises(TypeError, match=r"preconditioner_options\['b1'\] must be a real number, got '0.9'"):
        adam_settings({"b1": "0.9"})
    with pytest.raises(ValueError, match=r"preconditioner_options\['eps'\] must be in \(0, inf\)"):
        adam_settings({"eps": 0})
    check_preconditioner("adam", "factored")
    with pytest.raises(ValueError, match="preconditioner='adam_update' needs mode='full'"):
        check_preconditioner("adam_update", "last_layer")
    with pytest.raises(ValueError, match="preconditioner must be None, 'adam' or 'adam_update', got 'Adam'"):
        check_preconditioner("Adam", "full")


def test_a_layer_whose_v_is_all_zero_is_named_in_a_warning_and_its_rows_are_zero():
    """All of a layer's v is 0 (a float16 state that underflowed): its factors are scaled by 0, with
    one warning naming the parameter and the checkpoint, not NumPy's 0 / 0 warning."""
    rng = np.random.default_rng(3)
    moments = _moments(rng, [(4, 3), (4,)])
    moments = [AdamMoments(m.m, np.zeros_like(m.v), m.step, m.b1, m.b2, m.eps) for m in moments]
    left, right = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)
    adam = RankOneAdam(lambda c: moments, [(0, True, 4)], {}, ["fc.weight", "fc.bias"])
    with pytest.warns(RuntimeWarning) as caught:
        got_l, got_r = adam.apply((left, right), 1, 0)
    assert [str(w.message)[:76] for w in caught] == [
        "preconditioner='adam': every second moment (v) of 'fc.weight' is 0 in checkp"
    ]
    assert "checkpoint 1" in str(caught[0].message)
    assert not got_l.any() and not got_r.any()


def test_a_weight_whose_v_is_all_zero_beside_a_bias_that_is_not_is_named_too():
    """The weight's v all 0, the bias's not (a float16 state where only the larger bias moments
    survive): the weight's columns are scaled by 0, so its part of every row is zero: warned."""
    rng = np.random.default_rng(4)
    weight, bias = _moments(rng, [(4, 3), (4,)])
    moments = [AdamMoments(weight.m, np.zeros_like(weight.v), weight.step, weight.b1, weight.b2, weight.eps), bias]
    left, right = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="second moment \\(v\\) of 'fc.weight' is 0 in checkpoint 0"):
        adam = RankOneAdam(lambda c: moments, [(0, True, 4)], {}, ["fc.weight", "fc.bias"])
        _, got_r = adam.apply((left, right), 0, 0)
    assert not got_r[:, :3].any() and got_r[:, 3].all()


def _with_zero_v(a: AdamMoments, shape, zero) -> AdamMoments:
    v = a.v.reshape(shape).copy()
    v[zero] = 0
    return AdamMoments(a.m, v.reshape(-1), a.step, a.b1, a.b2, a.eps)


def test_full_rows_warn_once_per_checkpoint_about_rows_with_gradient_where_v_is_zero_and_divide_it_by_eps():
    """Rows 1 and 3 of an embedding's v are 0 (tokens the training never held): "adam" divides a gradient
    there by eps, so it dominates its row. A block whose rows have no gradient there says nothing; the
    first block that has one warns, once per parameter per checkpoint, counting the block's rows that do
    (float64 NumPy on the block), at the caller's line (this file)."""
    rng = np.random.default_rng(5)
    emb, bias = _moments(rng, [(5, 3), (4,)])
    moments = [_with_zero_v(emb, (5, 3), [1, 3]), bias]
    adam = Preconditioned("adam", lambda c: moments, {}, ["emb.weight", "b"], [(5, 3), (4,)])
    g = rng.normal(size=(5, 19)).astype(np.float32)
    zero_cols = [3, 4, 5, 9, 10, 11]  # emb rows 1 and 3 in the row
    untouched = g.copy()
    untouched[:, zero_cols] = 0
    g[[0, 2, 4]] = untouched[[0, 2, 4]]  # rows 0, 2 and 4: nothing there ...
    g[0, 3 * 3 + 1] = 0.5  # ... but row 0's emb row 3, column 1: one entry is enough
    on_zero = g[:, :15].reshape(5, 5, 3)[:, [1, 3]].astype(np.float64)
    touch = int(np.count_nonzero(np.abs(on_zero).sum(axis=(1, 2)) > 0))
    touch_tail = int(np.count_nonzero(np.abs(on_zero[2:]).sum(axis=(1, 2)) > 0))
    assert (touch, touch_tail) == (3, 1)  # rows 0, 1 and 3 (of g[2:], row 3 only)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adam.apply(untouched, 0, 0)  # no row reaches them (a padding_idx row, an unused position): no warning
    with pytest.warns(RuntimeWarning) as caught:
        out = adam.apply(g, 0, 0)
        adam.apply(g, 0, 0)  # a second block of checkpoint 0: no second warning
        adam.apply(untouched, 2, 0)
        adam.apply(g[2:], 2, 0)
    messages = [str(w.message) for w in caught]
    assert messages[0].startswith(
        f"preconditioner='adam': {touch} of the 5 rows of a batch have gradient where the second moment (v) of "
        "'emb.weight' is 0 in checkpoint 0 (6 of 15 entries; 2 of its 5 rows all 0: "
    )
    assert messages[1].startswith(
        f"preconditioner='adam': {touch_tail} of the 3 rows of a batch have gradient where the second moment (v) of "
        "'emb.weight' is 0 in checkpoint 2 (6 of 15 entries; 2 of its 5 rows all 0: "
    )
    assert len(messages) == 2 and all(
        "by eps=0.001" in m and "scales whole zero rows and columns" in m for m in messages
    )
    assert all(w.filename == __file__ for w in caught), [w.filename for w in caught]
    rows = out[:, :15].reshape(5, 5, 3).astype(np.float64)
    np.testing.assert_allclose(rows[:, [1, 3]], on_zero / 1e-3, rtol=1e-6)
    with warnings.catch_warnings():  # the next step's direction is not divided by eps alone: no warning
        warnings.simplefilter("error")
        Preconditioned("adam_update", lambda c: moments, {}, ["emb.weight", "b"]).apply(g, 0, 0)


def test_full_rows_do_not_warn_about_zero_v_that_no_row_reaches():
    """A padding row (nn.Embedding(padding_idx=...)) or positions beyond the texts' length: v is 0 there in
    every checkpoint, and so is every row's gradient: "adam" leaves those entries 0 and says nothing."""
    rng = np.random.default_rng(9)
    emb, w = _moments(rng, [(6, 4), (3, 2)])
    moments = [_with_zero_v(emb, (6, 4), [0, 4, 5]), _with_zero_v(w, (3, 2), (1, 1))]
    adam = Preconditioned("adam", lambda c: moments, {}, ["emb.weight", "w"], [(6, 4), (3, 2)])
    g = rng.normal(size=(7, 30)).astype(np.float32)
    g[:, [0, 1, 2, 3, *range(16, 24), 24 + 3]] = 0  # emb rows 0, 4, 5 and w[1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for c in range(3):
            out = adam.apply(g, c, 0)
            out = adam.apply(g[:2], c, 0)
    assert not out[:, :24].reshape(2, 6, 4)[:, [0, 4, 5]].any() and not out[:, 27].any()


def test_rank_one_warns_once_per_layer_per_checkpoint_about_rows_and_columns_whose_v_is_zero():
    """fc's v [weight | bias] has row 1 all 0, column 2 all 0 and one more zero entry: the factorisation
    scales that row and column by 0 (the full rows divide them by eps), and says so once per checkpoint
    naming the layer and the counts (even when the checkpoints come back), at the caller's line; a second
    layer with no zero v says nothing."""
    rng = np.random.default_rng(6)
    weight, bias, other = _moments(rng, [(4, 3), (4,), (2, 4)])
    weight = _with_zero_v(_with_zero_v(_with_zero_v(weight, (4, 3), 1), (4, 3), (slice(None), 2)), (4, 3), (0, 0))
    bias = _with_zero_v(bias, (4,), 1)
    moments = [weight, bias, other]
    adam = RankOneAdam(lambda c: moments, [(0, True, 4), (2, False, 2)], {}, ["fc.weight", "fc.bias", "out.weight"])
    block = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    with pytest.warns(RuntimeWarning) as caught:
        left, right = adam.apply(block, 2, 0)
        adam.apply((block[0][:, :2], block[1]), 2, 1)
        adam.apply(block, 2, 0)
        adam.apply(block, 3, 0)
        adam.apply(block, 2, 0)  # checkpoint 2 again (its scales rebuilt): no second warning about it
    assert [str(w.message).split(": ")[1][-12:] for w in caught] == ["checkpoint 2", "checkpoint 3"]
    assert all(w.filename == __file__ for w in caught), [w.filename for w in caught]  # the caller's line
    text = str(caught[0].message)
    assert text.startswith(
        "preconditioner='adam': 8 of 16 second moments (v) of 'fc.weight' (bias as the last column) are 0 in "
        "checkpoint 2: 1 of 4 rows and 1 of 4 columns of v are all 0"
    )
    assert "its 1 other zero entries get r c^T / s > 0" in text and "divides those entries by eps=0.001" in text
    assert not left[:, 1].any() and not right[:, 2].any() and left[:, [0, 2, 3]].all() and right[:, [0, 1, 3]].all()


def test_scales_without_a_name_describe_the_layer_by_its_shape():
    rng = np.random.default_rng(7)
    (emb,) = _moments(rng, [(6, 2)])
    with pytest.warns(
        RuntimeWarning, match=r"4 of 12 second moments \(v\) of a layer of 6 x 2 \(out, in\) are 0: 2 of"
    ):
        left, _ = _scales([_with_zero_v(emb, (6, 2), [0, 5])], 0, False, 6)
    assert not left[[0, 5]].any() and left[1:5].all()


def test_no_zero_v_no_warning():
    rng = np.random.default_rng(8)
    moments = _moments(rng, [(4, 3), (4,)])
    block = rng.normal(size=(2, 16)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Preconditioned("adam", lambda c: moments, {}, ["w", "b"], [(4, 3), (4,)]).apply(block, 0, 0)
        pair = rng.normal(size=(2, 4)).astype(np.float32), rng.normal(size=(2, 4)).astype(np.float32)
        RankOneAdam(lambda c: moments, [(0, True, 4)], {}, ["w", "b"]).apply(pair, 0, 0)


def test_eps_root_enters_under_the_square_root_of_both_kinds():
    """optax's eps_root (review126 F1): g / (sqrt(v_hat + eps_root) + eps) and the next step's
    m_hat' / (sqrt(v_hat' + eps_root) + eps), against float64 NumPy; largest where v is 0."""
    rng = np.random.default_rng(5)
    (a,) = _moments(rng, [(6,)], step=4.0, b1=0.8, b2=0.95, eps=1e-6)
    v = a.v.copy()
    v[[1, 4]] = 0.0  # never a gradient there: divided by sqrt(eps_root) + eps, not eps
    moments = [AdamMoments(a.m, v, a.step, a.b1, a.b2, a.eps, eps_root=1e-4)]
    g = rng.normal(size=(3, 6)).astype(np.float32)
    g64, m, v64, t = g.astype(np.float64), a.m.astype(np.float64), v.astype(np.float64), a.step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the zero-v warning, tested on its own
        adam = Preconditioned("adam", lambda c: moments, {}).apply(g, 0, 0)
    expected = g64 / (np.sqrt(v64 / (1 - 0.95**t) + 1e-4) + 1e-6)
    np.testing.assert_allclose(adam, expected, rtol=1e-6)
    assert np.abs(adam[:, [1, 4]]).max() < 1e3 * np.abs(g[:, [1, 4]]).max()  # not g / eps
    update = Preconditioned("adam_update", lambda c: moments, {}).apply(g, 0, 0)
    m2, v2 = 0.8 * m + 0.2 * g64, 0.95 * v64 + 0.05 * g64**2
    expected = (m2 / (1 - 0.8 ** (t + 1))) / (np.sqrt(v2 / (1 - 0.95 ** (t + 1)) + 1e-4) + 1e-6)
    np.testing.assert_allclose(update, expected, rtol=1e-5)


def test_eps_root_is_an_option_kept_only_when_not_zero():
    assert adam_settings({"eps_root": 1e-8}) == {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "eps_root": 1e-8}
    assert adam_settings({"eps_root": 0.0}) == {"b1": 0.9, "b2": 0.999, "eps": 1e-8}  # metadata as before
    assert adam_settings({"eps_root": 2}) == {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "eps_root": 2.0}
    with pytest.raises(ValueError, match=r"preconditioner_options\['eps_root'\] must be in \[0, inf\), got -1e-08"):
        adam_settings({"eps_root": -1e-8})
    with pytest.raises(ValueError, match=r"unknown keys \['epsroot'\]; expected b1, b2, eps, eps_root"):
        adam_settings({"epsroot": 1e-8})


def test_the_zero_v_warning_names_the_divisor_with_eps_root():
    v = np.array([0.0, 1.0, 1.0], np.float32)
    moments = [AdamMoments(np.zeros(3, np.float32), v, 2.0, 0.9, 0.99, 1e-8, eps_root=1e-6)]
    with pytest.warns(RuntimeWarning, match=r"divides a gradient there by sqrt\(eps_root\) \+ eps=0\.00100001"):
        Preconditioned("adam", lambda c: moments, {}, ["w"], [(3,)]).apply(np.ones((1, 3), np.float32), 0, 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_first_moment_that_is_not_finite_is_refused_naming_the_parameter_and_the_state(bad):
    """A NaN or infinite m (a diverged run, a damaged file) would make every "adam_update" row NaN there."""
    v = np.ones((2, 3), np.float32)
    m = np.zeros((2, 3), np.float32)
    check_moments("fc.weight", (2, 3), m, v, 2.0, "checkpoints[1][2] (opt.pt)")
    m[1, 2] = bad
    with pytest.raises(ValueError, match=r"^checkpoints\[1\]\[2\] \(opt.pt\): the first moment of fc.weight has 1 NaN"):
        check_moments("fc.weight", (2, 3), m, v, 2.0, "checkpoints[1][2] (opt.pt)")


@pytest.mark.parametrize("step", [0, 0.5, np.nan, np.inf])
def test_a_step_count_below_one_or_not_finite_is_refused_naming_the_parameter(step):
    """review309: Adam's bias correction 1 - b2^t is 0 at t=0 (a state saved before its first step: v / 0 makes
    every "adam" row NaN or 0); the step count must be >= 1 and finite."""
    m, v = np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32)
    check_moments("fc.weight", (2, 3), m, v, 1.0, "checkpoints[1][2] (opt.pt)")
    with pytest.raises(ValueError, match=r"^checkpoints\[1\]\[2\] \(opt.pt\): the step count of fc.weight is"):
        check_moments("fc.weight", (2, 3), m, v, step, "checkpoints[1][2] (opt.pt)")


def _over_adam(caught) -> list[str]:
    return [str(w.message) for w in caught if "the most the full-row 'adam' weighs" in str(w.message)]


@pytest.mark.parametrize("tiny", [1e-30, 1e-20, 3e-18])
@pytest.mark.parametrize("near", ["row", "column"])
def test_a_row_or_column_of_v_near_zero_is_weighted_as_full_adams_eps_bounds_it(near, tiny):
    """review174 F1, fx186: an attention key's bias (gradient 0 in exact arithmetic: a column of v ~1e-18 against
    ~1) and a token last seen long ago (a row of v decayed to ~1e-20) got weights 1 / sqrt(v) with eps left out,
    up to 1e7 times full Adam's 1 / (sqrt(v) + eps) <= 1 / eps. With eps^2 added to v, every entry's weight
    left_i right_j is within a small factor of full Adam's (float64 NumPy), and nothing is warned about."""
    rng = np.random.default_rng(11)
    eps = 1e-8
    weight, bias = _moments(rng, [(4, 3), (4,)], eps=eps)
    if near == "row":
        v = weight.v.reshape(4, 3).astype(np.float64)
        v[2] *= tiny
        moments = [AdamMoments(weight.m, v.reshape(-1).astype(np.float32), weight.step, weight.b1, weight.b2, eps)]
    else:
        moments = [weight, AdamMoments(bias.m, np.full(4, tiny, np.float32), bias.step, bias.b1, bias.b2, eps)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        left, right = _scales(moments, 0, near == "column", 4, "'k.weight'", 1)
    vh = np.hstack([m.v.astype(np.float64).reshape(4, -1) for m in moments]) / (1 - 0.99**3)
    full = 1 / (np.sqrt(vh) + eps)
    r, c = vh.sum(1), vh.sum(0)
    assert (np.sqrt(r.sum() / r)[:, None] / np.sqrt(c)[None] / full).max() > 1.5  # eps left out: 2 to 1e7 times
    ratio = left[:, None] * right[None] / full
    assert 0.2 < ratio.min() and ratio.max() < 5, ratio


def test_rank_one_warns_about_entries_whose_row_and_column_of_v_are_both_near_zero():
    """A row and a column of v both ~1e-18: eps^2 bounds each sum, not their product, so the entry they share is
    weighted ~1e8 times 1 / eps, far over anything full Adam weighs: named in a RuntimeWarning, with that factor
    from float64 NumPy's factorisation of v + eps^2."""
    rng = np.random.default_rng(13)
    eps = 1e-8
    weight, bias = _moments(rng, [(4, 3), (4,)], eps=eps)
    v = weight.v.reshape(4, 3).astype(np.float64)
    v[2] *= 1e-18
    weight = AdamMoments(weight.m, v.reshape(-1).astype(np.float32), weight.step, weight.b1, weight.b2, eps)
    bias = AdamMoments(bias.m, np.full(4, 3e-18, np.float32), bias.step, bias.b1, bias.b2, eps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        left, right = _scales([weight, bias], 0, True, 4, "'k.weight'", 1)
    vh = np.hstack([weight.v.reshape(4, 3), bias.v[:, None]]).astype(np.float64) / (1 - 0.99**3) + eps**2
    r, c = vh.sum(1), vh.sum(0)
    np.testing.assert_allclose(left, np.sqrt(r.sum() / r), rtol=1e-12)
    np.testing.assert_allclose(right, 1 / np.sqrt(c), rtol=1e-12)
    top = np.sqrt(r.sum() / r).max() / np.sqrt(c).min() * eps
    assert top > 1e6  # the setting the test means
    (text,) = _over_adam(caught)
    assert text.startswith(
        "preconditioner='adam': the rank-one factorisation of the second moments (v) of 'k.weight' in checkpoint 1 "
        "weighs gradient entries in 1 of 4 rows and 1 of 4 columns (the bias's, the last, among them) by up to "
        f"{top:.1e} times the most the full-row 'adam' weighs any entry (1 / eps)"
    ), text
    assert "layers=" in text and "preconditioner='adam'" in text


def test_rank_one_does_not_warn_about_a_spread_of_scales_under_the_bound():
    """A row and a column of v 1e-4 times the rest (v_hat ~34, eps 1e-3: their entry 3e-7 against eps^2 1e-6):
    weighted over 1 / eps but within 100 times it, so no warning; the scales are the factorisation of v + eps^2."""
    rng = np.random.default_rng(12)
    (weight,) = _moments(rng, [(5, 4)])
    v = np.ones((5, 4))
    v[1] *= 1e-4
    v[:, 3] *= 1e-4
    weight = AdamMoments(weight.m, v.reshape(-1).astype(np.float32), weight.step, weight.b1, weight.b2, weight.eps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        left, right = _scales([weight], 0, False, 5, "'w'")
    vh = v.astype(np.float32).astype(np.float64) / (1 - 0.99**3) + 1e-6
    r, c = vh.sum(1), vh.sum(0)
    np.testing.assert_allclose(left, np.sqrt(r.sum() / r), rtol=1e-12)
    np.testing.assert_allclose(right, 1 / np.sqrt(c), rtol=1e-12)
    assert 1 < left[1] * right[3] * 1e-3 < 100


def test_a_weight_one_column_short_needs_its_own_bias_after_it():
    """A (p, q - 1) weight is a (p, q) slot only with a (p,) bias after it: not with the next layer's weight."""
    with pytest.raises(ValueError, match=r"factored layer of dims \(4, 4\) has no \(out, in\) weight"):
        layer_groups([("a.weight", (4, 3)), ("b.weight", (2, 4))], [(4, 4), (2, 4)])
    with pytest.raises(ValueError, match=r"factored layer of dims \(4, 4\) has no \(out, in\) weight"):
        layer_groups([("a.weight", (4, 3)), ("a.bias", (3,))], [(4, 4)])


def test_the_padding_row_is_left_out_of_the_warning_about_scales_over_adams():
    """The padding_idx row's v near 0 (not exactly) beside a column near 0: the caller masks that row, so no
    warning about its scale, though the same v on another row is warned about."""
    rng = np.random.default_rng(9)
    (emb,) = _moments(rng, [(6, 3)])
    v = emb.v.reshape(6, 3).copy()
    v[0], v[:, 2] = 1e-30, 1e-30
    near = AdamMoments(emb.m, v.reshape(-1), emb.step, emb.b1, emb.b2, emb.eps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _scales([near], 0, False, 6, "'emb.weight'", 0, True, padding_row=0)
    with pytest.warns(RuntimeWarning, match=r"weighs gradient entries in 1 of 6 rows"):
        _scales([near], 0, False, 6, "'emb.weight'", 0, True)
