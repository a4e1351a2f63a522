"""The CPUs this process may run on, as the C++ kernel counts them for its default thread count."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """CPUs in this process's affinity mask (taskset, cpusets, SLURM bindings) where the OS tells it,
    else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
