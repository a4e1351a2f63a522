"""The projection probe and checks shared by the adapters."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest

import tracin
from tracin._export.projection import check_projection, project, projected_dims, refuse_empty_parameters
from tracin.projection import NonFiniteRowError


def test_dims_are_probed_from_the_projection():
    p = tracin.Projection(4, seed=1)
    assert projected_dims(None, 10, [6, 4]) == 10 and projected_dims(None, (3, 5), None) == (3, 5)
    assert projected_dims(p, 10, [6, 4]) == project(p, np.ones((2, 10), np.float32), [6, 4]).shape[1]
    left, right = project(p, (np.ones((2, 3), np.float32), np.ones((2, 5), np.float32)), None)
    assert projected_dims(p, (3, 5), None) == (left.shape[1], right.shape[1])


@pytest.mark.filterwarnings("ignore:projection .* not fewer than the gradient's:RuntimeWarning")
@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sparse"])
@pytest.mark.parametrize("layout", ["flat", "per_layer", "kronecker"])
@pytest.mark.parametrize("dim", [1, 7, 64, 2048])
def test_widths_read_from_a_projection_equal_the_probe(kind, layout, dim):
    p = tracin.Projection(dim, 3, kind, per_layer=layout != "flat", kronecker=layout == "kronecker")
    segments = [5, 1, 30][: min(dim, 3)]
    d = sum(segments)
    assert projected_dims(p, d, segments) == project(p, np.zeros((1, d), np.float32), segments).shape[1]
    assert projected_dims(p, d, None) == project(p, np.zeros((1, d), np.float32), None).shape[1]
    if layout != "flat":  # per_layer=True projects full rows (review136 F3: apply_factored ignored it)
        with pytest.raises(ValueError, match="not factored rows" if layout == "kronecker" else "projects full rows"):
            projected_dims(p, (6, 40), None)
    else:
        left, right = project(p, (np.zeros((1, 6), np.float32), np.zeros((1, 40), np.float32)), None)
        assert projected_dims(p, (6, 40), None) == (left.shape[1], right.shape[1]) == p.factored_dims


def test_a_projection_is_not_probed_with_whole_rows(monkeypatch):
    widths = []
    apply, apply_factored = tracin.Projection.apply, tracin.Projection.apply_factored

    def counting_apply(self, matrix, **kwargs):
        widths.append(matrix.shape[1])
        return apply(self, matrix, **kwargs)

    def counting_factored(self, left, right, **kwargs):
        widths.extend([left.shape[1], right.shape[1]])
        return apply_factored(self, left, right, **kwargs)

    monkeypatch.setattr(tracin.Projection, "apply", counting_apply)  # Projection's own apply: the dim is read
    monkeypatch.setattr(tracin.Projection, "apply_factored", counting_factored)
    p = tracin.Projection(16, per_layer=True)
    assert projected_dims(p, 3_000_000, [1_000_000, 2_000_000]) == 16
    p = tracin.Projection(16)  # factored rows take a whole-row projection
    assert projected_dims(p, (50_000, 60_000), None) == p.factored_dims
    assert max(widths, default=0) <= 1  # no projection of d columns for a width read off the projection
    with pytest.raises(ValueError, match="3 segments need dim >= 3, got dim=2"):
        projected_dims(tracin.Projection(2, per_layer=True), 6, [1, 2, 3])


@pytest.mark.parametrize(
    "d,segments,message",
    [
        (4, [4, 0], r"parameter 1 \(0-based, in the exported parameters' order\) has no elements.*with layers="),
        (4, [0, 4, 0], r"parameters 0, 2 \(0-based, in the exported parameters' order\) have no elements"),
        (0, None, "segments entry must be >= 1, got 0"),
        (7, [3, 3], "segments must sum to the number of columns 7, got sum 6"),
        (3, [], "segments must hold at least one width"),
    ],
)
def test_a_per_layer_layout_apply_refuses_is_refused_without_projecting(d, segments, message, monkeypatch):
    monkeypatch.setattr(tracin.Projection, "apply", lambda *a, **k: pytest.fail("probed"))
    with pytest.raises(ValueError, match=message):
        projected_dims(tracin.Projection(8, per_layer=True), d, segments)


class _Half(tracin.Projection):
    """Keeps the first half of the columns its parent gives."""

    def apply(self, matrix, **kwargs):
        return super().apply(matrix, **kwargs)[:, : self.dim // 2]

    def apply_factored(self, left, right, **kwargs):
        left, right = super().apply_factored(left, right, **kwargs)
        return left[:, :1], right


def test_a_subclass_overriding_apply_is_probed():
    assert projected_dims(_Half(8), 10, None) == 4
    assert projected_dims(_Half(8, per_layer=True), 10, [6, 4]) == 4
    assert projected_dims(_Half(8), (3, 5), None) == (1, _Half(8).factored_dims[1])


def test_objects_without_apply_are_refused():
    with pytest.raises(TypeError, match=r"tracin.Projection \(with .apply and .to_dict\)"):
        check_projection(object(), factored=False)
    with pytest.raises(TypeError, match=r"\.apply_factored"):
        check_projection(object(), factored=True)
    check_projection(None, factored=True)


@pytest.mark.parametrize("layout", ["flat", "per_layer", "kronecker"])
def test_an_export_keeps_a_finite_projection_whose_kernel_sums_pass_float32(layout):
    """review67 F1: a row aligned with output 0, projecting to 2e38 there (finite), was refused as an
    overflow: the kernel's unscaled sums (sqrt(64) or sqrt(8) times larger) passed FLT_MAX."""
    from tracin.projection import LayerMatrix

    p = tracin.Projection(64, seed=4, per_layer=layout != "flat", kronecker=layout == "kronecker")
    segments = [LayerMatrix(16, 16)] if layout == "kronecker" else [256] if layout == "per_layer" else None
    columns = p.apply(np.eye(256, dtype=np.float32), segments=segments).astype(np.float64)  # (256, 64) = P^T
    signs = np.where(columns[:, 0] < 0, -1.0, 1.0)
    block = np.random.default_rng(5).normal(size=(3, 256)).astype(np.float32)
    block[1, 0] = np.nan
    block[2] = signs * (2e38 / np.abs(signs @ columns).max())
    out = project(p, block, segments)
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()
    want = block[[0, 2]].astype(np.float64) @ columns
    assert (np.abs(out[[0, 2]] - want) <= 1e-5 * np.abs(want).max(axis=1, keepdims=True)).all()
    assert np.abs(out[2]).max() > 1.9e38
    block[2] *= np.float32(2)  # 4e38: the projection itself is beyond float32
    with pytest.raises(NonFiniteRowError, match="the projection of row 2 is not finite") as caught:
        project(p, block, segments)
    assert caught.value.row == 2


