"""Where a warning should point: the user's line that called into tracin."""

from __future__ import annotations

import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """The stacklevel for warnings.warn, called in the function that calls this, that names the first
    frame outside the tracin package (the user's call, however deep the adapters nest)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level
