"""Pins behaviour of tracin.scoring's pair checks that mutation testing (m406) found unpinned: which refusal a
pair meets first, normalize's per-checkpoint grouping from the metadata, and the checkpoint-record checks on
hand-built metadata. Expected values are float64 NumPy or the documented messages."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import tracin


def _rows(seed: int, n: int, d: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_other_params_under_a_per_layer_projection_are_named_as_other_params_not_other_layouts():
    """M6: two sides of one framework with other layers= under one per-layer projection differ in their segment
    layouts too; the message names the parameters (the cause), not a layout from another tracin version."""
    spec = tracin.Projection(8, seed=1, per_layer=True, kronecker=True).to_dict()
    kron = {**spec, "segments": [{"rows": 3, "cols": 2, "bias": False, "transposed": False}, 4]}
    plain = {**spec, "segments": [6, 4]}
    params_a = [{"name": "fc.weight", "shape": [3, 2]}, {"name": "fc.bias", "shape": [4]}]
    params_b = [{"name": "emb.weight", "shape": [6]}, {"name": "fc.bias", "shape": [4]}]
    test = tracin.Gradients([_rows(0, 2, 8)], metadata={"framework": "torch", "projection": kron, "params": params_a})
    train = tracin.Gradients([_rows(1, 3, 8)], metadata={"framework": "torch", "projection": plain, "params": params_b})
    with pytest.raises(ValueError, match="test and train are gradients of different parameters") as err:
        tracin.scores(test, train)
    assert "segment layouts" not in str(err.value)


def _records(digests: list[str], sources: list[str]) -> dict:
    return {"framework": "torch", "fingerprints": {"checkpoints": digests}, "checkpoint_sources": sources}


def _cosine_reference(test: list[np.ndarray], train: list[np.ndarray], weights: list[float], run: int) -> np.ndarray:
    """float64: per real checkpoint (`run` consecutive slots) the rows unit-normalised over its slots."""
    out = np.zeros((test[0].shape[0], train[0].shape[0]))
    for c in range(0, len(test), run):
        t = [m.astype(np.float64) for m in test[c : c + run]]
        x = [m.astype(np.float64) for m in train[c : c + run]]
        nt = np.sqrt(sum((m**2).sum(1) for m in t))
        nx = np.sqrt(sum((m**2).sum(1) for m in x))
        for s in range(run):
            out += weights[c + s] * (t[s] @ x[s].T) / np.outer(nt, nx)
    return out


def test_normalize_groups_the_slots_of_one_recorded_checkpoint():
    """M14: metadata['fingerprints']['checkpoints'] of 2 real checkpoints over 4 slots (2 layers each): the cosine
    normalises each row over both layers of a checkpoint, not each slot alone."""
    weights = [0.5, 0.5, 2.0, 2.0]
    test_m = [_rows(10 + s, 3, 4 + s) for s in range(4)]
    train_m = [_rows(20 + s, 5, 4 + s) for s in range(4)]
    meta = _records(["a", "b"], ["file", "file"])
    test = tracin.Gradients(test_m, weights, metadata=meta)
    train = tracin.Gradients(train_m, weights, metadata=dict(meta))
    want = _cosine_reference(test_m, train_m, weights, 2)
    assert not np.allclose(want, _cosine_reference(test_m, train_m, weights, 1), atol=1e-3)  # the grouping shows
    np.testing.assert_allclose(tracin.scores(test, train, normalize=True), want, rtol=1e-5, atol=1e-5)
    best = tracin.top_k(test, train, k=5, normalize=True)
    np.testing.assert_allclose(best.values, -np.sort(-want, axis=1), rtol=1e-5, atol=1e-5)


def test_normalize_refuses_sides_grouped_differently():
    """M13: test records 2 slots per checkpoint, train 4 (one checkpoint): normalize=True is refused."""
    weights = [1.0] * 4
    test = tracin.Gradients(
        [_rows(30 + s, 2, 3) for s in range(4)], weights, metadata=_records(["a", "b"], ["file"] * 2)
    )
    train = tracin.Gradients(
        [_rows(40 + s, 3, 3) for s in range(4)], weights, metadata={"fingerprints": {"checkpoints": ["a"]}}
    )
    with pytest.raises(ValueError, match=r"test records 2 checkpoint slots \(layers\) per checkpoint but train 4"):
        tracin.scores(test, train, normalize=True)


def test_slots_not_a_multiple_of_the_recorded_checkpoints_are_plain_slots():
    """M18: 5 slots over 2 recorded checkpoints group nothing: the count is said as 5 checkpoints, and
    normalize=True normalises each slot alone (float64 reference)."""
    meta = {"fingerprints": {"checkpoints": ["a", "b"]}}
    five = tracin.Gradients([_rows(50 + s, 2, 3) for s in range(5)], metadata=meta)
    four = tracin.Gradients([_rows(60 + s, 3, 3) for s in range(4)])
    with pytest.raises(ValueError, match=r"test has 5 checkpoints but train has 4 checkpoints;"):
        tracin.scores(five, four)
    test_m = [_rows(70 + s, 2, 3) for s in range(5)]
    train_m = [_rows(80 + s, 4, 3) for s in range(5)]
    got = tracin.scores(tracin.Gradients(test_m, metadata=meta), tracin.Gradients(train_m), normalize=True)
    np.testing.assert_allclose(got, _cosine_reference(test_m, train_m, [1.0] * 5, 1), rtol=1e-5, atol=1e-5)


def test_checkpoints_given_each_way_on_both_sides_are_said_to_be_mixed():
    """M19: checkpoint 0 a file for test and in memory for train, checkpoint 1 the other way round: the warning
    says some were given one way and some the other, once."""
    test = tracin.Gradients([_rows(1, 2, 3)] * 2, metadata=_records(["a", "b"], ["file", "state"]))
    train = tracin.Gradients([_rows(2, 3, 3)] * 2, metadata=_records(["c", "d"], ["state", "file"]))
    with pytest.warns(UserWarning) as record:
        tracin.scores(test, train)
    said = [str(r.message) for r in record if "cannot check that both sides" in str(r.message)]
    assert len(said) == 1
    assert said[0].startswith(
        "checkpoints [0, 1] were given some as file or folder paths for test and in memory for train, some the "
        "other way (metadata['checkpoint_sources'])"
    ), said[0]


def test_params_recorded_with_tuple_shapes_match_list_shapes():
    """M20: metadata given in memory with shapes as tuples is the same parameters as a store's lists: scored."""
    params = [{"name": "fc.weight", "shape": [2, 3]}, {"name": "fc.bias", "shape": [2]}]
    tupled = [{**p, "shape": tuple(p["shape"])} for p in params]
    a, b = _rows(3, 2, 8), _rows(4, 3, 8)
    got = tracin.scores(
        tracin.Gradients(a, metadata={"framework": "torch", "params": tupled}),
        tracin.Gradients(b, metadata={"framework": "torch", "params": params}),
    )
    np.testing.assert_allclose(got, a.astype(np.float64) @ b.astype(np.float64).T, rtol=1e-5, atol=1e-5)


