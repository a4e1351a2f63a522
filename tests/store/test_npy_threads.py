""".npy headers parsed from many threads at once (threaded Dask workers opening stores): a good
header never reads as corrupt, and an interpreter error is not blamed on the file."""

import gc
import io
import os
import signal
import struct
import sys
import threading

import numpy as np
import pytest

import tracin
from tracin.store import StoreFormatError, _npy


def _header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, np.float32))
    return buf.getvalue()[:128]


class _Cycle:
    """Garbage the collector frees mid-parse; its finalizer runs bytecode, so another thread may run
    inside ast.literal_eval (what makes CPython 3.11's ast raise SystemError without a lock)."""

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        sum(range(50))


def test_good_headers_parse_in_many_threads_at_once():
    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    heads = {(i + 1, 7): _header((i + 1, 7)) for i in range(8)}
    failures: list[BaseException] = []

    def parse_many(shape: tuple[int, int]) -> None:
        for _ in range(1500):
            _Cycle()
            try:
                assert _npy.parse_header(heads[shape], "x")[:2] == (np.dtype("<f4"), shape)
            except BaseException as e:  # noqa: BLE001
                failures.append(e)

    sys.setswitchinterval(1e-6)
    gc.set_threshold(50, 1, 1)
    try:
        threads = [threading.Thread(target=parse_many, args=(shape,)) for shape in heads]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
        gc.set_threshold(*thresholds)
    assert failures == []


def _failing(error: BaseException, times: int):
    calls = []

    def read(f, max_header_size):
        calls.append(1)
        if len(calls) <= times:
            raise error
        return (2, 3), False, np.dtype("<f4")

    return read, calls


def test_a_system_error_is_retried_once_and_not_reported_as_a_corrupt_file(monkeypatch):
    head = _header((2, 3))
    read, calls = _failing(SystemError("AST constructor recursion depth mismatch"), times=1)
    monkeypatch.setitem(_npy._HEADER_READERS, (1, 0), read)
    assert _npy.parse_header(head, "x")[:2] == (np.dtype("<f4"), (2, 3))
    assert len(calls) == 2

    read, calls = _failing(SystemError("AST constructor recursion depth mismatch"), times=2)
    monkeypatch.setitem(_npy._HEADER_READERS, (1, 0), read)
    with pytest.raises(SystemError, match="recursion depth mismatch") as failure:
        _npy.parse_header(head, "x")
    assert not isinstance(failure.value, StoreFormatError) and len(calls) == 2


def test_a_memory_error_from_a_hostile_header_is_a_store_format_error(tmp_path):
    w = tracin.GradientStore.create(tmp_path / "s", 10, [4])
    w.write(0, 0, np.ones((10, 4), np.float32))
    w.finalize()
    body = ("-" * 9000 + "1").encode()  # 9000 unary minus signs: ast runs out of memory on 10 kB
    body += b" " * ((64 - (10 + len(body) + 1) % 64) % 64) + b"\n"
    data = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body + b"\0" * 160
    (tmp_path / "s" / "checkpoint_000.npy").write_bytes(data)
    with pytest.raises(StoreFormatError, match="checkpoint_000.npy: corrupt .npy header"):
        tracin.GradientStore.open(tmp_path / "s")
    with pytest.raises(StoreFormatError, match="x: corrupt .npy header .MemoryError"):
        _npy.parse_header(data, "x")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this OS")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Python 3.12+ warns about fork() with threads
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # JAX, if imported, warns too; the child only parses
def test_a_child_forked_while_another_thread_holds_the_parse_lock_still_parses():
    head = _header((2, 3))
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _npy._PARSING:
            held.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: killed by SIGALRM if it waits for the lock the holder thread had
            signal.alarm(10)
            try:
                os._exit(0 if _npy.parse_header(head, "x")[:2] == (np.dtype("<f4"), (2, 3)) else 1)
            except BaseException:  # noqa: BLE001
                os._exit(2)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        holder.join()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status:#x}"


def test_a_malformed_header_is_still_a_store_format_error():
    head = _header((2, 3)).replace(b"'shape'", b"'shapf'")
    with pytest.raises(StoreFormatError, match="x: corrupt .npy header"):
        _npy.parse_header(head, "x")
