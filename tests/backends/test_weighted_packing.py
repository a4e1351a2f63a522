"""Where the scale-aware bound holds for checkpoint slots of very different scales in one test row
(README "Numerical contract", review75 F1): both backends pack w_c g_c(t) in float32 times one power of
two 2^-e_t per test row, set by the row's largest weighted value M_t, so a slot whose packed values fall
below float32's normal range loses bits and one at or below 2^-150 packs as 0. Pinned against float64
on the C++ kernel and the torch backend, so that the README cannot go stale silently: a kernel that
scales per slot instead fails the "lost" cases here, and its README must then say so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tracin

README = Path(__file__).resolve().parents[2] / "README.md"


def devices() -> list[str]:
    """The C++ kernel, and the torch backend on CPU tensors where torch is installed."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return ["cpu"]
    return ["cpu", "torch:cpu"]


def two_slots(a: float, b: float, x1: float, t1: float = 1.0, device: str = "cpu") -> tuple[float, float, float]:
    """(score, exact float64 score, bound) of one test row [1] / [t1] against one train row [0] / [x1],
    weights [2^a, 2^b]: slot 0 sets the row's exponent and adds nothing, slot 1 carries the score."""
    w = [2.0**a, 2.0**b]
    test = [np.array([[1.0]], np.float32), np.array([[t1]], np.float32)]
    train = [np.array([[0.0]], np.float32), np.array([[x1]], np.float32)]
    got = tracin.scores(tracin.Gradients(test, w), tracin.Gradients(train, w), device=device)[0, 0]
    exact = w[1] * float(test[1][0, 0]) * float(train[1][0, 0])
    bound = 1e-5 * sum(abs(c * float(t[0, 0]) * float(x[0, 0])) for c, t, x in zip(w, test, train, strict=True))
    return float(got), exact, bound


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    ("a", "b", "x1", "t1"),
    [
        (0, -66, 2.0**60, 1.0),  # e_t = 0, slots 2^66 (7e19) apart: packed 2^-66
        (0, -126, 2.0**100, 1 + 2**-23),  # e_t = 0: packed at 2^-126, float32's smallest normal
        (-100, -129, 2.0**100, 1 + 2**-23),  # lifted by 2^4: 2^-129 packs at 2^-125
        (130, -96, 2.0**100, 1 + 2**-23),  # brought down by 2^30: 2^-96 packs at 2^-126
    ],
)
def test_slots_packed_in_the_normal_range_stay_within_the_bound(device, a, b, x1, t1):
    got, exact, bound = two_slots(a, b, x1, t1, device)
    assert abs(got - exact) <= bound, (got, exact)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    ("a", "b", "x1"),
    [
        (0, -150, 2.0**100),  # e_t = 0: packed at 2^-150, rounds to 0
        (-100, -160, 2.0**100),  # lifted by 2^4 (slots 2^60 apart): packed at 2^-156
        (130, -140, 2.0**100),  # subnormal at e_t = 0 (2^-140), brought down by 2^30: packed at 2^-170
    ],
)
def test_a_slot_packed_at_or_below_2_to_the_minus_150_is_lost(device, a, b, x1):
    """The documented failure region: slot 1's term is lost whole, far beyond the bound."""
    got, exact, bound = two_slots(a, b, x1, device=device)
    assert got == 0.0 and exact > 1e4 * bound


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    ("b", "t1"),
    [
        (-120, 1.0),  # to 2^-150: 0
        (-125, 1.0),  # to 2^-155: 0
        (-101, 1 + 9 * 2**-23),  # 5 bits lost: 9 x 2^-23 / (1 + 9 x 2^-23) of itself, beyond 2^-20
        (-101, 1 + 15 * 2**-23),  # 5 bits lost: 15 x 2^-23 of itself
        (-106, 1 + 2**-15),  # to 2^-136 (14 bits): 2^-15 of itself
    ],
)
def test_a_row_is_not_brought_down_past_a_normal_slot(device, b, t1):
    """review107 F1: a row whose slot 0 overflows float32 (2^130) is not brought down by 2^30 where that
    would round slot 1, a normal float32 at e_t = 0, by more than 2^-20 of itself (to 0, or to a
    subnormal holding too few of its bits): it is packed as it is, and the call is the overflow error,
    naming no pair (the packing overflows), on both backends. Slot 1 at 2^-96 stays normal (2^-126): see
    test_slots_packed_in_the_normal_range_stay_within_the_bound; one rounded within 2^-20 is brought
    down: test_a_row_is_brought_down_where_its_slots_round_within_2_to_the_minus_20."""
    with pytest.raises(ValueError, match="^influence overflowed float32 although every input is finite") as error:
        two_slots(130, b, 2.0**100, t1, device=device)
    assert "first for test row" not in str(error.value)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    ("b", "t1"),
    [
        (-99, 1 + 5 * 2**-23),  # to 2^-129 (21 bits): 3 bits lost (101 rounds up), 3 x 2^-23 of itself
        (-100, 1 + 2**-23),  # to 2^-130 (20 bits): 4 bits lost, 2^-23 of itself
        (-101, 1 + 8 * 2**-23),  # 5 bits lost: 8 x 2^-23 / (1 + 8 x 2^-23) of itself, just within 2^-20
    ],
)
def test_a_row_is_brought_down_where_its_slots_round_within_2_to_the_minus_20(device, b, t1):
    """review112 W2: slot 0 (2^130) brings the row down by 2^30 and slot 1 (2^b t1, normal at e_t = 0)
    packs as a subnormal that loses bits of it, but rounds it by at most 2^-20 of itself: the row is
    scored, and slot 1, which carries the whole score (train row [0] / [2^100]), is within the bound
    against float64 (2^-20 ~ 1e-6 of a slot's part of it). 32eaeb6 refused every lost bit."""
    got, exact, bound = two_slots(130, b, 2.0**100, t1, device)
    assert abs(got - exact) <= bound, (got, exact)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("t1", [1.0, 1 + 2**-19, 1 + 2**-20, 1 + 2**-23])
