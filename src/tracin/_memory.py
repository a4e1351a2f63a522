"""This machine's physical memory as the OS reports it: the one probe the CLI and the whitening share."""

from __future__ import annotations

import os


def physical_memory() -> int | None:
    """Bytes of physical memory (os.sysconf's SC_PHYS_PAGES x SC_PAGE_SIZE), or None where the OS does not
    report them: no os.sysconf (Windows), a name it does not know (ValueError), or an undetermined value (-1)."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None