def test_checkpoint_records_of_other_lengths_are_not_compared():
    """M25: records of 2 real checkpoints against records of 1 (hand-built sets over 2 slots) are not compared
    digest by digest: scored as sets without records are (float64 reference)."""
    a, b = [_rows(5, 2, 3), _rows(6, 2, 3)], [_rows(7, 4, 3), _rows(8, 4, 3)]
    test = tracin.Gradients(a, metadata=_records(["a", "b"], ["file", "file"]))
    train = tracin.Gradients(b, metadata=_records(["z"], ["file"]))
    want = sum(t.astype(np.float64) @ x.astype(np.float64).T for t, x in zip(a, b, strict=True))
    np.testing.assert_allclose(tracin.scores(test, train), want, rtol=1e-5, atol=1e-5)


def _adam_update_space(state_digest: str) -> dict:
    return {
        "mode": "full",
        "preconditioner": {"kind": "adam_update"},
        "framework": "torch",
        "fingerprints": {"optimizer_states": [state_digest]},
        "optimizer_state_sources": ["file"],
    }


def test_a_whitening_fitted_on_adam_update_rows_of_other_optimizer_states_is_refused():
    """M10: a whitened plain test side whose whitening was fitted on preconditioner='adam_update' train rows of
    other optimizer states than the train side's adam_update rows (LESS's pairing): refused, naming both."""
    test_meta = {"mode": "full", "preconditioner": None, "framework": "torch"}
    test = tracin.Gradients(_rows(1, 2, 4), metadata={**test_meta, "whitening": {"space": _adam_update_space("s1")}})
    train = tracin.Gradients(_rows(2, 3, 4), metadata=_adam_update_space("s2"))
    with pytest.raises(tracin.scoring.CheckpointMismatchError, match="different optimizer states") as err:
        tracin.scores(test, train)
    assert err.value.optimizer_states and err.value.checkpoints == [0]
    assert str(err.value).startswith(
        "the gradients the test side's whitening was fitted on and train were exported with different optimizer states"
    ), str(err.value)
    same = tracin.Gradients(_rows(2, 3, 4), metadata=_adam_update_space("s1"))
    a, b = test.matrices[0].astype(np.float64), same.matrices[0].astype(np.float64)
    np.testing.assert_allclose(tracin.scores(test, same), a @ b.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["adam", "sgd_momentum"])
