"""Shards of a gradient store: row ranges named by path, opened where the work runs."""

from __future__ import annotations

import errno
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .. import _tunables
from ..gradients import GradientSet
from ..store import GradientStore, StoreChangedError
from ..store._format import MANIFEST
from ._cluster import worker_name

MAX_SHARD_BYTES = _tunables.STORE_CHUNK_BYTES  # no default shard larger (a store's default chunk: one kernel call)
MIN_SHARD_BYTES = 16 * 2**20  # none smaller but the last: a task costs ~15 ms (benchmarks/results/distributed.json)
UNSEEN_RECHECKS_S = (0.25, 0.5, 1.0, 1.5, 1.75)  # waits before looking again for a store not seen (5 s)
GUIDE = 2  # each default shard takes 1 / (GUIDE * task slots) of the rows not yet given out


@dataclass(frozen=True)
class StoreRows:
    """Rows [start, stop) of the store at `path`: what a task needs to open its shard itself.

    Only this travels to the workers; every worker must see the same store at `path` (a shared
    file system, or an identical copy whose files keep their modification times).
    """

    path: str
    start: int
    stop: int
    allow_partial: bool
    chunk_bytes: int
    store_id: str | None  # the random id the store's manifest was created with
    # (name, size, modification time in ns) of each data file as the client opened it; () for a store
    # unfinished then (a writer may still be writing its files). Not the device and inode: those differ
    # between NFS clients and between per-machine copies.
    files: tuple[tuple[str, int, int], ...] = ()

    @classmethod
    def of(cls, store: GradientStore) -> StoreRows:
        """The rows a store view covers (a whole store, a shard or a slice), named by the store's
        absolute path (GradientStore keeps one: workers run in other directories), with its data
        files as the client recorded them when it opened the store."""
        start = store.shard_offset()
        files = tuple((f.name, f.size, f.identity[2]) for f in store._files if f.identity[2] is not None)
        return cls(
            str(store.path), start, start + store.n_rows, store.allow_partial, store.chunk_bytes, store.store_id, files
        )

    def rows(self, a: int, b: int) -> StoreRows:
        """Rows [a, b) of this range (relative to its start)."""
        return replace(self, start=self.start + a, stop=self.start + b)

    def open(self) -> GradientStore:
        """Opens the store by path, checking that this worker sees it (a ValueError naming the worker
        otherwise), its files (StoreFormatError naming the file when one is missing or corrupt) and
        that it is the store opened on the client, with the same data files (StoreChangedError
        otherwise), and returns the view of these rows. The store checks its files against this
        opening before each chunk it reads, so a file rewritten later in the task is refused too."""
        refuse_unseen(self.path)
        store = GradientStore.open(self.path, allow_partial=self.allow_partial, chunk_bytes=self.chunk_bytes)
        if store.store_id != self.store_id:
            raise StoreChangedError(
                f"gradient store {self.path} here is not the one opened on the client (store id "
                f"{self.store_id} there, {store.store_id} here): it was re-created "
                "since, or this machine's copy differs; open it again"
            )
        self._refuse_changed_files(store)
        if store.n_rows < self.stop:
            raise ValueError(
                f"gradient store {self.path} has {store.n_rows} usable rows here, but rows "
                f"[{self.start}, {self.stop}) were asked for: do all workers see the same store?"
            )
        return store[self.start : self.stop]

    def _refuse_changed_files(self, store: GradientStore) -> None:
        """StoreChangedError naming the first data file whose size or modification time here is not
        the one the client recorded: rewritten in place since the client opened the store (a same-size
        rewrite keeps the store id), or this machine's copy differs."""
        here = {f.name: f for f in store._files}
        for name, size, mtime in self.files:
            found = here.get(name)
            differs = []
            if found is None:  # (the same store id names the same files: not expected)
                differs.append("not among its data files here")
            else:
                if found.size != size:
                    differs.append(f"{size} bytes on the client, {found.size} here")
                now = found.identity[2]
                if now is not None and not same_mtime(mtime, now):
                    differs.append(f"modified at {_when(mtime)} on the client, at {_when(now)} here")
            if differs:
                raise StoreChangedError(
                    f"{os.path.join(self.path, name)} on worker {worker_name()} is not the file the client opened "
                    f"({'; '.join(differs)}): it was rewritten since the gradient store was opened, or this "
                    "machine's copy differs (a copy must keep the files' modification times: cp -p, rsync -a); "
                    "open it again"
                )

    def __str__(self) -> str:
        return f"rows [{self.start}, {self.stop}) of {self.path}"


def same_mtime(a: int, b: int) -> bool:
    """Whether modification times a and b (ns) agree at the coarser of their apparent resolutions (the
    largest power of ten, up to 1 s, dividing each): a copy on a file system, or by a tool, that keeps
    whole seconds or microseconds only (say rsync before 3.1) truncates the time to that resolution; or
    less than 1 us apart: a copy whose time went through a float of seconds (os.utime(dst, (atime,
    mtime)) with st_mtime, Python's tarfile) is a few hundred ns off, which no rewrite lands within."""
    step = max(_resolution(a), _resolution(b))
    return abs(a - b) < 1000 or a // step == b // step


