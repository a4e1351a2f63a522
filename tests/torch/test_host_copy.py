"""HostCopier: piecewise copies through a staging buffer (unpinned here: the pinned one needs CUDA,
.ci/gpu-check's tests/torch/test_cuda.py exports through it on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tracin.torch.host_copy import HostCopier


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 5), (9, 3, 4), (1, 11), (0, 6), (13,)])
def test_copy_equals_the_source_whatever_the_pieces(dtype, shape):
    source = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape).to(dtype)
    row_bytes = int(np.prod(shape[1:])) * source.element_size()
    copier = HostCopier(pinned=False, piece_bytes=2 * row_bytes + 1)  # 2 rows per piece, a ragged last one
    out = copier.copy(source)
    assert out.dtype == dtype and out.shape == source.shape
    np.testing.assert_array_equal(out.float().numpy(), source.float().numpy())


def test_into_a_numpy_array_writes_it_in_place():
    rng = np.random.default_rng(0)
    want = rng.standard_normal((10, 6)).astype(np.float32)
    dest = np.full((10, 6), np.nan, np.float32)
    HostCopier(pinned=False, piece_bytes=3 * 6 * 4).into(torch.from_numpy(dest), torch.from_numpy(want))
    np.testing.assert_array_equal(dest, want)


def test_a_row_larger_than_a_piece_goes_in_pieces_and_the_buffer_stays_bounded():
    copier = HostCopier(pinned=False, piece_bytes=12)  # 3 float32: rows of 10 in pieces of 3
    source = torch.arange(40, dtype=torch.float32).reshape(4, 10)
    np.testing.assert_array_equal(copier.copy(source).numpy(), source.numpy())
    assert copier._staging.numel() == 12


def test_strided_sources_and_destinations():
    source = torch.arange(60, dtype=torch.float32).reshape(6, 10)[:, ::3]  # (6, 4), strided
    dest = torch.full((4, 6), -1.0).T  # (6, 4), not contiguous
    HostCopier(pinned=False, piece_bytes=20).into(dest, source)
    np.testing.assert_array_equal(dest.numpy(), source.numpy())


def test_the_buffer_is_reused_across_copies():
    copier = HostCopier(pinned=False, piece_bytes=64)
    first = copier.copy(torch.ones(4, 4))
    staging = copier._staging
    second = copier.copy(torch.full((3, 4), 2.0))
    assert copier._staging is staging
    np.testing.assert_array_equal(first.numpy(), np.ones((4, 4), np.float32))  # not overwritten: a copy of its own
    np.testing.assert_array_equal(second.numpy(), np.full((3, 4), 2.0, np.float32))


def test_an_element_wider_than_the_buffer_made_before_grows_it():
    """A piece is one element where the element is wider than piece_bytes: after a copy of narrower values made
    the buffer, a wider dtype's element needs a larger one."""
    copier = HostCopier(pinned=False, piece_bytes=4)
    np.testing.assert_array_equal(copier.copy(torch.arange(5, dtype=torch.float32)).numpy(), np.arange(5))
    wide = torch.arange(6, dtype=torch.float64) / 3 + 1j
    np.testing.assert_array_equal(copier.copy(wide).numpy(), wide.numpy())
    assert copier._staging.numel() == 16  # one complex128


def test_a_mismatched_destination_is_refused():
    with pytest.raises(ValueError, match=r"dest has shape \(3, 4\), source \(4, 4\)"):
        HostCopier(pinned=False).into(torch.empty(3, 4), torch.ones(4, 4))


def test_the_staging_buffer_holds_piece_bytes_whatever_the_dtype():
    """Pieces are piece_bytes of the source's own elements: float64 pieces of 2 in a 16-byte buffer, not 4 (32
    bytes of pinned memory past the bound)."""
    copier = HostCopier(pinned=False, piece_bytes=16)
    source = torch.arange(10, dtype=torch.float64) / 3
    np.testing.assert_array_equal(copier.copy(source).numpy(), source.numpy())
    assert copier._staging.numel() == 16


def test_a_small_first_block_makes_the_whole_buffer_at_once():
    """The buffer is made piece_bytes long on first use, so that a small first block (a short last batch, one
    row) does not make a small pinned buffer that the next larger block must replace."""
    copier = HostCopier(pinned=False, piece_bytes=64)
    copier.copy(torch.ones(2))
    staging = copier._staging
    assert staging.numel() == 64
    np.testing.assert_array_equal(copier.copy(torch.full((16,), 3.0)).numpy(), np.full(16, 3.0, np.float32))
    assert copier._staging is staging
