"""The projection probe and checks shared by the adapters."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from tracin._export.projection import check_projection, project, projected_dims


def test_dims_are_probed_from_the_projection():
    p = tracin.Projection(4, seed=1)
    assert projected_dims(None, 10, [6, 4]) == 10 and projected_dims(None, (3, 5), None) == (3, 5)
    assert projected_dims(p, 10, [6, 4]) == project(p, np.ones((2, 10), np.float32), [6, 4]).shape[1]
    left, right = project(p, (np.ones((2, 3), np.float32), np.ones((2, 5), np.float32)), None)
    assert projected_dims(p, (3, 5), None) == (left.shape[1], right.shape[1])


def test_objects_without_apply_are_refused():
    with pytest.raises(TypeError, match=r"tracin.Projection \(with .apply and .to_dict\)"):
        check_projection(object(), factored=False)
    with pytest.raises(TypeError, match=r"\.apply_factored"):
        check_projection(object(), factored=True)
    check_projection(None, factored=True)
