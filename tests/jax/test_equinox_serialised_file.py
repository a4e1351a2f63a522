"""A file written by Equinox's eqx.tree_serialise_leaves (the leaves saved one after another as .npy
records) passed as a checkpoint path is refused naming that format and eqx.tree_deserialise_leaves, the
way to load it, not as "a NumPy .npy array (np.save)" to be read with np.load (which returns its first
leaf alone)."""

import io

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")  # a file checkpoint path is read with flax.serialization

import tracin.jax  # noqa: E402


def _loss(params, x, y):
    return ((x @ params["w"]) - y) ** 2


def _data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((4, 3), dtype=np.float32), rng.standard_normal(4, dtype=np.float32)


def _refusal(path) -> str:
    with pytest.raises(ValueError) as caught:
        tracin.jax.export_gradients(lambda p, x, y: _loss(p, x, y)[:, 0], [(str(path), 0.1)], _data(), progress=False)
    return str(caught.value)


def test_npy_records_one_after_another(tmp_path):
    """What eqx.tree_serialise_leaves writes, made with NumPy alone: one np.save per leaf into one file."""
    path = tmp_path / "model.bin"
    buffer = io.BytesIO()
    np.save(buffer, np.ones((3, 1), np.float32))
    np.save(buffer, np.zeros(1, np.float32))
    np.save(buffer, np.asarray(0.5))
    path.write_bytes(buffer.getvalue())
    text = _refusal(path)
    assert "checkpoints[0]" in text and str(path) in text, text
    assert "eqx.tree_deserialise_leaves" in text, text
    assert "np.save)" not in text, text


def test_equinox_module_file(tmp_path):
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(3, 1, 4, 1, key=jax.random.PRNGKey(0))
    path = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(path, model)
    text = _refusal(path)
    assert "eqx.tree_deserialise_leaves" in text, text


def test_eqx_suffix_single_leaf(tmp_path):
    """One array leaf gives one .npy record, told from np.save's by the .eqx suffix alone."""
    path = tmp_path / "w.eqx"
    with open(path, "wb") as f:
        np.save(f, np.ones((3, 1), np.float32))
    assert "eqx.tree_deserialise_leaves" in _refusal(path)


def test_plain_npy_still_told_as_npy(tmp_path):
    path = tmp_path / "w.npy"
    np.save(path, np.ones((3, 1), np.float32))
    text = _refusal(path)
    assert "a NumPy .npy array (np.save)" in text and "np.load" in text, text
    assert "tree_deserialise_leaves" not in text, text


def test_a_plain_npy_followed_by_stray_magic_bytes_is_not_called_equinox(tmp_path):
    """fr353: the bytes b'\\x93NUMPY' after one .npy record, no header after them, are not a second record."""
    path = tmp_path / "weights.npy"
    buffer = io.BytesIO()
    np.save(buffer, np.ones((3, 1), np.float32))
    path.write_bytes(buffer.getvalue() + b"\x93NUMPY")
    text = _refusal(path)
    assert "NumPy .npy array" in text and "Equinox" not in text, text
