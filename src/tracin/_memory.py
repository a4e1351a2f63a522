"""The memory this process may use as the OS reports it: the one probe the CLI and the whitening share.

physical_memory is the machine's; process_memory the least of that, the memory limit of the process's
cgroup (v2 memory.max, v1 memory.limit_in_bytes, of its cgroup or an ancestor: a container's limit) and
its address-space limit (RLIMIT_AS, `ulimit -v`), each where it is set.
"""

from __future__ import annotations

import os

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

CGROUP_ROOT = "/sys/fs/cgroup"  # where the cgroup file systems are mounted
PROC_CGROUP = "/proc/self/cgroup"  # this process's cgroups: "hierarchy:controllers:path" per line
_CGROUP_FILES = {"v2": "memory.max", "v1": os.path.join("memory", "memory.limit_in_bytes")}
_UNLIMITED = 2**62  # cgroup v1 writes "no limit" as about 2^63 (rounded down to pages)


def physical_memory() -> int | None:
    """Bytes of physical memory (os.sysconf's SC_PHYS_PAGES x SC_PAGE_SIZE), or None where the OS does not
    report them: no os.sysconf (Windows), a name it does not know (ValueError), or an undetermined value (-1)."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def process_memory() -> int | None:
    """Bytes this process may use: the least of physical_memory, cgroup_memory_limit and address_space_limit
    among those that are reported and set; None where none is."""
    return min(
        (m for m in (physical_memory(), cgroup_memory_limit(), address_space_limit()) if m is not None), default=None
    )


def cgroup_memory_limit() -> int | None:
    """The least memory limit of this process's cgroups and their ancestors (cgroup v2 memory.max, v1
    memory.limit_in_bytes, under CGROUP_ROOT; the cgroups named by PROC_CGROUP), or None where no limit is set
    ("max", v1's about 2^63) or none can be read (no cgroups, another OS)."""
    try:
        with open(PROC_CGROUP, "rb") as f:  # bytes: a cgroup's name need not be valid in the locale's encoding
            lines = os.fsdecode(f.read()).splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and controllers == "":
            base, name = CGROUP_ROOT, _CGROUP_FILES["v2"]
        elif "memory" in controllers.split(","):
            base, name = CGROUP_ROOT, _CGROUP_FILES["v1"]
        else:
            continue
        folder, file = os.path.split(name)
        parts = [p for p in path.split("/") if p and p != ".."]
        for depth in range(len(parts), -1, -1):  # the cgroup, then each ancestor up to the root
            limit = _limit_in(os.path.join(base, folder, *parts[:depth], file))
            if limit is not None:
                limits.append(limit)
    return min(limits, default=None)


def _limit_in(path: str) -> int | None:
    """The byte count a cgroup limit file holds, or None where it is missing, unreadable, "max", about 2^63 or
    anything but ASCII digits."""
    try:
        with open(path, "rb") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and 0 < int(text) < _UNLIMITED else None  # bytes: ASCII digits only


def address_space_limit() -> int | None:
    """This process's soft RLIMIT_AS in bytes, or None where it is unlimited or not reported (no `resource`)."""
    if resource is None:
        return None
    try:
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (AttributeError, OSError, ValueError):
        return None
    return soft if soft != resource.RLIM_INFINITY and soft > 0 else None