def _resolution(ns: int) -> int:
    step = 1
    while step < 10**9 and ns % (10 * step) == 0:
        step *= 10
    return step


def _when(ns: int) -> str:
    """A modification time in ns as UTC, to the ns."""
    seconds, fraction = divmod(ns, 10**9)
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(seconds))}.{fraction:09d} UTC"


class StoreNotVisible(ValueError):
    """A worker does not see the store at `path` (no manifest there)."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path

    def __reduce__(self) -> tuple:  # sent back to the client pickled: both arguments
        return type(self), (str(self), self.path)


def refuse_unseen(path: str) -> None:
    """On a worker: a StoreNotVisible naming it when it does not see the store at `path` (no manifest
    there, though the client found one): the workers do not share the client's file system. Before
    refusing, it looks again after each of UNSEEN_RECHECKS_S, listing the directories first (the store's,
    and each of its ancestors up to one that exists here, top first): an NFS client may remember for a
    few seconds that a directory created since on another machine was absent."""
    manifest = os.path.join(path, MANIFEST)
    for wait in (0.0, *UNSEEN_RECHECKS_S):
        if wait:
            time.sleep(wait)
            _list(*_unseen_chain(path))
        if os.path.lexists(manifest):
            return
    raise StoreNotVisible(
        f"gradient store {path} is not visible on worker {worker_name()} (no {MANIFEST} there, though the "
        f"client found it; looked again for {sum(UNSEEN_RECHECKS_S):g} s): every worker must see the store at "
        "the same path, on a file system shared with the client",
        path,
    )


def _unseen_chain(path: str) -> list[str]:
    """`path`, its parent, and each ancestor up to the first that exists here, from the top down."""
    chain = [path, os.path.dirname(path)]
    while not os.path.isdir(chain[-1]) and os.path.dirname(chain[-1]) != chain[-1]:
        chain.append(os.path.dirname(chain[-1]))
    return chain[::-1]


def _list(*directories: str) -> None:
    """Lists each directory (an NFS client then asks the server for its entries), if it can."""
    for directory in directories:
        try:
            os.listdir(directory)
        except OSError:
            pass


def as_side(x: Any, name: str) -> GradientSet | Any:
    """A path (str or os.PathLike) opened as a GradientStore; anything else as given. Its errors name the side
    first (`name`), of the same type; an OSError keeps its errno and file names (a caller may test e.errno or
    e.filename), and the store's own "no gradient store at PATH" (a FileNotFoundError without them) gets ENOENT
    and the path given."""
    if isinstance(x, (str, os.PathLike)):
        try:
            return GradientStore.open(Path(x))
        except OSError as e:
            raise _named_os_error(e, name, x) from None
        except ValueError as e:
            raise type(e)(f"{name}: {e}") from None
    return x


def _named_os_error(e: OSError, name: str, path: Any) -> OSError:
    """`e` with its message led by `name`: OSError(errno, f"{name}: {strerror}", filename[, filename2]) of its
    type, or, for a FileNotFoundError of a message alone, FileNotFoundError(ENOENT, f"{name}: {e}", path); other
    OSErrors of a message alone as type(e)(f"{name}: {e}")."""
    if e.errno is None and isinstance(e, FileNotFoundError):
        return FileNotFoundError(errno.ENOENT, f"{name}: {e}", os.fspath(path))
    if e.errno is None:
        return type(e)(f"{name}: {e}")
    said = f"{name}: {e.strerror if e.strerror is not None else os.strerror(e.errno)}"
    if e.filename2 is not None:
        return type(e)(e.errno, said, e.filename, None, e.filename2)
    if e.filename is not None:
        return type(e)(e.errno, said, e.filename)
    return type(e)(e.errno, said)


def shard_ranges(n_rows: int, row_bytes: int, slots: int, shards: int | None, align: int = 1) -> list[tuple[int, int]]:
    """Contiguous row ranges covering [0, n_rows) in order, each starting at a multiple of `align`.

    shards: that many near-equal ranges (at most one per `align` rows). None: guided sizes, each
    range 1 / (GUIDE * slots) of the rows not yet given out, within [MIN_SHARD_BYTES,
    MAX_SHARD_BYTES] (the last may be smaller): large ranges run first and small ones fill the
    end, so that the `slots` task slots finish close together even when some run slower. slots 0
    (a cluster with no workers yet, whose size is unknown): ranges of MIN_SHARD_BYTES, as many as
    the rows give, for the workers that join (and for an adaptive cluster to scale up for).
    """
    units = max(1, math.ceil(n_rows / align))
    if shards is not None:
        shards = min(shards, units)
        cuts = [min(n_rows, (i * units // shards) * align) for i in range(shards + 1)]
    else:
        unit_bytes = max(1, row_bytes * align)
        low = max(1, MIN_SHARD_BYTES // unit_bytes)
        high = max(low, MAX_SHARD_BYTES // unit_bytes)
        cuts, given = [0], 0
        while given < units:
            guided = math.ceil((units - given) / (GUIDE * slots)) if slots > 0 else low
            given += min(units - given, max(low, min(high, guided)))
            cuts.append(min(n_rows, given * align))
    return list(zip(cuts[:-1], cuts[1:], strict=True))