def test_another_projection_is_told_how_to_read_a_bfloat16_store_right(tmp_path, rng):
    # review136 F1: "project the stored rows yourself" led to .astype(np.float32) on bfloat16 bits (integers)
    with pytest.raises(TypeError, match=r"project the stored rows yourself: .*view\(ml_dtypes\.bfloat16\)") as e:
        check_projection(object(), factored=False)
    assert "astype" not in str(e.value)
    rows = rng.standard_normal((5, 12)).astype(np.float32)
    writer = tracin.GradientStore.create(tmp_path / "s", n_rows=5, dims=[12], dtype="bfloat16")
    writer.write(0, 0, rows)
    writer.finalize()
    stored = np.load(tmp_path / "s" / "checkpoint_000.npy", mmap_mode="r")
    assert stored.dtype == np.uint16
    proj = tracin.Projection(4, seed=2)
    exact = rows.astype(ml_dtypes.bfloat16).astype(np.float64) @ _dense(proj, 12).T  # float64 of the stored values
    np.testing.assert_allclose(proj.apply(stored.view(ml_dtypes.bfloat16)), exact, rtol=1e-5, atol=1e-6)


def _dense(projection: tracin.Projection, d: int) -> np.ndarray:
    """P (dim, d) in float64, from the projections of the unit vectors."""
    return projection.apply(np.eye(d, dtype=np.float32)).T.astype(np.float64)


def test_factored_exports_refuse_a_per_layer_projection_before_any_work():
    # review136 F3: per_layer=True was ignored in factored rows, yet recorded (scoring then refused equal rows)
    expected = (
        r"per_layer=True\) projects full rows .* pass Projection\(16, seed=1, kind='gaussian'\) \(per_layer=False\)"
    )
    with pytest.raises(ValueError, match=expected):
        check_projection(tracin.Projection(16, 1, "gaussian", per_layer=True), factored=True)
    check_projection(tracin.Projection(16, 1, "gaussian", per_layer=True), factored=False)
    check_projection(tracin.Projection(16, 1, "gaussian"), factored=True)


def test_a_torch_factored_export_refuses_a_per_layer_projection():
    torch = pytest.importorskip("torch")
    from tracin.torch import export_gradients

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    checkpoints = [({k: v.clone() for k, v in model.state_dict().items()}, 1.0)]
    data = [(torch.randn(4, 5), torch.randint(0, 3, (4,)))]
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    for mode in ("factored", "last_layer"):
        with pytest.raises(ValueError, match=r"per_layer=True\) projects full rows .*mode='full' for per-layer maps"):
            export_gradients(
                model,
                checkpoints,
                data,
                loss,
                mode=mode,
                projection=tracin.Projection(16, per_layer=True),
                progress=False,
            )