def test_adam_update_train_rows_against_preconditioned_test_rows_of_any_kind_are_refused(kind):
    """M11: adam_update train rows pair only with plain test rows; a test side of any other recorded kind (one of
    the user's own too) is refused, not only 'adam'."""
    test = tracin.Gradients(_rows(1, 2, 4), metadata={"mode": "full", "preconditioner": {"kind": kind}})
    train = tracin.Gradients(_rows(2, 3, 4), metadata={"mode": "full", "preconditioner": {"kind": "adam_update"}})
    with pytest.raises(
        ValueError,
        match=rf"train gradients are preconditioner='adam_update', which pairs with plain test rows, but test "
        rf"gradients are preconditioner='{kind}'",
    ):
        tracin.top_k(test, train, k=2)


def test_a_whitening_fitted_on_other_preconditioned_rows_than_the_train_side_is_refused():
    """M17: a whitened test side (no records of its own) whose whitening was fitted on preconditioner=None rows,
    scored against preconditioner='adam' train rows: FittedKindError naming both kinds, not scored."""
    space = {"mode": "full", "preconditioner": None}
    test = tracin.Gradients(_rows(1, 2, 4), metadata={"whitening": {"space": space}})
    train = tracin.Gradients(_rows(2, 3, 4), metadata={"mode": "full", "preconditioner": {"kind": "adam"}})
    with pytest.raises(tracin.scoring.FittedKindError) as err:
        tracin.scores(test, train)
    assert err.value.kinds == (None, "adam")
    assert str(err.value).startswith(
        "the gradients the test side's whitening was fitted on are preconditioner=None but train gradients are "
        "preconditioner='adam': fit the whitening on the train side's gradients (Whitening.fit(train))"
    ), str(err.value)


def test_sides_of_two_frameworks_with_other_parameter_shapes_are_refused():
    """M21: full rows of tracin.torch and tracin.jax whose parameter shapes (in row order) differ lay out their
    columns differently: refused, naming both frameworks."""
    torch_params = [{"name": "fc.weight", "shape": [2, 3]}, {"name": "fc.bias", "shape": [2]}]
    jax_params = [{"name": "Dense_0/bias", "shape": [2]}, {"name": "Dense_0/kernel", "shape": [3, 2]}]
    test = tracin.Gradients(_rows(1, 2, 8), metadata={"framework": "torch", "mode": "full", "params": torch_params})
    train = tracin.Gradients(_rows(2, 3, 8), metadata={"framework": "jax", "mode": "full", "params": jax_params})
    with pytest.raises(ValueError, match=r"^test \('torch'\) and train \('jax'\) lay out their rows differently"):
        tracin.scores(test, train)


