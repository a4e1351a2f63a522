"""Which task failures tracin.distributed runs again: I/O errors (OSError) up to RETRIES times, never
a deterministic error such as the ValueError / TypeError of a validation, or a missing file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracin.distributed._run import RETRIES, Job


def _counted(log: str, error: type[Exception] | None, failures: int) -> str:
    """Appends a line to `log` per call; raises `error` on the first `failures` calls."""
    with open(log, "a") as f:
        f.write("call\n")
    calls = len(Path(log).read_text().splitlines())
    if error is not None and calls <= failures:
        raise error(f"failure {calls}")
    return f"done after {calls} calls"


@pytest.mark.parametrize("error", [ValueError, TypeError, KeyError])
def test_deterministic_errors_fail_at_once(client, tmp_path, error):
    log = str(tmp_path / "calls")
    job = Job(client, "test")
    task = job.submit(_counted, log, error, 10)
    with pytest.raises(error, match="failure 1"):
        job.wait([task], progress=False)
    assert len(Path(log).read_text().splitlines()) == 1


def test_io_errors_are_retried(client, tmp_path):
    log = str(tmp_path / "calls")
    job = Job(client, "test")
    assert job.wait([job.submit(_counted, log, OSError, RETRIES)], progress=False) == [
        f"done after {RETRIES + 1} calls"
    ]
    log = str(tmp_path / "more")
    job = Job(client, "test")
    with pytest.raises(OSError, match=f"failure {RETRIES + 1}"):
        job.wait([job.submit(_counted, log, ConnectionResetError, RETRIES + 1)], progress=False)
    assert len(Path(log).read_text().splitlines()) == RETRIES + 1


def test_an_io_error_is_tried_three_times_in_all(client, tmp_path):
    """Two reruns of a task that raised an OSError, in numbers of its own: the tests above read RETRIES from
    the module, so RETRIES = 0 (no rerun at all) would pass them (review332)."""
    log = str(tmp_path / "calls")
    job = Job(client, "test")
    assert job.wait([job.submit(_counted, log, OSError, 2)], progress=False) == ["done after 3 calls"]


@pytest.mark.parametrize(
    "error", [FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError]
)  # listed here, not read from NO_RETRY: one dropped from there is still tested (review332)
def test_missing_files_and_refused_permissions_fail_at_once(client, tmp_path, error):
    """Another try would meet the same missing file (say a store that this worker does not see)."""
    log = str(tmp_path / "calls")
    job = Job(client, "test")
    with pytest.raises(error, match="failure 1"):
        job.wait([job.submit(_counted, log, error, RETRIES)], progress=False)
    assert len(Path(log).read_text().splitlines()) == 1