@pytest.mark.parametrize("per_layer", [False, True])
def test_a_projection_no_narrower_than_the_rows_warns(per_layer):
    """review143 F4: Projection(200_000) of a 45-wide gradient silently stored 4,400 times the bytes."""
    for dim, d in ((45, 45), (200_000, 45)):
        with pytest.warns(RuntimeWarning, match=rf"rows of dim {dim}, not fewer than the gradient's row width {d}"):
            assert projected_dims(tracin.Projection(dim, 0, per_layer=per_layer), d, [40, 5]) == dim
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert projected_dims(tracin.Projection(44, 0, per_layer=per_layer), 45, [40, 5]) == 44
        projected_dims(tracin.Projection(4, 0), (3, 5), None)  # factored rows: not compared


def test_a_torch_export_with_a_projection_wider_than_the_gradient_warns_at_the_call():
    torch = pytest.importorskip("torch")
    from tracin.torch import export_gradients

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))  # d = 57
    checkpoints = [({k: v.clone() for k, v in model.state_dict().items()}, 1.0)]
    data = [(torch.randn(4, 5), torch.randint(0, 3, (4,)))]
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    expected = r"dim 64, not fewer than the gradient's row width 57: .*drop projection= to store the exact rows"
    for projection in (tracin.Projection(64, seed=1), tracin.Projection(64, seed=1, per_layer=True, kronecker=True)):
        with pytest.warns(RuntimeWarning, match=expected) as caught:
            g = export_gradients(model, checkpoints, data, loss, projection=projection, progress=False)
        assert np.asarray(g.matrices[0]).shape == (4, 64)
        assert [w.filename for w in caught if w.category is RuntimeWarning] == [__file__]


def test_factored_rows_projected_no_narrower_warn_per_factor():
    """review153 F2: Projection(4096) stored a last layer's (3, 9) factors as (64, 64) without a warning."""
    with pytest.warns(RuntimeWarning) as caught:
        assert projected_dims(tracin.Projection(4096), (3, 9), None) == (64, 64)
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert len(messages) == 2
    assert "left factors of dim 64, not fewer than the gradient's left factor width 3" in messages[0]
    assert "right factors of dim 64, not fewer than the gradient's right factor width 9" in messages[1]
    with pytest.warns(
        RuntimeWarning, match="right factors of dim 4, not fewer than the gradient's right factor width 4"
    ):
        assert projected_dims(tracin.Projection(16), (100, 4), None) == (4, 4)  # only the right factor widens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert projected_dims(tracin.Projection(16), (5, 5), None) == (4, 4)
        project(tracin.Projection(4096), (np.ones((2, 3), np.float32), np.ones((2, 9), np.float32)), None)
        project(tracin.Projection(64), np.ones((2, 10), np.float32), None)  # the export warned up front


def test_a_torch_last_layer_export_with_a_wide_projection_warns_per_factor_at_the_call():
    torch = pytest.importorskip("torch")
    from tracin.torch import export_gradients

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))  # factors (3, 9)
    checkpoints = [({k: v.clone() for k, v in model.state_dict().items()}, 1.0)]
    data = [(torch.randn(5, 6), torch.randint(0, 3, (5,)))]
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    with pytest.warns(RuntimeWarning, match="factors of dim 64, not fewer than the gradient's") as caught:
        g = export_gradients(model, checkpoints, data, loss, mode="last_layer", projection=tracin.Projection(4096))
    widened = [w for w in caught if w.category is RuntimeWarning and "factor width" in str(w.message)]
    assert [w.filename for w in widened] == [__file__] * 2
    assert "left factor width 3" in str(widened[0].message) and "right factor width 9" in str(widened[1].message)
    assert (np.asarray(g.left[0]).shape, np.asarray(g.right[0]).shape) == ((5, 64), (5, 64))


def test_empty_parameters_are_refused_by_name_for_per_layer_projections():
    """review153 F6: for the adapters, which know the names projected_dims does not."""
    params = [("fc.weight", (3, 4)), ("prompt", (0,)), ("fc.bias", (3,)), ("pad", (2, 0))]
    for projection in (tracin.Projection(8, per_layer=True), tracin.Projection(8, per_layer=True, kronecker=True)):
        with pytest.raises(ValueError, match=r"parameters 'prompt', 'pad' have no elements.*out with layers="):
            refuse_empty_parameters(projection, params)
        refuse_empty_parameters(projection, [p for p in params if p[0].startswith("fc")])
    refuse_empty_parameters(tracin.Projection(8), params)  # flat rows: an empty parameter adds no column
    refuse_empty_parameters(None, params)
