"""Which preconditioned sets tracin.scoring pairs (metadata["preconditioner"]), and the self-influence of
preconditioner='adam_update' rows, refused by every entry point (review36 F2, F3)."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
import tracin.distributed
from tracin.report import checkpoint_diagnostics


def _side(rng, n: int, kind: str | None) -> tracin.Gradients:
    meta = {"mode": "full", "preconditioner": None if kind is None else {"kind": kind, "eps": 1e-8}}
    return tracin.Gradients(rng.standard_normal((n, 6)).astype(np.float32), metadata=meta)


@pytest.mark.parametrize("test_kind", ["adam", "adam_update"])
def test_adam_update_train_rows_ask_for_plain_test_rows_whatever_the_test_side_is(rng, test_kind):
    # F3: 'adam' test rows against 'adam_update' train rows said "export both sides with the same one",
    # which is refused in turn: the advice is plain test rows
    test, train = _side(rng, 3, test_kind), _side(rng, 5, "adam_update")
    with pytest.raises(ValueError, match=r"export test rows with preconditioner=None") as e:
        tracin.scores(test, train)
    assert "same one" not in str(e.value)
    assert tracin.scores(_side(rng, 3, None), train).shape == (3, 5)


def test_other_mismatches_still_ask_for_the_same_preconditioner(rng):
    with pytest.raises(ValueError, match=r"test gradients are preconditioner='adam' but train .*=None: export both"):
        tracin.scores(_side(rng, 3, "adam"), _side(rng, 5, None))


def test_self_influence_of_adam_update_rows_is_refused_everywhere(rng, tmp_path):
    # F2: self_influence returned sum_c w_c |u_c|^2 (the next step's squared norm), which ranks rows unlike <g, u>
    rows = _side(rng, 5, "adam_update")
    writer = tracin.GradientStore.create(tmp_path / "s", 5, [6], metadata=rows.metadata)
    writer.write(0, 0, rows.kernel_side().blocks[0])
    writer.finalize()
    store = tracin.GradientStore.open(tmp_path / "s")
    refused = r"^train gradients are preconditioner='adam_update' .* no self-influence; rank by the diagonal of scores"
    for call in (
        lambda: tracin.self_influence(rows),
        lambda: tracin.self_influence(rows, per_checkpoint=True),
        lambda: tracin.self_influence(rows, whitening=tracin.Whitening.fit(rows)),
        lambda: tracin.Whitening.fit(rows).self_influence(rows),
        lambda: checkpoint_diagnostics(rows),
        lambda: tracin.distributed.self_influence(store),  # refused before any cluster is sought
    ):
        with pytest.raises(ValueError, match=refused):
            call()
    for kind in (None, "adam"):  # their self-influence is a score of a row with itself
        plain = _side(rng, 5, kind)
        expected = (plain.kernel_side().blocks[0].astype(np.float64) ** 2).sum(1)
        np.testing.assert_allclose(tracin.self_influence(plain), expected, rtol=1e-6)