def test_a_row_is_brought_down_where_its_slots_become_subnormals(device, t1):
    """review112 F3: weights [2^100, 1], test [2^30] / [2^-100 t1], train [2^-60] / [2^90]: slot 0 (2^130)
    brings the row down by 2^30 and slot 1 packs at 2^-130 t1, a subnormal holding 20 bits (down to
    2^-149): exactly where t1 fits them (1, 1 + 2^-19), else rounded by at most 2^-20 of itself
    (1 + 2^-20: its last bit at 2^-150, a tie to even; 1 + 2^-23). The row is scored: 2^70 + 2^-10 t1
    rounded to float32 (2^70), by scores and top_k, full and factored. Before, 1f9a0db and 6ea28e8
    refused every case (any normal value made subnormal), 32eaeb6 the last two (any lost bit)."""
    w = [2.0**100, 1.0]
    test = [np.array([[2.0**30]], np.float32), np.array([[2.0**-100 * t1]], np.float32)]
    train = [np.array([[2.0**-60]], np.float32), np.array([[2.0**90]], np.float32)]
    ones = [np.ones((1, 1), np.float32)] * 2
    pairs = {
        "full": (tracin.Gradients(test, w), tracin.Gradients(train, w)),
        "factored": (tracin.FactoredGradients(test, ones, w), tracin.FactoredGradients(train, ones, w)),
    }
    exact = 2.0**70 + 2.0**-10 * t1
    for layout, (t, x) in pairs.items():
        assert tracin.scores(t, x, device=device)[0, 0] == np.float32(exact), layout
        best = tracin.top_k(t, x, k=1, device=device)
        assert best.values[0, 0] == np.float32(exact) and best.indices[0, 0] == 0, layout


@pytest.mark.parametrize("device", devices())
def test_subnormal_packed_values_keep_24_minus_s_bits(device):
    """Slot 1 packs at 2^-140 (s = 14: 10 bits): 1 + 2^-10 keeps its last bit at 2^-136, rounds to 1
    (ties to even) at 2^-140, an error of 1e-3 of the score, 100 x the bound."""
    got, exact, bound = two_slots(0, -136, 2.0**100, 1 + 2**-10, device)
    assert abs(got - exact) <= bound
    got, exact, bound = two_slots(0, -140, 2.0**100, 1 + 2**-10, device)
    assert got == 2.0**-40 and abs(got - exact) > 50 * bound


