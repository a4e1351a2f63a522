"""The rule a Kronecker layer's share of dim must meet, and the refusal tracin.torch and tracin.jax share."""

from __future__ import annotations

import math

import pytest

from tracin._export.kronecker_share import balanced_share, check_balanced, unbalanced
from tracin.projection import LayerMatrix, Projection


def _refused(share: int, layer: LayerMatrix) -> bool:
    """The rule, written out: a factor of kronecker_dims below both its side's size and isqrt(share) // 2."""
    k_rows, k_cols = Projection.kronecker_dims(share, layer)
    low = math.isqrt(share) // 2
    return k_rows < min(layer.rows, low) or k_cols < min(layer.cols + layer.bias, low)


LAYERS = [LayerMatrix(13, 40), LayerMatrix(64, 64), LayerMatrix(10, 6, bias=True), LayerMatrix(2, 500)]


def test_a_share_is_unbalanced_when_a_factor_is_below_both_its_side_and_half_its_square_root():
    assert unbalanced(43, LayerMatrix(13, 40)) == (1, 40)  # prime: 43 x 1, the 43 capped at the 40 columns
    assert unbalanced(42, LayerMatrix(13, 40)) is None  # 6 x 7
    assert unbalanced(67, LayerMatrix(10, 6, bias=True)) is None  # a small layer: 10 x 6, its sides' sizes
    assert unbalanced(106, LayerMatrix(2, 500)) is None  # 2 x 53: the 2 is the whole side
    assert unbalanced(106, LayerMatrix(64, 64)) == (53, 2)
    for layer in LAYERS:
        for share in range(1, 300):
            got = unbalanced(share, layer)
            assert (got is not None) == _refused(share, layer)
            assert got is None or got == Projection.kronecker_dims(share, layer)


def test_a_bias_column_counts_in_its_sides_size():
    # 222 = 6 x 37 on 64 x 6 with a bias: 6 projected columns for the 7 (bias included), below isqrt(222) // 2 = 7
    assert unbalanced(222, LayerMatrix(64, 6, bias=True)) == (37, 6)
    assert unbalanced(222, LayerMatrix(64, 6)) is None  # 6 is the whole side without a bias


@pytest.mark.parametrize("share", [38, 43, 47, 53, 106, 109, 211, 1021])  # 38, 47: the nearest is above
def test_the_suggested_share_is_the_nearest_that_every_layer_takes(share):
    k = balanced_share(LAYERS, share, 4)
    assert not any(_refused(k, layer) for layer in LAYERS)
    nearer = [j for j in range(1, 2 * share) if (abs(j - share), j) < (abs(k - share), k)]  # the smaller of two as near
    assert all(any(_refused(j, layer) for layer in LAYERS) for j in nearer)


def test_the_first_unbalanced_layer_is_refused_with_a_dim_every_layer_takes():
    shares = [("layer 'a'", 42, LayerMatrix(13, 40)), ("weight 'b'", 43, LayerMatrix(64, 64))]
    check_balanced(129, shares[:1], 3)  # balanced: no error
    with pytest.raises(ValueError) as refused:
        check_balanced(129, shares + [("layer 'c'", 43, LayerMatrix(13, 40))], 3)
    assert str(refused.value) == (
        "projection: dim=129 over 3 segments gives weight 'b' 43 outputs for its 64 x 64 gradient; (k_rows, k_cols) "
        "= (43, 1), the most balanced factors of 43 within those sides, uses 43 of them and projects the gradient's "
        "64 columns to 1: a factor below both its side's size and isqrt(43) // 2 = 3 is refused. Choose dim = 3 "
        "segments x k with k whose factors balance on every Kronecker layer, e.g. 3 x 42 = 126"
    )
