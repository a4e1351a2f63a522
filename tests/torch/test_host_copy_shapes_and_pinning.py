"""HostCopier: a destination of the source's size but another shape is refused (not filled in memory order),
and on a GPU the staging buffer is page-locked and read only once the device copy into it is done."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tracin.torch.host_copy import HostCopier

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(("dest_shape", "source_shape"), [((4, 3), (3, 4)), ((12,), (3, 4)), ((3, 4, 1), (3, 4))])
def test_a_destination_with_as_many_elements_but_another_shape_is_refused(dest_shape, source_shape):
    dest = torch.full(dest_shape, -1.0)
    with pytest.raises(ValueError, match=r"dest has shape .*, source \(3, 4\)"):
        HostCopier(pinned=False).into(dest, torch.ones(source_shape))
    np.testing.assert_array_equal(dest.numpy(), np.full(dest_shape, -1.0, np.float32))  # left untouched


@cuda
def test_the_staging_buffer_is_pinned_on_a_gpu():
    copier = HostCopier(piece_bytes=1024)
    source = torch.arange(1000, dtype=torch.float32, device="cuda")
    np.testing.assert_array_equal(copier.copy(source).numpy(), np.arange(1000, dtype=np.float32))
    assert copier._staging.is_pinned()


@cuda
def test_each_piece_is_read_only_after_its_asynchronous_device_copy_is_done():
    """The copy into pinned memory is non-blocking: read before the stream reaches it, a piece would be the
    staging buffer's previous contents. A long kernel queued ahead of the copy makes that visible."""
    copier = HostCopier(piece_bytes=4 * 2**20)
    copier.copy(torch.zeros(2**20, device="cuda"))  # the buffer now holds zeros
    big = torch.randn(8192, 8192, device="cuda")
    for _ in range(4):
        slow = big @ big  # queued, still running when into() issues its copies
    source = torch.ones(2**20, device="cuda") + 0 * slow[:128].reshape(-1)[: 2**20].sum()
    got = copier.copy(source)
    np.testing.assert_array_equal(got.numpy(), np.ones(2**20, np.float32))