@pytest.mark.parametrize("device", devices())
def test_the_readme_example_is_what_the_backends_return(device):
    """The Numerical contract's example, as written there, and two more cases, against float64."""
    contract = " ".join(README.read_text().split("Numerical contract:")[1].split("### On a GPU")[0].split())
    assert "apart within one test row (learning rates × gradient norms 30 orders of magnitude apart" in contract
    assert "one power of two 2^−e_t per test row t, shared by all its checkpoint slots" in contract
    assert "weights 1 and 1e-20, test values 1 and 1e-30 and training values 1e-30 and 1e30 score 1e-30" in contract
    assert "about 2³⁰ (cosine 2⁹⁴) below a lifted row's largest" in contract
    assert "when every nonzero |w_c| is in [2⁻²⁴, 2²⁵)" in contract
    for w, t, x, said, exact in [
        ([1.0, 1e-20], [1.0, 1e-30], [1e-30, 1e30], 1e-30, 1e-20 + 1e-30),
        ([1e10, 1.0], [1e30, 1e-36], [1e-40, 1e38], "overflow", 101.0),  # slots 1e76 apart (review107 F1)
        ([1.0, 1e-20], [1.0, 1.0], [1e-30, 1e20], None, 1.0 + 1e-30),  # slots 1e20 apart: within the bound
    ]:
        test = [np.array([[v]], np.float32) for v in t]
        train = [np.array([[v]], np.float32) for v in x]
        if said == "overflow":  # slot 1 (1e-36) is normal: the row is not brought down, 1e40 overflows
            with pytest.raises(ValueError, match="^influence overflowed float32 although every input is finite"):
                tracin.scores(tracin.Gradients(test, w), tracin.Gradients(train, w), device=device)
            continue
        got = float(tracin.scores(tracin.Gradients(test, w), tracin.Gradients(train, w), device=device)[0, 0])
        exact = sum(c * float(a[0, 0]) * float(b[0, 0]) for c, a, b in zip(w, test, train, strict=True))
        bound = 1e-5 * sum(abs(c * float(a[0, 0]) * float(b[0, 0])) for c, a, b in zip(w, test, train, strict=True))
        if said is None:
            assert abs(got - exact) <= bound
        else:
            assert got == pytest.approx(said, rel=1e-5) and abs(got - exact) > 1e3 * bound


@pytest.mark.parametrize("second", [None, 0.0, 2.0**-100, 1.0])
def test_a_row_largest_in_2_to_the_127_to_128_keeps_its_slots_where_its_pass_is_rescaled(second):
    """review78 F2 (README: the C++ kernel rescales a pass only if a row in it is all below 2^-96, zeros
    too, or overflows float32): test row 0 = [1.5 x 2^127] / [2^-125] against train [0] / [2^100], exact
    2^-25. Alone, or beside a row of 1 (no rescale), the C++ kernel keeps e_t = 0 and slot 1 packs at
    2^-125: within the bound. Beside a row of 0 or 2^-100 the pass is rescaled, but bringing row 0 down
    by 2^27 would take slot 1 (normal at e_t = 0) to 2^-152 (review107 F1: lost, before), so the row
    keeps e_t = 0 on both backends (the torch backend, which brings such rows down, too) and scores
    within the bound (1.5 x 2^127 is finite: no overflow)."""
    w = [1.0, 1.0]
    extra = [] if second is None else [second]
    test = [
        np.array([1.5 * 2.0**127, *extra], np.float32)[:, None],
        np.array([2.0**-125, *[0.0] * len(extra)], np.float32)[:, None],
    ]
    train = [np.array([[0.0]], np.float32), np.array([[2.0**100]], np.float32)]
    rescaled = second is not None and second < 2.0**-96
    for device in devices():
        got = float(tracin.scores(tracin.Gradients(test, w), tracin.Gradients(train, w), device=device)[0, 0])
        assert abs(got - 2.0**-25) <= 1e-5 * 2.0**-25, (device, rescaled, got)