def _store(path, rows: np.ndarray) -> tracin.GradientStore:
    writer = tracin.GradientStore.create(path, rows.shape[0], [rows.shape[1]])
    writer.write(0, 0, rows)
    writer.finalize()
    return tracin.GradientStore.open(path)


def _said(call) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call()
    return [str(r.message) for r in record if issubclass(r.category, UserWarning)]


def test_fitted_elsewhere_told_silences_the_warning_of_a_whitening_fitted_on_another_store(tmp_path):
    """M22: a whitened test side fitted on another store than the train store warns once, except inside
    fitted_elsewhere_told() (the caller said it already)."""
    train = _store(tmp_path / "train", _rows(2, 3, 4))
    test = tracin.Gradients(_rows(1, 2, 4), metadata={"whitening": {"fitted_on": "another-store-id"}})
    said = _said(lambda: tracin.scores(test, train))
    assert len(said) == 1 and "whitening was fitted on another gradient store (id another-store-id)" in said[0]
    with tracin.scoring.fitted_elsewhere_told():
        assert _said(lambda: tracin.scores(test, train)) == []


def test_fitted_elsewhere_told_silences_the_warning_of_whitened_train_rows_of_another_store():
    """M23: a whitened train side holding rows of store Y whitened by a whitening fitted on store X warns once,
    except inside fitted_elsewhere_told()."""
    meta = {"whitening": {"fitted_on": "store-x"}, "whitened_store": "store-y"}
    test, train = _rows(1, 2, 4), tracin.Gradients(_rows(2, 3, 4), metadata=meta)
    said = _said(lambda: tracin.scores(test, train))
    assert len(said) == 1 and said[0].startswith("the train side holds rows of a gradient store (id store-y)")
    with tracin.scoring.fitted_elsewhere_told():
        assert _said(lambda: tracin.scores(test, train)) == []


def test_pair_warnings_told_silences_the_warning_of_checkpoints_given_differently():
    """M24: checkpoints given as files on one side and in memory on the other warn once, except inside
    pair_warnings_told() (tracin.distributed's tasks: the client warned once for all shards)."""
    test = tracin.Gradients(_rows(1, 2, 3), metadata=_records(["a"], ["file"]))
    train = tracin.Gradients(_rows(2, 3, 3), metadata=_records(["b"], ["state"]))
    assert len([s for s in _said(lambda: tracin.top_k(test, train, k=2)) if "cannot check" in s]) == 1
    with tracin.scoring.pair_warnings_told():
        assert _said(lambda: tracin.top_k(test, train, k=2)) == []


def test_weights_that_differ_beyond_float32_rounding_get_no_rounding_hint():
    """M29: 1.0 against 1.0001 differ in float32 (though not in float16): refused without the hint that they
    differ only by float32 rounding; 0.1 against float32(0.1) gets it."""
    a, b = _rows(1, 2, 3), _rows(2, 3, 3)
    assert np.float32(1.0) != np.float32(1.0001) and np.float16(1.0) == np.float16(1.0001)
    with pytest.raises(ValueError, match="different checkpoint weights") as err:
        tracin.scores(tracin.Gradients([a], [1.0]), tracin.Gradients([b], [1.0001]))
    assert "float32 rounding" not in str(err.value)
    with pytest.raises(ValueError, match="differ only by float32 rounding"):
        tracin.scores(tracin.Gradients([a], [0.1]), tracin.Gradients([b], [float(np.float32(0.1))]))
