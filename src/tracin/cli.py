"""The `tracin` command line: info, score, self-influence, aggregate, bench, demo.

Every warning is one line on stderr, `tracin COMMAND: warning: ...` (once per command; dropped where
stderr fails), and every failure too, `tracin COMMAND: error: ...` (also a warning made an error,
`python -W error -m tracin ...`), with exit code 2 for a command line
wrong in itself (argparse's checks, which print the usage lines first, and UsageError: options that do not
combine, an empty value, an -o name without the command's suffix) and 1 for everything else (files,
stores, data, the system); one writing the results (a full disk) names --output or stdout. Output cut
short by a closed pipe (`tracin info STORE | head -1`) ends quietly with exit code 141, as for a
process killed by SIGPIPE. An -o file is written whole or not
at all: an error, Ctrl-C (exit code 130), SIGTERM or SIGHUP (143, 129) while writing leaves the
file that was there before (a FIFO, a device or a file with other hard links is written in place;
an -o that is a file the command reads, or a hard link holding a .npy array or a store's manifest, is
refused). A second signal while the first is reported is recorded, not raised: no traceback.
A signal whose exception something swallowed (JAX's gc callback does) still exits 128 + the signal's
number; if the command ran to the end nonetheless, the message says so: its output was written.
Strings from a store, which may come from elsewhere (ids, metadata keys), and error lines reach a
terminal with control characters and bidi controls escaped (ESC as \\x1b): a store cannot drive the terminal.
CSV written to a file or pipe holds the ids as they are (CSV-quoted), also ones a spreadsheet would run
as formulas (starting with = + - @): they are data, read back by programs unchanged.
Started with a standard stream closed (`2>&-`, `>&-`, as some daemons and job runners start commands),
what would go to it is dropped, nothing else changes: no message lands in stdout's results; results
that need a closed stdout are the one-line error "cannot write the results to stdout: it is closed"
(exit code 1; written with -o they are fine, and exit code 0).
"""

from __future__ import annotations

import _thread
import argparse
import csv
import difflib
import io
import math
import os
import re
import signal
import stat
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import IO, Any

from ._cpus import usable_cores
from ._memory import process_memory
from ._validate import MAX_THREADS
from ._whole_file import MAX_LINKS, SEPARATORS, TEMP_PREFIX, resolve
from ._whole_file import whole_file as _whole_file
from .store._files import enclosing_store
from .store._format import printable, short

EXAMPLES = """examples:
  tracin demo                                   # the mislabelled-digits demo (pip install 'tracin[demo]')
  tracin info grads/train                       # what a gradient store holds
  tracin self-influence grads/train --top 100   # the 100 most self-influential rows, CSV on stdout
  tracin score --test grads/test --train grads/train -k 10 --side both -o top10.npz
  tracin score --test grads/test --train grads/train --scheduler local --workers 4   # on a Dask LocalCluster
  tracin score --test grads/test --train grads/train --device cuda                   # on the GPU (torch)
  tracin score --test grads/test --train grads/train --whitening white.npz           # whitened TracIn
  tracin aggregate --test grads/test --train grads/train --top 100                   # helped the whole test set most
  tracin bench                                  # tracin.top_k against NumPy on this machine
"""

CLOSED = "tracin_closed"  # set on the stand-in for a standard stream the command started with closed
WRITE_A_FILE = "; give -o FILE to write them to a file"  # for commands that take -o
SCHEDULER_TIMEOUT_S = 10  # seconds --scheduler ADDRESS may take to answer
BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE, what a shell reports for a reader that went away
FLOAT32 = ".9g"  # CSV format of float32 scores: 9 significant digits read back to the same float32
NPY_MAGIC = b"\x93NUMPY"  # how every .npy file (a store's checkpoints, its ids) starts
CSV_CHUNK = 65536  # CSV rows formatted and written at a time (one progress-bar step)
EXTRAS = {"demo": "demo"}  # command -> the pip extra its optional imports come from
# a missing module (its top-level name) -> the pip extra that installs it, before the command's own extra
# (torch missing under `tracin demo --framework torch` must not send the user to the demo extra, which lacks it)
MODULE_EXTRAS = {"torch": "torch", "jax": "jax", "jaxlib": "jax", "dask": "distributed", "distributed": "distributed"}


class CommandError(Exception):
    """A problem the user can fix; printed as one line without a traceback, exit code 1."""


class UsageError(CommandError):
    """A command line wrong in itself, whatever the files (options that do not combine, an empty or
    malformed value argparse cannot check); one line, exit code 2, as argparse's own usage errors."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout and appends "(default: X)" to options that have a default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not any(action.default is v for v in (None, False, argparse.SUPPRESS)) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


# -- stores --------------------------------------------------------------------------------------
def _open_store(path: str, option: str, allow_partial: bool):
    """The store at `path`; every failure to open it an error naming `option`: no such path, an
    empty one (Path('') is the current folder), not a store, a malformed store, an unfinished one
    (naming --allow-partial unless allowed) and one with no usable rows (none written from row 0 on
    for every checkpoint). The counts said for an unfinished store are the rows written from row 0 on,
    counting those range writers (a distributed export) recorded but not yet merged, as --allow-partial does."""
    if not path:
        raise UsageError(f"{option}: expected a gradient store folder, got ''")
    if not Path(path).exists():
        raise CommandError(f"{option}: no gradient store at {path}")
    if (numpy_file := _numpy_file_advice(path)) is not None:
        raise CommandError(f"{option}: {numpy_file}")
    from .store import StoreChangedError

    store, held = _opened(path, option, allow_partial)
    if not store.complete and not allow_partial:  # opened again to count the range writers' rows
        store, held = _opened(path, option, True)
    try:
        info = store.info()
    except StoreChangedError as e:  # a file removed since the store was opened
        raise CommandError(f"{option}: gradient store changed while reading: {_one_line(e)}") from e
    # rows usable = the prefix written for every checkpoint, the fewest of these; `tracin info` counts rows
    # recorded anywhere
    counts = ", ".join(map(str, info["rows_from_row_0"]))
    written = f"rows written from row 0, {_per_slot(info)}: {counts} of {info['rows']}"
    if not store.complete and not allow_partial:
        _show_held(held, store, info)  # a malformed progress file (its rows left out of the counts)
        exported = isinstance(store.metadata.get("fingerprints"), dict)  # an export's store: its rerun resumes it
        if store.n_rows == info["rows"]:
            merge = " (it merges the range writers' progress files first)" if info["range_writers"] else ""
            raise CommandError(
                f"{option}: gradient store {path} is unfinished: every row is written ({written}) but the store "
                f"was never finalized; call GradientStore.create(<the same arguments>).finalize(){merge}"
                + (", or rerun the export" if exported else "")
            )
        advice = (
            f", or pass --allow-partial to use the {store.n_rows} rows written so far for every {_each(info)}"
            if store.n_rows
            else f"; no row is written for every {_each(info)} yet, so --allow-partial has none to use"
        )
        if exported:
            finish = (
                "finish the export: rerun the same export, with the same arguments and store (it resumes from the "
                "rows written)"
            )
        else:  # written by hand (GradientStore.create): no export to rerun
            finish = (
                "finish writing it: reopen it with w = GradientStore.create(<the same arguments>), write its missing "
                "rows (w.rows_done(c) says where checkpoint c resumes, w.missing(c) lists its gaps) and call "
                "w.finalize()"
            )
        raise CommandError(f"{option}: gradient store {path} is unfinished ({written}); {finish}" + advice)
    if store.n_rows == 0:
        _show_held(held, store, info)
        state = (
            "has no rows"
            if store.complete
            else f"has no usable rows yet ({written}: a row is usable once it and those before it are written "
            f"for every {_each(info)})"
        )
        if any(info["rows_past_usable"]):
            state += (
                f"; range writers record {', '.join(map(str, info['rows_past_usable']))} rows {_per_slot(info)} "
                "not yet usable (let the export finish, or rerun it to resume)"
            )
        raise CommandError(f"{option}: gradient store {path} {state}; nothing to score")
    for shown in held:
        warnings.warn_explicit(shown.message, shown.category, shown.filename, shown.lineno)
    return store


ZIP_MAGIC = b"PK\x03\x04"  # how an .npz (np.savez) starts


def _numpy_file_advice(path: str) -> str | None:
    """Where `path` is a file np.save or np.savez wrote (per-example gradients as a NumPy user has them) and not a
    store's folder: that, and the Python that makes a one-checkpoint store of it; for a folder, _folder_advice;
    else None."""
    if os.path.isdir(path):
        return _folder_advice(path)
    if not os.path.isfile(path):  # a FIFO, a terminal, a socket: not read (it would wait for a writer)
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
    except OSError:  # a folder, an unreadable file: opening the store names the problem
        return None
    if head == NPY_MAGIC:
        what, rows = "array file (np.save)", f"np.load({str(path)!r}, mmap_mode='r')"
    elif head.startswith(ZIP_MAGIC) and path.lower().endswith(".npz"):
        what, rows = "archive (np.savez)", f"np.load({str(path)!r})[NAME]"
    else:
        return None
    if (store := _store_owning(Path(path))) is not None:  # all its checkpoints, weights and ids are the folder's
        return f"{path} is a file of the gradient store {_path_text(store)}: give that folder"
    folder = str(Path(path).with_suffix("")) if Path(path).suffix else f"{path}-store"
    return (
        f"{path} is a NumPy {what}, not a gradient store (a folder holding a manifest.json and .npy files): make "
        f"one of its (rows, dims) gradients in Python, g = {rows}; w = tracin.GradientStore.create({folder!r}, "
        "n_rows=len(g), dims=[g.shape[1]]); w.write(0, 0, g.astype(np.float32)); w.finalize(), and give that "
        "folder (several checkpoints: README, Command line)"
    )


def _store_owning(path: Path) -> Path | None:
    """The folder of the gradient store whose data or ids file `path` is (a link to one too: the store named where
    the link points), as its manifest lists them; None for any other file (a user's own .npy in or below a store's
    folder, one named like a checkpoint the store does not have)."""
    from .store._files import read_manifest
    from .store._format import IDS_FILE

    real = path.resolve()
    folder = enclosing_store(real)
    if folder is None or folder != real.parent:
        return None
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError):  # changed since enclosing_store read it: opening the file names the problem
        return None
    owned = {name for names in manifest.files for name in names} | ({IDS_FILE} if manifest.has_ids else set())
    if real.name not in owned:
        return None
    return path.parent if path.parent.resolve() == folder else folder


FOLDER_NAMES_SHOWN = 3  # entries a folder that is not a store is described by


def _folder_advice(path: str) -> str | None:
    """Where the folder `path` has no manifest (and no interrupted create's marker: opening it says that) but holds
    .npy files (np.save's, one per checkpoint, say) or gradient stores one level down (grads/ for grads/train):
    what it holds and what to give instead; else None."""
    from .store._format import CREATING, MANIFEST

    folder = Path(path)
    try:
        if os.path.lexists(folder / MANIFEST) or os.path.lexists(folder / CREATING):
            return None
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        npys = [e.name for e in entries if e.name.endswith(".npy") and e.is_file()]
        stores = [e.path for e in entries if e.is_dir() and os.path.isfile(os.path.join(e.path, MANIFEST))]
    except OSError:  # unreadable: opening the store names the problem
        return None
    if stores:
        shown = ", ".join(stores[:FOLDER_NAMES_SHOWN]) + (", ..." if len(stores) > FOLDER_NAMES_SHOWN else "")
        return f"{path} is no gradient store but holds some: {shown}; give one of those"
    if npys:
        shown = ", ".join(npys[:FOLDER_NAMES_SHOWN]) + (", ..." if len(npys) > FOLDER_NAMES_SHOWN else "")
        return (
            f"{path} holds .npy files ({shown}) but no {MANIFEST}, so it is not a gradient store: make one of "
            "them in Python, w = tracin.GradientStore.create(FOLDER, n_rows=n, dims=[d_0, d_1, ...], "
            "weights=[lr_0, lr_1, ...]); w.write(c, 0, g_c.astype(np.float32)) for each checkpoint c's (n, d_c) "
            "array g_c; w.finalize(), and give that folder (README: Command line)"
        )
    return None


def _opened(path: str, option: str, allow_partial: bool) -> tuple[Any, list[warnings.WarningMessage]]:
    """GradientStore.open(path, allow_partial=...) and the warnings it gave, held for _open_store to show
    unless its error says the same; a failure an error naming `option`."""
    from .store import GradientStore, StoreChangedError, StoreFormatError

    try:
        with warnings.catch_warnings(record=True) as held:
            warnings.simplefilter("always")
            return GradientStore.open(path, allow_partial=allow_partial), held
    except StoreChangedError as e:
        raise CommandError(f"{option}: gradient store changed while reading: {_one_line(e)}") from e
    except StoreFormatError as e:
        raise CommandError(f"{option}: malformed gradient store: {_one_line(e)}") from e
    except OSError as e:  # not a folder, no manifest, unreadable
        raise CommandError(f"{option}: {_one_line(e)}") from e


def _show_held(held: list[warnings.WarningMessage], store: Any, info: dict[str, Any]) -> None:
    """Shows the `held` warnings of opening `store` but the one on rows range writers record past its
    usable rows, which _open_store's errors state in their own words (its counts)."""
    from .store._store import rows_past_usable_warning

    stated = rows_past_usable_warning(store.path, store.n_rows, info["rows_past_usable"], info["layers_per_checkpoint"])
    for shown in held:
        if str(shown.message) != stated:
            warnings.warn_explicit(shown.message, shown.category, shown.filename, shown.lineno)


def _per_slot(info: dict[str, Any]) -> str:
    """What a store's per-slot counts are counted over: its checkpoints, or, for a factored store of
    several layers per checkpoint (info['layers_per_checkpoint']), its factor pairs, one per layer."""
    layers = info["layers_per_checkpoint"]
    return "per checkpoint" if layers == 1 else f"per factor pair ({layers} layers per checkpoint)"


def _each(info: dict[str, Any]) -> str:
    """What each of a store's per-slot counts counts rows of (see _per_slot)."""
    return "checkpoint" if info["layers_per_checkpoint"] == 1 else "factor pair"


def _check_output(path: str | None, suffixes: tuple[str, ...] = ()) -> Path | None:
    """--output as a Path, checked before any work: a FIFO or a device (also through links: /dev/stdout),
    whatever its name, writable; else a name before one of `suffixes` (any case; if given), not a folder, not
    in a gradient store's folder (whose files are the store's own), writable if it exists, else a
    name its folder (existing, writable) accepts, as the system says when it tries (a read-only file
    system, permissions); links resolved as writing will (_whole_file.resolve: loops and others'
    links in /tmp refused)."""
    if path is None:
        return None
    if not path:  # Path("") would be the current folder
        raise UsageError("--output: expected a file name, got ''")
    if path.endswith(SEPARATORS):  # Path() would drop it
        raise UsageError(f"--output: {path} ends in {path[-1]!r}, which names a folder; give a file name")
    last = os.path.basename(path)
    if last in (".", ".."):  # Path(".").name is '', Path("x/.") is x
        raise UsageError(f"--output: {path} ends in {last!r}, which names a folder; give a file name")
    out = Path(path)
    try:
        mode = os.stat(out).st_mode  # through links: /dev/stdout is the pipe or file it stands for
    except OSError:
        mode = None
    if mode is not None and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
        # a FIFO or a device, streamed whatever its name: opening it to try it would use it
        if not os.access(out, os.W_OK):
            raise CommandError(f"--output: cannot write {out} (permission denied)")
        return out
    if suffixes:
        suffix = next((s for s in suffixes if out.name.lower().endswith(s)), None)
        if suffix is None:
            where = os.path.realpath(out)  # /dev/stdout with stdout redirected to a file is that file
            named = f", which is the file {where}" if stat.S_ISREG(mode or 0) and where != os.path.abspath(out) else ""
            raise UsageError(
                f"--output must end in {' or '.join(suffixes)} or be a FIFO or a device, got {path!r}{named}"
            )
        if len(out.name) == len(suffix):  # Path(".csv").suffix is "": a dot file
            raise UsageError(f"--output: {path!r} has no name before {suffix}; give one, as in out{suffix}")
    limit, size = _name_max(out.parent), len(os.fsencode(out.name))
    if limit is not None and size > limit:
        raise CommandError(f"--output: file name of {size} bytes; {out.parent} allows at most {limit}")
    if out.is_dir():
        raise CommandError(f"--output: {out} is a folder; give a file name")
    try:
        target = Path(resolve(out))
    except OSError as e:
        raise CommandError(f"--output: {e.strerror}") from e
    store = enclosing_store(target)
    if store is not None:
        raise CommandError(
            f"--output: {out} is inside the gradient store {store}, whose folder holds only the store's own "
            "files (another one there makes the store refuse to be written again); write it elsewhere"
        )
    if target.exists():
        try:  # opened for writing without changing it: the system's own reason if it cannot be
            os.close(os.open(target, os.O_WRONLY))
        except OSError as e:
            raise CommandError(f"--output: cannot write {out} ({e.strerror or _one_line(e)})") from e
        return out
    folder = target.parent
    if folder.exists() and not folder.is_dir():
        raise CommandError(f"--output: {folder} is not a folder, so {out} cannot be written in it")
    if not folder.is_dir():
        raise CommandError(f"--output: folder {folder} does not exist")
    try:  # what writing will do first: a temporary file in that folder
        fd, temp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=".tmp")
    except OSError as e:  # not the temporary file's name: the user never gave it
        reason = e.strerror or _one_line(e)
        raise CommandError(f"--output: cannot create {out}: folder {folder} refuses new files ({reason})") from e
    os.close(fd)
    os.unlink(temp)
    return out


@contextmanager
def _output_file(out: Path, binary: bool = False) -> Iterator[IO]:
    """_whole_file(out): an OSError while writing it (a full disk, a quota) an error naming --output and
    the file; a closed pipe (a FIFO whose reader went away) stays BrokenPipeError, which ends quietly."""
    try:
        with _whole_file(out, binary=binary) as f:
            yield f
    except BrokenPipeError:
        raise
    except OSError as e:
        reason = e.strerror or _one_line(e)
        said = reason if str(out) in reason else f"cannot write {out}: {reason}"
        raise CommandError(f"--output: {said}") from e


def _check_stdout(out: Path | None, instead: str = WRITE_A_FILE) -> None:
    """Refuses, before any work (stores opened, a pass, a cluster started), results bound for a stdout the
    command started with closed (_standard_streams): `out` None (no -o), the error _stdout gives, `instead`
    appended (what else the command can write to); also for an `out` whose links lead to descriptor 1
    (-o /dev/stdout), which is /dev/null then: the results would be dropped."""
    if getattr(sys.stdout, CLOSED, False) and (out is None or _reaches_stdout(out)):
        raise CommandError(f"cannot write the results to stdout: it is closed{instead}")


def _reaches_stdout(path: Path) -> bool:
    """Whether `path` is descriptor 1's name in /proc/self/fd (or /dev/fd), itself or by its links."""
    name = os.path.abspath(path)
    fds = os.path.realpath("/proc/self/fd")
    for _ in range(MAX_LINKS):
        if os.path.basename(name) == "1" and os.path.realpath(os.path.dirname(name)) == fds:
            return True
        if not os.path.islink(name):
            return False
        name = os.path.join(os.path.dirname(name), os.readlink(name))
    return False


@contextmanager
def _stdout(instead: str = "") -> Iterator[IO[str]]:
    """sys.stdout for a command's results, flushed at the end: an OSError writing it (`> /dev/full`, a
    full disk) an error naming stdout, what is still buffered dropped (it would fail again at exit); a
    closed pipe stays BrokenPipeError (exit code 141), Ctrl-C KeyboardInterrupt (130). Where the command
    started with stdout closed (_standard_streams), an error naming stdout before anything is written,
    `instead` appended (what else the command can write to)."""
    _check_stdout(None, instead)
    try:
        yield sys.stdout
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        try:
            drop_output(sys.stdout)
        except (OSError, ValueError):  # no descriptor (an in-memory stream)
            pass
        raise CommandError(f"cannot write the results to stdout: {e.strerror or _one_line(e)}") from e


def _name_max(folder: Path) -> int | None:
    """The longest file name in bytes `folder` accepts, or None where the OS does not say."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):
        return None


def _ids(store, option: str) -> list | None:
    """The ids of `store` (None if it has none), read before any output is opened, so that an OSError
    reading them (EIO, a stale NFS handle) is an error naming `option`, not a failed write of the output."""
    try:
        ids = store.ids
    except OSError as e:
        raise CommandError(
            f"{option}: cannot read the ids of gradient store {store.path}: {e.strerror or _one_line(e)}"
        ) from e
    return None if ids is None else ids.tolist()


def _progress(args: argparse.Namespace) -> bool | None:
    """progress= for the library: none with --no-progress or where no one sees stderr (a log would
    collect every frame, also of the bars the library shows at once for long work), else automatic."""
    from ._progress import shows_automatically

    return None if not args.no_progress and shows_automatically() else False


def _write_csv(
    f: IO[str], header: list[str], rows: Iterator[list], total: int, progress: bool | None, ids: tuple = ()
) -> None:
    """`header`, then the `total` `rows`, written CSV_CHUNK at a time under a progress bar. On a
    terminal, control characters and bidi controls in string cells (ids from a store) are written escaped
    (\\x1b), so that a store from elsewhere cannot drive the terminal; files and pipes get them as
    they are, CSV-quoted: every cell quoted where an id of `ids` (the id lists the rows show) holds a \\r
    (ids split from a CRLF file), which csv before Python 3.13 leaves unquoted with lineterminator \\n."""
    from itertools import islice

    from ._progress import progress_bar

    if _is_terminal(f):
        rows = ([printable(x) if isinstance(x, str) else x for x in row] for row in rows)
    carriage = any(isinstance(i, str) and "\r" in i for group in ids if group for i in group)
    quoting = csv.QUOTE_ALL if carriage else csv.QUOTE_MINIMAL
    w = csv.writer(f, lineterminator="\n", quoting=quoting)  # Unix line ends: awk, cut see no trailing \r
    w.writerow(header)
    bar = progress_bar(total, progress, "tracin writing CSV", unit="row")
    try:
        while chunk := list(islice(rows, CSV_CHUNK)):
            w.writerows(chunk)
            bar.update(len(chunk))
    finally:
        bar.close()


def _is_terminal(f: IO[str]) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError, OSError):  # no such method, closed
        return False


@contextmanager
def _cluster(args: argparse.Namespace) -> Iterator[Any]:
    """None without --scheduler; else a Dask client: of a new LocalCluster of --workers processes
    (--scheduler local), or connected to the scheduler at the address given (_check_scheduler first)."""
    if args.scheduler is None:
        yield None
        return
    try:
        from distributed import Client

        from .distributed import TaskFailedError
        from .distributed._cluster import WorkersTracinError, local_client
    except ImportError as e:
        raise CommandError(f"--scheduler needs Dask: pip install 'tracin[distributed]' ({e})") from e
    if args.scheduler == "local":
        connection = local_client(args.workers or usable_cores())
    else:
        try:
            connection = Client(args.scheduler, timeout=SCHEDULER_TIMEOUT_S)
        except (OSError, ValueError) as e:
            raise CommandError(
                f"--scheduler: cannot connect to a Dask scheduler at {args.scheduler} ({_one_line(e)})"
            ) from e
    with connection as client:
        try:
            yield client
        except (TaskFailedError, WorkersTracinError) as e:  # workers that kept dying, or without our tracin: one line
            raise CommandError(_one_line(e)) from e


def _check_scheduler(args: argparse.Namespace) -> None:
    """--scheduler, --workers and --device, checked before any work (usage errors): an address or local,
    not with --device cuda, and --workers only with --scheduler local."""
    if args.scheduler == "":  # not an address to try
        raise UsageError("--scheduler: expected a scheduler's address or local, got ''")
    if args.scheduler is not None and args.device == "cuda":
        raise UsageError(
            "--device cuda scores on this machine's GPU, --scheduler on the Dask workers' CPUs: give one of them"
        )
    if args.workers is None or args.scheduler == "local":
        return
    if args.scheduler is None:
        raise UsageError("--workers needs --scheduler local (the workers of a LocalCluster to start)")
    raise UsageError(
        f"--workers starts a LocalCluster and needs --scheduler local, not {args.scheduler}: "
        "the workers of a running scheduler are its own"
    )


def _check_device(args: argparse.Namespace) -> None:
    """--device, checked before any work: cuda needs a CUDA device torch sees (with no --scheduler, whose
    workers run the CPU kernel: _check_scheduler)."""
    if args.device != "cuda":
        return
    from .backends import placement

    try:
        placement.choose("cuda", "float32", {})
    except ValueError as e:
        raise CommandError(
            f"--device cuda: no usable CUDA device ({_one_line(e)}); leave --device out to score on the CPU"
        ) from e


# -- commands ------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> None:
    from .store import describe
    from .store._files import interrupted_create

    if not args.path:  # Path("") would be the current folder
        raise UsageError("expected a gradient store folder, got ''")
    if not Path(args.path).exists():
        raise CommandError(f"no gradient store at {args.path}")
    if (numpy_file := _numpy_file_advice(args.path)) is not None:
        raise CommandError(numpy_file)
    if (interrupted := interrupted_create(args.path)) is not None:
        raise CommandError(interrupted)
    text = describe(args.path)
    with _stdout() as f:
        print(text, file=f)


def cmd_score(args: argparse.Namespace) -> None:
    import numpy as np

    _check_whitening_options(args)
    _check_scheduler(args)
    _check_whitening_name(args.whitening)
    out = _check_output(args.output, (".npz", ".csv"))
    _check_not_read(out, {"--whitening": args.whitening, "--test": args.test, "--train": args.train})
    _check_stdout(out)  # not after the whole pass
    _check_device(args)
    test = _open_store(args.test, "--test", args.allow_partial)
    train = _open_store(args.train, "--train", args.allow_partial)
    whitening = _whitening_for(args, test, train)
    with _scoring_refusals(args, whitening):
        scored = test if whitening is None else _whitened(whitening, test, "--test", args)
        result = _top_k(args, scored, train)
    sides = result._asdict() if args.side == "both" else {args.side: result}
    scores = " (cosine scores)" if args.normalize else ""
    k = min(args.k, train.n_rows)  # what top_k returns
    capped = f" (k capped at the {train.n_rows} train rows)" if k < args.k else ""
    scores += " (whitened)" if whitening is not None else ""
    summary = f"top-{k} {args.side}{scores} of {test.n_rows} test rows over {train.n_rows} train rows{capped}"
    if out is not None and out.suffix.lower() == ".npz":
        arrays = {f"{name}_{field}": getattr(r, field) for name, r in sides.items() for field in ("values", "indices")}
        with _output_file(out, binary=True) as f:
            if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                np.savez(f, **arrays)
            else:  # streamed (a FIFO, a device): the archive whole first, written at once; zipfile's closing records,
                # written while an interrupt unwinds, blocked again on a reader that stopped reading (one Ctrl-C hung)
                staged = io.BytesIO()
                np.savez(staged, **arrays)
                f.write(staged.getbuffer())
        # to stderr: stdout may be the output (-o x.csv, a link to /dev/stdout or to a FIFO)
        print(f"{summary}: wrote {_path_text(out)}", file=sys.stderr)
        return
    test_ids, train_ids = _ids(test, "--test"), _ids(train, "--train")  # before the CSV's output is opened
    pairs = sum(r.indices.size for r in sides.values())

    def write_csv(f: IO[str]) -> None:
        rows = _pair_rows(sides, test_ids, train_ids)
        _write_csv(f, PAIRS_HEADER, rows, pairs, _progress(args), ids=(test_ids, train_ids))

    _written(out, write_csv, summary)


def _check_whitening_options(args: argparse.Namespace) -> None:
    """Refuses --whitening with --normalize (score and aggregate), before any work."""
    if args.whitening is not None and args.normalize:
        raise UsageError(
            "--whitening and --normalize do not combine: the cosine of whitened --test rows and unwhitened --train "
            f"rows compares different spaces; drop --normalize to {args.command} whitened TracIn"
        )


def _whitening_for(args: argparse.Namespace, test: Any, train: Any) -> Any:
    """The tracin.Whitening of --whitening (None without it), once neither store is whitened already; warns
    when it was fitted on another store than --train (without --whitening: when a whitened store's whitening was
    fitted on another store than the other option's)."""
    if args.whitening is None:
        _warn_whitened_store_elsewhere(test, train)
        return None
    for option, store in (("--test", test), ("--train", train)):
        if "whitening" in store.metadata:
            raise CommandError(
                f"--whitening: {option} store {store.path} is already whitened (metadata['whitening']), and the "
                "whitening applies once, to the test rows: give the store of the unwhitened rows, or leave "
                "--whitening out"
            )
    whitening = _load_whitening(args.whitening)
    _warn_fitted_elsewhere(whitening, train, "--train")
    return whitening


def _warn_whitened_store_elsewhere(test: Any, train: Any) -> None:
    """Without --whitening: a warning where a whitened store (metadata['whitening'], as Whitening.apply records it)
    was fitted on another store (its fitted_on id; None: fitted in memory, nothing to compare) than the other
    option's, in the options' words with what to do from a shell (the library's own warning, with Python advice,
    is silenced by _scoring_refusals). Two whitened stores are refused there: no warning first. A whitened --train
    that records the store it holds rows of (metadata['whitened_store']) is warned of only where its whitening was
    fitted on another store (W g_train needs W fitted on those rows), whatever --test."""
    sides = (("--test", test, "--train", train), ("--train", train, "--test", test))
    for option, whitened, other_option, other in sides:
        record = whitened.metadata.get("whitening")
        if record is None:
            continue
        if "whitening" in other.metadata:
            return
        fitted_on = record.get("fitted_on") if isinstance(record, dict) else None
        own = whitened.metadata.get("whitened_store")
        if option == "--train" and isinstance(own, str):  # W g_train: whitened TracIn with W fitted on those rows
            if isinstance(fitted_on, str) and fitted_on != own:
                warnings.warn(
                    f"--train {whitened.path} holds rows of a gradient store (id {own}) whitened by a whitening "
                    f"fitted on another gradient store (id {fitted_on}): {_WHITENED_TRAIN_ADVICE}, unless that was "
                    "meant (a subset or a copy re-exported)",
                    UserWarning,
                    stacklevel=2,
                )
            return
        store_id = other.store_id
        if not isinstance(fitted_on, str) or not isinstance(store_id, str) or fitted_on == store_id:
            return
        advice = (
            "score --test against the store its whitening was fitted on, or give the unwhitened test rows as --test "
            "with --whitening (a whitening fitted on --train)"
            if option == "--test"
            else f"{_WHITENED_TRAIN_ADVICE}"
        )
        warnings.warn(
            f"{option} {whitened.path} is whitened by a whitening fitted on another gradient store (id {fitted_on}) "
            f"than {other_option} {other.path} (id {store_id}); its scores are whitened by that store's second "
            f"moment: {advice}, unless that was meant (a subset or a copy re-exported)",
            UserWarning,
            stacklevel=2,
        )
        return


@contextmanager
def _scoring_refusals(args: argparse.Namespace, whitening: Any) -> Iterator[None]:
    """The library's refusals of --test and --train scored together (`whitening`: --whitening's, or None), in
    command line terms: a whitened side with --normalize, a whitening fitted on other gradients than --train's,
    sides exported at other checkpoints, NaN rows, sides that do not match."""
    from .scoring import (
        FITTED_ON,
        FITTED_ON_TRAIN,
        CheckpointMismatchError,
        FittedKindError,
        WhitenedNormalizeError,
        fitted_elsewhere_told,
        sides_worded,
    )

    # a whitened test side's whitening: --whitening, or the one a whitened --test store records
    owner = "--test's whitening" if whitening is None else "--whitening"
    words = {
        "test": "--test",
        "train": "--train",
        FITTED_ON: f"the gradients {owner} was fitted on",
        FITTED_ON_TRAIN: "the gradients --train's whitening was fitted on",
    }
    try:  # a whitening fitted on another store than the other side's: _whitening_for warned in the options' words
        with fitted_elsewhere_told(), sides_worded(words):  # checkpoints given differently: in the options' words
            yield
    except WhitenedNormalizeError as e:  # the library's advice (normalize=False) is Python's
        head = "--normalize does not combine with whitened gradients (metadata['whitening'])"
        if len(e.sides) == 2:  # the same whitening on both is no space mismatch: two whitened sides are refused
            message = _both_whitened(args)
        else:
            which = f"--{e.sides[0]} is whitened and --{'train' if e.sides == ('test',) else 'test'} is not"
            message = (
                f"{head}: {which}, so their cosine scores would compare different spaces; drop --normalize to "
                f"{args.command} them"
            )
        raise CommandError(message) from e
    except FittedKindError as e:  # the library's advice (Whitening.fit(train)) is Python's
        if FITTED_ON_TRAIN in str(e):  # a whitened --train store's whitening, checked against --test
            raise CommandError(
                f"--train is whitened by a whitening fitted on preconditioner={short(e.kinds[0])} gradients but "
                f"--test holds preconditioner={short(e.kinds[1])} ones; {_WHITENED_TRAIN_ADVICE}"
            ) from e
        fitted = "--whitening was" if whitening is not None else "--test is whitened by a whitening"
        raise CommandError(
            f"{fitted} fitted on preconditioner={short(e.kinds[0])} gradients but --train holds "
            f"preconditioner={short(e.kinds[1])} ones; {_refit_advice(whitening)}"
        ) from e
    except CheckpointMismatchError as e:  # the library's advice (drop a metadata record) is not for a shell
        if e.names[0] == FITTED_ON:  # --test's own records passed: its whitening's fitted-on gradients did not
            what = "the optimizer states of checkpoints" if e.optimizer_states else "checkpoints"
            raise CommandError(
                f"{owner} was fitted on gradients exported differently from --train ({what} {e.listed} "
                f"differ); {_refit_advice(whitening)}"
            ) from e
        if e.names[0] == FITTED_ON_TRAIN:  # as above, a whitened --train store's whitening against --test
            what = "the optimizer states of checkpoints" if e.optimizer_states else "checkpoints"
            raise CommandError(
                f"--train's whitening was fitted on gradients exported differently from --test ({what} {e.listed} "
                f"differ); {_WHITENED_TRAIN_ADVICE}"
            ) from e
        if e.optimizer_states:
            raise CommandError(
                f"--test and --train were exported with different optimizer states (of checkpoints {e.listed}); "
                "export both sides with the same optimizer states (same files or state dicts; a state saved "
                "again under another file name digests differently)"
            ) from e
        raise CommandError(
            f"--test and --train were exported at different checkpoints (checkpoints {e.listed} differ); "
            "export both sides from the same checkpoints (same files or state dicts)"
        ) from e
    except ValueError as e:  # another record of the fitted-on gradients than --train's (mode, projection, params)
        if _one_line(e).startswith(_BOTH_WHITENED):  # the library's advice (Whitening.apply) is Python's
            raise CommandError(_both_whitened(args)) from e
        if FITTED_ON_TRAIN in str(e):  # a whitened --train store's whitening does not fit --test
            said = _one_line(e).replace(FITTED_ON_TRAIN, "the gradients --train's whitening was fitted on")
            raise CommandError(f"--train's whitening does not fit --test: {said}; {_WHITENED_TRAIN_ADVICE}") from e
        if FITTED_ON not in str(e):
            raise _sides_named(e, {"test": f"--test {args.test}", "train": f"--train {args.train}"}) from e
        said = _one_line(e).replace(FITTED_ON, f"the gradients {owner} was fitted on")
        raise CommandError(f"{owner} does not fit --train: {said}; {_refit_advice(whitening)}") from e


# what to do about a whitened --train store (Whitening.apply's output passed as the train side) whose whitening
# was fitted on other gradients than --test's
_WHITENED_TRAIN_ADVICE = (
    "whiten --train's unwhitened store with a whitening fitted on it, or give the unwhitened --train with "
    "--whitening (a whitening fitted on it)"
)

# scoring._check_same_gradient_space's refusal of two whitened sides, in its words
_BOTH_WHITENED = "test and train are both whitened (metadata['whitening'])"


def _both_whitened(args: argparse.Namespace) -> str:
    """The refusal of a whitened --test and a whitened --train (--whitening refuses whitened stores before), in
    command line terms, with or without --normalize."""
    both = f"--test {args.test} and --train {args.train} are both whitened"
    advice = (
        "the whitening applies once, to the test rows; give a whitened --test and an unwhitened --train, or "
        "the unwhitened stores with --whitening"
    )
    if args.normalize:
        return (
            "--normalize does not combine with whitened gradients (metadata['whitening']), and "
            f"{both}, which is refused without --normalize too: {advice}, without --normalize"
        )
    return f"{both} (metadata['whitening']): {advice}"


# the library's refusals of a pair of sides that do not match (scoring._pair, _weights, _check_same_gradient_space,
# _check_same_preconditioner, _check_same_hyperparameters, Projection.check_compatible), in its words
_UNMATCHED = (
    "test dims ",
    "test has ",
    "test is ",
    "test and train carry ",
    "test gradients are ",  # mode=, preconditioner=
    "train gradients are preconditioner=",  # 'adam_update' against preconditioned test rows
    "test and train are gradients of different parameters",
    "test and train were preconditioned with other settings",
    "test (",  # the two frameworks lay out their rows differently
    "projection mismatch",
)


# scoring._projection_of's refusal of a store's own metadata['projection']
_UNREADABLE_RECORD = re.compile(
    r"(?P<side>test|train) gradients \(gradient store .*\): (?P<said>(?:projection spec from generator version|"
    r"metadata\['projection'\] is not a projection spec).*)",
    re.S,
)


def _sides_named(e: ValueError, names: dict[str, str]) -> Exception:
    """The library's refusal `e` of the rows it was given, its "test" / "train" named as `names` says (an
    option and its store's path) with what to do from a shell: rows holding NaN or Inf, a side's records
    it cannot read, sides that do not match; `e` itself for other refusals."""
    from .scoring import _NON_FINITE

    text = _one_line(e)
    if (found := _NON_FINITE.match(text)) is not None:
        side, block, rows = found.groups()
        return CommandError(
            f"{names[side]}: {block} holds NaN or Inf values, first in rows [{rows}], so nothing was scored: export "
            "those examples again (a NaN or infinite loss?) or write a store without them"
        )
    if (found := _UNREADABLE_RECORD.match(text)) is not None and found["side"] in names:  # a path may hold "): "
        return CommandError(f"{names[found['side']]}: {found['said']}")
    if "test" in names and text.startswith(_UNMATCHED):
        if "'adam_update'" in text:  # the library's advice (test rows with preconditioner=None) is the shell's too
            return CommandError(f"{names['test']} and {names['train']} do not match: {text}")
        return CommandError(
            f"{names['test']} and {names['train']} do not match: {text}; give stores exported the same way "
            f"(model, checkpoints, layers, mode, projection{', preconditioner' if 'preconditioner' in text else ''})"
        )
    return e


def _refit_advice(whitening: Any) -> str:
    """What to do about a whitening fitted on other gradients than --train's: `whitening` the --whitening
    loaded, or None for the whitening a whitened --test store records."""
    if whitening is not None:
        return "give --whitening a whitening fitted on --train's gradients"
    return (
        "score --test against the gradients its whitening was fitted on, or whiten the test rows with a whitening "
        "fitted on --train"
    )


def _check_not_read(out: Path | None, reads: dict[str, str | None]) -> None:
    """Refuses, before any work, an existing regular --output that is a file the command reads (by
    device and inode: hard and symbolic links included), as `reads` names them (option -> the
    --whitening file or a store's folder, whose own files are compared), and one with other hard links
    that holds a NumPy array (.npy) or a gradient store's manifest: a file with other links is
    rewritten in place, and such a one is likely some store's own file (a `cp -al` copy's)."""
    if out is None:
        return
    try:
        own = os.stat(out)
    except OSError:  # not there yet: a new file
        return
    if not stat.S_ISREG(own.st_mode):  # a FIFO or a device
        return
    for option, path in reads.items():
        if not path:
            continue
        for name in _files_read(path):
            try:
                other = os.stat(name)
            except OSError:
                continue
            if (other.st_dev, other.st_ino) != (own.st_dev, own.st_ino):
                continue
            if name == path:
                raise CommandError(
                    f"--output {out} is the {option} file: writing the results there would replace it; "
                    "give another --output"
                )
            raise CommandError(
                f"--output {out} is {name}, a file of the {option} gradient store (a link to it): writing the "
                "results there would corrupt the store; give another --output"
            )
    if own.st_nlink > 1 and (held := _store_like(out)) is not None:
        raise CommandError(
            f"--output {out} has {own.st_nlink - 1} other hard link(s) and holds {held}, likely a gradient "
            "store's own file: it would be rewritten in place, under every name; give another --output"
        )


def _files_read(path: str) -> list[str]:
    """The files the command reads at `path`: the file itself, or the entries of a store's (flat) folder."""
    if not os.path.isdir(path):
        return [path]
    try:
        return [entry.path for entry in os.scandir(path)]
    except OSError:  # _open_store names the problem
        return []


def _store_like(path: Path) -> str | None:
    """What in `path` looks like a gradient store's file: 'a NumPy array (.npy)' for the .npy magic,
    "a gradient store's manifest" for a manifest that parses; else None. Reads at most MAX_MANIFEST_BYTES."""
    from .store._files import MAX_MANIFEST_BYTES
    from .store._format import parse_manifest

    try:
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
            if head == NPY_MAGIC:
                return "a NumPy array (.npy)"
            if not head.lstrip().startswith(b"{"):
                return None
            data = head + f.read(MAX_MANIFEST_BYTES)
    except OSError:  # _check_output tried writing it; reading is no concern here
        return None
    try:
        parse_manifest(data, str(path))
    except ValueError:  # StoreFormatError included
        return None
    return "a gradient store's manifest"


def _check_whitening_name(path: str | None) -> None:
    """Refuses, before any work, an empty --whitening (Path("") would be the current folder): a usage error."""
    if path == "":
        raise UsageError("--whitening: expected a file written by tracin.Whitening.save, got ''")


def _load_whitening(path: str) -> Any:
    """The tracin.Whitening that Whitening.save wrote to --whitening `path`; every failure to read it (no
    such file, not a saved whitening, a damaged one: Whitening.load's errors) an error naming --whitening."""
    from .whitening import Whitening

    if not os.path.lexists(path):
        raise CommandError(
            f"--whitening: no such file {path} (it takes a file written by tracin.Whitening.save, fitted on the train "
            f"gradients: tracin.Whitening.fit(tracin.GradientStore.open(TRAIN)).save({str(path)!r}) in Python)"
        )
    try:
        return Whitening.load(path)
    except OSError as e:
        raise CommandError(f"--whitening: cannot read {path} ({e.strerror or _one_line(e)})") from e
    except ValueError as e:  # its message names the file and what is wrong with it
        raise CommandError(f"--whitening: {_one_line(e)}") from e


def _warn_fitted_elsewhere(whitening: Any, store: Any, option: str) -> None:
    """A warning where --whitening records the id of another store than `option`'s as the one it was fitted on
    (its spec.fitted_on; None: fitted in memory, nothing to compare): the scores are whitened by another set's R."""
    fitted_on = whitening.spec.fitted_on
    if fitted_on is not None and store.store_id is not None and fitted_on != store.store_id:
        warnings.warn(
            f"--whitening was fitted on another gradient store (id {fitted_on}) than {option} {store.path} "
            f"(id {store.store_id}); its scores are whitened by that store's second moment: fit the whitening "
            f"on {option}'s gradients unless that was meant (a subset or a copy re-exported)",
            UserWarning,
            stacklevel=2,
        )


def _whitened(whitening: Any, rows: Any, option: str, args: argparse.Namespace) -> Any:
    """Whitening.apply(rows) (the store of `option`): its whitened rows in memory, float32; a refusal of the
    rows (another layout, dims or gradient space than the whitening was fitted on, a NaN row) names both options.
    Its warnings of the rows' records (checkpoints given differently) are left to the scoring that follows."""
    from .scoring import CheckpointMismatchError, pair_warnings_told
    from .store import StoreFormatError

    try:
        with pair_warnings_told():  # scoring the whitened rows against --train warns of those records next
            return whitening.apply(rows, progress=_progress(args), num_threads=args.threads)
    except StoreFormatError:  # a store changed or damaged while read: _run names it as such
        raise
    except CheckpointMismatchError as e:  # the library's advice (drop a metadata record) is not for a shell
        raise CommandError(_fitted_mismatch(e, option)) from e
    except ValueError as e:
        from .scoring import _NON_FINITE

        if _NON_FINITE.match(_one_line(e)) is not None:  # a NaN row: the store named, with the shell's advice
            raise _sides_named(e, {"test": f"{option} {getattr(args, option[2:])}"}) from e
        advice = _mismatch_advice(e, "--train", odd_rows=option)
        raise CommandError(f"--whitening applied to {option}: {_unadvised(e)}{advice}") from e


def _unadvised(e: ValueError) -> str:
    """The library's refusal of rows for not matching a whitening, on one line, without its Python advice
    (Whitening.fit(train)): _mismatch_advice gives the command line's."""
    from .whitening._whitening import MATCHING_ADVICE

    return _one_line(e).replace(MATCHING_ADVICE, "")


def _mismatch_advice(e: ValueError, fitted_on: str, odd_rows: str | None = None) -> str:
    """What to do when the library refused rows for not matching the whitening (kind, checkpoints, dims,
    parameters, preconditioner: its messages name "the whitening"); "" for other refusals (a NaN row).
    `odd_rows`: the option of the refused rows where they, not the whitening, may be the odd ones out (--test
    rows of other dims than --train's, with a whitening fitted on --train's gradients: review248 F2)."""
    if "the whitening" not in str(e):
        return ""
    rows = "" if odd_rows is None else f"{odd_rows} rows exported as {fitted_on}'s were and "
    return f"; give {rows}--whitening a whitening fitted on {fitted_on}'s gradients (tracin.Whitening.fit, then save)"


def _fitted_mismatch(e: Any, option: str) -> str:
    """A CheckpointMismatchError between the rows of `option` and the gradients --whitening was fitted on, in
    command line terms."""
    if e.optimizer_states:
        what = f"with different optimizer states (of checkpoints {e.listed})"
    else:
        what = f"at different checkpoints (checkpoints {e.listed} differ)"
    return (
        f"{option} and the gradients --whitening was fitted on were exported {what}; give --whitening a whitening "
        f"fitted on gradients exported as {option} was (same checkpoints and optimizer states)"
    )


def _top_k(args: argparse.Namespace, test: Any, train: Any) -> Any:
    """tracin.top_k of the two stores, or tracin.distributed.top_k on the cluster of --scheduler."""
    import tracin

    with _cluster(args) as client:
        if client is None:
            return tracin.top_k(
                test,
                train,
                k=args.k,
                side=args.side,
                num_threads=args.threads,
                progress=_progress(args),
                device=args.device,
                normalize=args.normalize,
            )
        from . import distributed

        return distributed.top_k(
            test,
            train,
            k=args.k,
            side=args.side,
            client=client,
            num_threads=args.threads,
            progress=_progress(args),
            normalize=args.normalize,
        )


PAIRS_HEADER = ["test_row", "test_id", "side", "rank", "train_row", "train_id", "influence"]
RANKING_HEADER = ["rank", "train_row", "train_id", "self_influence"]  # self-influence's; train_* as in PAIRS_HEADER
AGGREGATE_HEADER = ["rank", "train_row", "train_id", "influence"]  # aggregate's: influence summed over --test


def _pair_rows(sides: dict, test_ids: list | None, train_ids: list | None) -> Iterator[list]:
    """One CSV row per (test row, side, rank): the train row chosen and its influence."""
    for name, r in sides.items():
        for t in range(r.indices.shape[0]):
            test_id = test_ids[t] if test_ids else t
            for rank, (i, v) in enumerate(zip(r.indices[t].tolist(), r.values[t].tolist(), strict=True), 1):
                yield [t, test_id, name, rank, i, train_ids[i] if train_ids else i, f"{v:{FLOAT32}}"]


def cmd_self_influence(args: argparse.Namespace) -> None:
    import numpy as np

    if args.whitening is not None and args.scheduler is not None:
        raise UsageError(
            "--whitening computes on this machine (tracin.distributed.self_influence does not whiten): give "
            "--whitening or --scheduler, not both"
        )
    if args.whitening is not None and args.device == "cuda":
        raise UsageError("--whitening computes in float64 on the CPU: give --whitening or --device cuda, not both")
    _check_scheduler(args)
    _check_whitening_name(args.whitening)
    out = _check_output(args.output, (".csv",))
    _check_not_read(out, {"--whitening": args.whitening, "path": args.path})
    _check_stdout(out)  # not after the whole pass
    _check_device(args)
    store = _open_store(args.path, "path", args.allow_partial)
    _check_self_influence_store(store, args.path)
    whitening = None if args.whitening is None else _load_whitening(args.whitening)
    if whitening is not None:
        _warn_fitted_elsewhere(whitening, store, "path")
    with _cluster(args) as client:
        if whitening is not None:
            scores = _whitened_self_influence(whitening, store, args)
        else:
            try:
                scores = _self_influence(store, client, args)
            except ValueError as e:
                raise _sides_named(e, {"train": f"path {args.path}"}) from e
    order = np.argsort(-scores, kind="stable")[: args.top]
    ids = _ids(store, "path")  # before the output is opened
    whitened = "whitened " if whitening is not None else ""
    summary = f"{whitened}self-influence of {store.n_rows} rows, {len(order)} ranked"

    _write_ranking(out, RANKING_HEADER, order, scores, ids, summary, args)


def _self_influence(store: Any, client: Any, args: argparse.Namespace) -> Any:
    """tracin.self_influence of the store, or tracin.distributed.self_influence on the cluster `client`."""
    import tracin

    if client is None:
        return tracin.self_influence(store, num_threads=args.threads, progress=_progress(args), device=args.device)
    from . import distributed

    return distributed.self_influence(store, client=client, num_threads=args.threads, progress=_progress(args))


def cmd_aggregate(args: argparse.Namespace) -> None:
    import numpy as np

    import tracin

    _check_whitening_options(args)
    _check_scheduler(args)
    _check_whitening_name(args.whitening)
    out = _check_output(args.output, (".csv",))
    _check_not_read(out, {"--whitening": args.whitening, "--test": args.test, "--train": args.train})
    _check_stdout(out)  # not after the whole pass
    _check_device(args)
    test = _open_store(args.test, "--test", args.allow_partial)
    train = _open_store(args.train, "--train", args.allow_partial)
    whitening = _whitening_for(args, test, train)
    options = {"num_threads": args.threads, "progress": _progress(args), "normalize": args.normalize}
    with _scoring_refusals(args, whitening):
        scored, scale = (test, 1.0) if whitening is None else _whitened_sum(whitening, test, args)
        with _cluster(args) as client:  # after the whitening: one refused is told at once
            if client is None:
                sums = tracin.aggregate(scored, train, device=args.device, **options)
            else:
                from . import distributed

                sums = distributed.aggregate(scored, train, client=client, **options)
        if scale != 1.0:  # the aggregate of the scaled sum, times the divisor: in float64, refused beyond float32
            from .scoring import _refuse_float32_overflow

            total = sums.astype(np.float64) * scale
            _refuse_float32_overflow(total)
            sums = total.astype(np.float32)
    lowest = args.side == "opponents"
    order = np.argsort(sums if lowest else -sums, kind="stable")[: args.top]
    ids = _ids(train, "--train")  # before the output is opened
    scores = " (cosine scores)" if args.normalize else " (whitened)" if whitening is not None else ""
    rows = f"{test.n_rows} test rows on {train.n_rows} train rows"
    summary = f"aggregate{scores} influence of {rows}, {len(order)} ranked{', lowest first' if lowest else ''}"

    _write_ranking(out, AGGREGATE_HEADER, order, sums, ids, summary, args)


def _whitened_sum(whitening: Any, test: Any, args: argparse.Namespace) -> tuple[Any, float]:
    """For aggregate --whitening: the sum of the --test store's rows per checkpoint (float64, a chunk of rows at a
    time, NaN rows refused as Whitening.apply refuses them) whitened as one row (Whitening.apply of float32
    Gradients, --test's weights and metadata), and what to multiply their aggregate by (1.0 but in the fallback
    below): whitening is linear, so the aggregate of that row is the aggregate of the whitened rows, without test
    rows x dims whitened and held in memory. A checkpoint whose sum or its whitening is beyond float32 (where every
    row's may fit: fr375 F1) has its sum divided by the least power of 2 m_c (at most the one at or above the row
    count, which puts the row within the largest row's whitening) that brings both within float32, and its
    whitened row given m_c times (the library sums the test side's columns in float64: exactly m_c times the row),
    the other checkpoints' rows kept whole (one divisor for all made their float32 subnormals lose bits: review378
    F1). Where those m rows would take over _COPIES_BYTES, every checkpoint's sum is divided by the largest m_c
    instead, and that m returned as the factor. A factored --test whitened row by row, factor 1 (a sum of K-FAC
    rows is no K-FAC row)."""
    import numpy as np

    import tracin

    from ._progress import progress_bar
    from .whitening._moments import finite_float32, row_ranges

    if test.factored:
        return _whitened(whitening, test, "--test", args), 1.0
    sums = [np.zeros(d, dtype=np.float64) for d in test.dims]
    bar = progress_bar(test.n_rows, _progress(args), "tracin aggregate: summing --test", unit="row")
    try:
        for start, stop in row_ranges(test):
            for total, block in zip(sums, finite_float32(test, "test", start, stop), strict=True):
                total += block.sum(0, dtype=np.float64)
            bar.update(stop - start)
    finally:
        bar.close()
    weights = test.weights if test.weights_given else None
    cap = 2 ** math.ceil(math.log2(test.n_rows)) if test.n_rows > 1 else 1
    copies = [1] * len(sums)

    def rows() -> list:
        with np.errstate(over="ignore"):
            return [(total / m)[None].astype(np.float32) for total, m in zip(sums, copies, strict=True)]

    for c in range(len(sums)):  # the sum itself beyond float32
        while copies[c] < cap and not np.isfinite(rows()[c]).all():
            copies[c] *= 2
    while True:
        try:
            white = _whitened(whitening, tracin.Gradients(rows(), weights, metadata=test.metadata), "--test", args)
            break
        except CommandError as e:
            found = _WHITENED_OVERFLOW.search(str(e))
            if found is None or cap == 1:  # (one row: row 0 it is)
                raise
            c = int(found[1])
            if copies[c] >= cap:  # the row at or below the largest whitened row: one of those overflows
                raise CommandError(
                    str(e).replace("(rows from 0)", "(the sum of the rows, scaled: so the largest row's does)")
                ) from e
            copies[c] *= 2
    most = max(copies)
    if most == 1:
        return white, 1.0
    if most * 4 * sum(test.dims) > _COPIES_BYTES:  # one divisor for all: the whitened row is linear in it
        matrices = [m * (n / most) for m, n in zip(white.matrices, copies, strict=True)]
        return tracin.Gradients(matrices, weights, metadata=white.metadata), float(most)
    matrices = []
    for m, n in zip(white.matrices, copies, strict=True):
        block = np.zeros((most, m.shape[1]), dtype=np.float32)
        block[:n] = m
        matrices.append(block)
    return tracin.Gradients(matrices, weights, metadata=white.metadata), 1.0


# Whitening.apply's refusal of a whitened row beyond float32, naming its checkpoint (a full --test's)
_WHITENED_OVERFLOW = re.compile(r"whitened test checkpoint ([0-9]+) overflowed float32 \(rows from 0\)")
# the most memory aggregate --whitening gives the copies of a whitened sum divided by m_c (_whitened_sum)
_COPIES_BYTES = 64 * 2**20


def _write_ranking(
    out: Path | None,
    header: list[str],
    order: Any,
    values: Any,
    ids: list | None,
    summary: str,
    args: argparse.Namespace,
) -> None:
    """A ranking of train rows as CSV (`header`: rank, train_row, train_id, value), one line per row of `order`
    with its `values[row]`, to `out` or stdout; `summary` to stderr."""

    def write(f: IO[str]) -> None:
        rows = ([rank, i, ids[i] if ids else i, f"{values[i]:{FLOAT32}}"] for rank, i in enumerate(order.tolist(), 1))
        _write_csv(f, header, rows, len(order), _progress(args), ids=(ids,))

    _written(out, write, summary)


def _written(out: Path | None, write: Callable[[IO[str]], None], summary: str) -> None:
    """write(f) to the text file `out` (None: stdout), then `summary` on stderr (naming `out`)."""
    if out is None:
        with _stdout(WRITE_A_FILE) as f:
            write(f)
        print(summary, file=sys.stderr)
    else:
        with _output_file(out) as f:
            write(f)
        # to stderr: stdout may be the output (-o x.csv, a link to /dev/stdout or to a FIFO)
        print(f"{summary}: wrote {_path_text(out)}", file=sys.stderr)


def _whitened_self_influence(whitening: Any, store: Any, args: argparse.Namespace) -> Any:
    """tracin.self_influence(store, whitening=whitening); a refusal of the store's rows (another layout, dims or
    gradient space than the whitening was fitted on, a NaN row) names path and --whitening."""
    import tracin

    from .scoring import CheckpointMismatchError, fitted_elsewhere_told, sides_worded
    from .store import StoreFormatError

    # checkpoints given differently for path and the whitening's gradients: warned of in the options' words
    words = {"train": "path", "the gradients the whitening was fitted on": "the gradients --whitening was fitted on"}
    try:
        with fitted_elsewhere_told(), sides_worded(words):  # fitted on another store than path's: warned as such
            return tracin.self_influence(store, num_threads=args.threads, progress=_progress(args), whitening=whitening)
    except StoreFormatError:  # a store changed or damaged while read: _run names it as such
        raise
    except CheckpointMismatchError as e:  # the library's advice (drop a metadata record) is not for a shell
        raise CommandError(_fitted_mismatch(e, "path")) from e
    except ValueError as e:
        raise CommandError(f"--whitening applied to path: {_unadvised(e)}{_mismatch_advice(e, 'path')}") from e


def _check_self_influence_store(store: Any, path: str) -> None:
    """Refuses, before any work, the stores whose rows have no self-influence the command line can
    compute, in the command line's terms (the library's errors advise Python calls)."""
    from .scoring import _preconditioner_kind

    if "whitening" in store.metadata:
        raise CommandError(
            f"path: gradient store {path} holds whitened rows, whose squared norms are not the whitened "
            "self-influence; give the store of the unwhitened rows, with --whitening FILE (the whitening's "
            "Whitening.save file) for the whitened self-influence"
        )
    if _preconditioner_kind(store.metadata) == "adam_update":
        raise CommandError(
            f"path: gradient store {path} holds preconditioner='adam_update' rows (Adam's next steps, made to be "
            "scored against plain test rows), whose squared norms are no self-influence; give a store of the same "
            "examples exported with preconditioner None or 'adam'"
        )


def cmd_bench(args: argparse.Namespace) -> None:
    from . import selfbench

    base = selfbench.QUICK if args.quick else selfbench.BenchConfig()
    sizes = {name: getattr(args, name) for name in ("m", "n", "d", "k", "repeats") if getattr(args, name) is not None}
    config = selfbench.BenchConfig(**{**base.__dict__, **sizes, "threads": args.threads})
    need, have = _bench_bytes(config), process_memory()
    if have is not None and need > have:
        raise CommandError(
            f"-m {config.m} -n {config.n} -d {config.d} -k {config.k} need about {need / 2**30:,.1f} GiB of memory "
            f"(float32 data, its float64 check, the results), more than the {have / 2**30:,.1f} GiB this process may "
            "use (physical memory, cgroup limit, ulimit -v); "
            "give smaller -m / -n / -d"
        )
    with _stdout() as out:  # a stdout that cannot be written is refused before the timing runs
        print(selfbench.problem(config), file=out, flush=True)  # what is timed, before the seconds of timing
        result = selfbench.run(config, status=lambda line: print(f"  {line} ...", file=sys.stderr, flush=True))
        print(selfbench.timings(result), file=out)


def _bench_bytes(config: Any) -> int:
    """Bytes `tracin bench` holds at least: float32 test and train rows, the float64 check's scores and
    bounds of its checked rows (and their boolean comparison) and its float64 chunk of train rows,
    NumPy's float32 scores of a chunk of test rows with their int64 argpartition, and two (m, min(k, n))
    results of float32 values and int64 indices."""
    from .selfbench import CHECK_TRAIN_ROWS, CHECKED_ROWS, numpy_chunk_rows

    m, n, d = config.m, config.n, config.d
    check = 17 * min(CHECKED_ROWS, m) * n + 8 * min(CHECK_TRAIN_ROWS, n) * d  # scores, bounds, their comparison
    return 4 * (m + n) * d + check + 12 * min(m, numpy_chunk_rows(n)) * n + 2 * 12 * m * min(config.k, n)


def cmd_demo(args: argparse.Namespace) -> None:
    from ._progress import stderr_is_a_terminal

    if not args.output:  # Path("") would be the current folder
        raise UsageError("-o/--output must name a folder, got ''")
    if args.checkpoints is not None and args.checkpoints > args.epochs:
        raise UsageError(f"--checkpoints ({args.checkpoints}) must be at most --epochs ({args.epochs})")
    bars = not args.no_progress and stderr_is_a_terminal()  # none drawn into a log
    try:  # the demo extra, imported up front: found missing only after training, it would waste the run
        import matplotlib  # noqa: F401
        import sklearn.datasets  # noqa: F401
        import threadpoolctl  # noqa: F401

        if bars:
            import tqdm  # noqa: F401

        from .demo import DemoConfig, run_demo
        from .demo.training import TrainingConfig
    except ImportError as e:
        instead = ", or pass --no-progress (tqdm draws only the progress bars)" if e.name == "tqdm" else ""
        raise CommandError(f"the demo needs the demo extra: pip install 'tracin[demo]'{instead} ({e})") from e
    # no --checkpoints: None, TrainingConfig's default, min(DEFAULT_CHECKPOINTS, epochs), as in the Python API
    training = TrainingConfig(epochs=args.epochs, checkpoints=args.checkpoints, seed=args.seed)
    config = DemoConfig(
        noise=args.noise, seed=args.seed, output=Path(args.output), training=training, framework=args.framework
    )
    run_demo(config, progress=bars)


# -- parser --------------------------------------------------------------------------------------
def _argument_type(parse: Callable[[str], Any], accepts: Callable[[Any], bool], expected: str) -> Callable:
    """An argparse type: parse(text), refused with 'expected <expected>, got <text>' if parse fails
    or accepts(value) is false."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return convert


positive_int = _argument_type(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _argument_type(int, lambda v: v >= 0, "an integer >= 0")
fraction = _argument_type(float, lambda v: 0 <= v < 1, "a number in [0, 1)")  # NaN is refused too
thread_count = _argument_type(int, lambda v: 1 <= v <= MAX_THREADS, f"a positive integer no larger than {MAX_THREADS}")
WORKERS_PER_CORE = 4  # the most --workers per usable core: more single-threaded processes only share the cores


def _worker_count() -> Callable[[str], int]:
    """The argparse type of --workers: a LocalCluster of at most WORKERS_PER_CORE processes per usable core
    (one starting 100000, a typo, sat in Dask's setup for good, growing, deaf to Ctrl-C)."""
    cores = usable_cores()
    most = WORKERS_PER_CORE * cores
    return _argument_type(
        int,
        lambda v: 1 <= v <= most,
        f"a positive integer no larger than {most} ({WORKERS_PER_CORE} per usable core, {cores} here)",
    )


def _scoring_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help="kernel threads (default: every CPU this process may run on; with --scheduler, per task: each host's "
        "cores shared)",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS|local",
        help="run on a Dask cluster (pip install 'tracin[distributed]'): a scheduler's address "
        "(tcp://host:8786; every worker must see the stores at the same paths), or local "
        "for a LocalCluster on this machine",
    )
    p.add_argument(
        "--workers",
        type=_worker_count(),
        default=None,
        help=f"with --scheduler local: worker processes, one thread each, at most {WORKERS_PER_CORE} per core "
        "(default: one per core)",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="where to score: cpu (the C++ kernel; the default) or cuda (the current GPU, through torch, "
        "the stores' rows streamed to it; needs torch with CUDA; not with --scheduler)",
    )
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="score an unfinished store's rows written so far instead of refusing it",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (one appears for long runs where stderr is a terminal)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tracin",
        description="TracIn training-data influence: proponents, opponents, self-influence.",
        epilog=EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.set_defaults(commands=sub.choices)  # each command's parser, for its errors (_parse)

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("info", "describe a gradient store", cmd_info)
    p.add_argument("path", help="gradient store directory")

    p = command("score", "top-k proponents/opponents of test rows among train rows", cmd_score)
    p.add_argument("--test", required=True, help="test gradient store")
    p.add_argument("--train", required=True, help="train gradient store")
    p.add_argument("-k", type=positive_int, default=10, help="train rows per test row")
    p.add_argument(
        "--side",
        choices=["proponents", "opponents", "both"],
        default="proponents",
        help="proponents: the k highest scores, largest first; opponents: the k lowest, most negative first "
        "(when fewer than k scores have a side's sign, it also lists scores of 0 or of the other sign)",
    )
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="result file, .npz (arrays SIDE_values, SIDE_indices) or .csv; a FIFO or a device (/dev/stdout) gets "
        "CSV unless its name ends in .npz (default: CSV on stdout)",
    )
    p.add_argument(
        "--normalize",
        action="store_true",
        help="cosine scores: each gradient unit-normalised per checkpoint, then weighted and summed "
        "(tracin.top_k(normalize=True))",
    )
    p.add_argument(
        "--whitening",
        default=None,
        metavar="FILE",
        help="whitened TracIn, sum_c w_c g_c(test)^T (R_c + lambda_c I)^-1 g_c(train): FILE is a tracin.Whitening "
        "saved with Whitening.save, fitted on --train's gradients; the --test rows are whitened with it "
        "(Whitening.apply, held in memory: float32, test rows x dims) and scored against --train as it is; "
        "not with --normalize",
    )
    _scoring_options(p)

    p = command("self-influence", "rank training rows by self-influence (mislabel search)", cmd_self_influence)
    p.add_argument("path", help="train gradient store")
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="CSV ranking (.csv, or a FIFO or a device), highest first (default: stdout)",
    )
    p.add_argument("--top", type=positive_int, default=None, help="keep only the first N rows (default: all)")
    p.add_argument(
        "--whitening",
        default=None,
        metavar="FILE",
        help="whitened self-influence, sum_c w_c g_c^T (R_c + lambda_c I)^-1 g_c: FILE is a tracin.Whitening "
        "saved with Whitening.save, fitted on these gradients (tracin.self_influence(whitening=)); float64 on "
        "this machine's CPU: not with --scheduler or --device cuda",
    )
    _scoring_options(p)

    p = command(
        "aggregate",
        "rank train rows by their influence summed over all test rows (a target set: data selection)",
        cmd_aggregate,
    )
    p.add_argument("--test", required=True, help="test (target set) gradient store")
    p.add_argument("--train", required=True, help="train gradient store")
    p.add_argument(
        "--side",
        choices=["proponents", "opponents"],
        default="proponents",
        help="proponents: the highest sums first (the rows that helped the test set most); opponents: the lowest "
        "first, most negative first (the rows that hurt it most: mislabelled or harmful data)",
    )
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="CSV ranking (.csv, or a FIFO or a device), in --side's order (default: stdout)",
    )
    p.add_argument("--top", type=positive_int, default=None, help="keep only the first N rows (default: all)")
    p.add_argument(
        "--normalize",
        action="store_true",
        help="cosine scores: each gradient unit-normalised per checkpoint, then weighted and summed "
        "(tracin.aggregate(normalize=True))",
    )
    p.add_argument(
        "--whitening",
        default=None,
        metavar="FILE",
        help="whitened TracIn summed over --test, sum_c w_c (sum_t g_c(t))^T (R_c + lambda_c I)^-1 g_c(train): FILE "
        "is a tracin.Whitening saved with Whitening.save, fitted on --train's gradients; the --test rows are "
        "summed per checkpoint and that one row whitened with it (Whitening.apply; a factored --test's rows are "
        "whitened one by one, held in memory: float32, test rows x dims); not with --normalize",
    )
    _scoring_options(p)

    p = command("bench", "time tracin.top_k against NumPy (matmul + argpartition) on generated data", cmd_bench)
    p.epilog = "The full peer benchmark (faiss, torch, roofline) is `python -m benchmarks.kernel` in a source checkout."
    p.add_argument("--quick", action="store_true", help="a small problem (seconds), for a smoke test")
    for name, text in (
        ("m", "test rows"),
        ("n", "train rows"),
        ("d", "dims per row"),
        ("k", "top-k per test row"),
        ("repeats", "timed calls of each, after a warm-up"),
    ):
        flag = f"-{name}" if len(name) == 1 else f"--{name}"
        p.add_argument(
            flag,
            dest=name,
            type=positive_int,
            default=None,
            help=f"{text} (default: {getattr(_bench_defaults(), name)}, "
            f"{getattr(_bench_defaults(quick=True), name)} with --quick)",
        )
    p.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help="tracin's threads (default: every CPU this process may run on); NumPy's BLAS keeps its own "
        "(OPENBLAS_NUM_THREADS)",
    )

    from .demo.training import DEFAULT_CHECKPOINTS, MAX_EPOCHS  # NumPy only: the demo extra is imported by cmd_demo

    p = command("demo", "find mislabelled digits with TracIn (needs tracin[demo])", cmd_demo)
    p.add_argument(
        "--framework",
        choices=["numpy", "jax", "torch"],
        default="numpy",
        help="what trains the model and computes its gradients (numpy needs no extra; torch and jax need "
        "their extras: pip install 'tracin[torch]' or 'tracin[jax]')",
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed of data, noise and training")
    p.add_argument("--noise", type=fraction, default=0.2, help="fraction of training labels flipped, in [0, 1)")
    p.add_argument(
        "--checkpoints",
        type=positive_int,
        default=None,
        help=f"checkpoints saved during training (the recipe: one every ~10%%) (default: {DEFAULT_CHECKPOINTS}, "
        "or --epochs if fewer)",
    )
    p.add_argument(
        "--epochs",
        type=_argument_type(int, lambda v: 1 <= v <= MAX_EPOCHS, f"a positive integer no larger than {MAX_EPOCHS}"),
        default=150,
        help=f"training epochs, at most {MAX_EPOCHS}",
    )
    p.add_argument("-o", "--output", default="tracin-demo-output", help="output folder")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars (none either where stderr is not a terminal)"
    )
    return parser


def _version() -> str:
    """What `tracin --version` prints: the package version and the instruction set of the kernel here."""
    from . import __version__, detect_isa

    return f"tracin {__version__} (kernel: {detect_isa()})"


def _bench_defaults(quick: bool = False) -> Any:
    from . import selfbench

    return selfbench.QUICK if quick else selfbench.BenchConfig()


# -- entry point ---------------------------------------------------------------------------------
def _path_text(path: Path) -> str:
    """`path` for a message line: store._format.printable's escapes (as `tracin info` shows a store's
    path), so that a name that is not valid text (bytes undecodable in the file system's encoding,
    lone surrogates in Python) prints under a strict stdout encoding instead of failing the command."""
    return printable(str(path))


def _one_line(e: BaseException) -> str:
    """The message of `e` on one line, other control characters escaped (it may quote a store's strings)."""
    return printable(" ".join(str(e).split())) or type(e).__name__


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds the command as Ctrl-C does, so temporary files go."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _signal_exception(signum: int, then: BaseException | None = None) -> BaseException:
    """What a signal raises in the command: KeyboardInterrupt for SIGINT, else _Terminated; `then`:
    the error raised while it unwound, or after it was swallowed, which main names with it."""
    e = KeyboardInterrupt() if signum == signal.SIGINT else _Terminated(signum)
    e.tracin_then = then  # type: ignore[attr-defined]
    return e


def _signal_cause(e: BaseException) -> tuple[BaseException, BaseException] | None:
    """The KeyboardInterrupt or _Terminated among the causes and contexts of `e` (both links of
    each exception followed, each exception once) and the exception that links to it, raised while
    it unwound; None if there is none. pybind11, for one, turns a Ctrl-C while the C++ extension
    initialises into ImportError('initialization failed') raised from it."""
    stack, seen = [e], set()
    while stack:
        error = stack.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        for link in (error.__cause__, error.__context__):
            if isinstance(link, (KeyboardInterrupt, _Terminated)):
                return link, error
            if link is not None:
                stack.append(link)
    return None


def _show_warning(
    command: str, shown: set[str], message: Warning | str, category: type[Warning], *_: Any, **__: Any
) -> None:
    """A warning as one line on stderr, `tracin COMMAND: warning: ...` (not Python's file:line and source),
    unless the command showed that line before (`shown`: one store on both sides of `score` warns once).
    A stderr that fails (a reader that went away) drops the warning, as Python's own showwarning does."""
    line = f"tracin {command}: warning: {printable(' '.join(str(message).split())) or category.__name__}"
    if line in shown:
        return
    shown.add(line)
    try:
        print(line, file=sys.stderr)
    except OSError:
        pass


def _run(args: argparse.Namespace, received: list[int]) -> int:
    """Runs the command; returns the exit code, failures reported as one line on stderr. An error
    while a signal unwinds the command, or after one was `received`, is raised as that signal."""
    from .store import StoreChangedError, StoreFormatError

    prefix = f"tracin {args.command}: error:"
    try:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = partial(_show_warning, args.command, set())
                args.func(args)
        except Exception as e:
            found = _signal_cause(e)
            if found is not None:
                signum = found[0].signum if isinstance(found[0], _Terminated) else signal.SIGINT
                raise _signal_exception(signum, then=found[1]) from e
            if received:  # the signal's exception was swallowed on the way (JAX's gc callback does)
                raise _signal_exception(received[0], then=e) from e
            raise
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        raise
    except CommandError as e:
        print(f"{prefix} {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except StoreChangedError as e:
        print(f"{prefix} gradient store changed while reading: {_one_line(e)}", file=sys.stderr)
        return 1
    except StoreFormatError as e:
        print(f"{prefix} malformed gradient store: {_one_line(e)}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        extra = MODULE_EXTRAS.get((e.name or "").partition(".")[0]) or EXTRAS.get(args.command)
        hint = f"pip install 'tracin[{extra}]'" if extra else f"pip install the package providing {e.name}"
        print(f"{prefix} missing module {e.name!r}: {hint}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError, MemoryError, Warning) as e:  # Warning: made an error (-W error)
        print(f"{prefix} {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


REDELIVER_S = 0.05  # after this delay a signal's exception that Python could only print is raised again
UNWIND_S = 1.0  # after a signal's exception is raised, further signals this long are only recorded (the cleanup
# it runs, as removing an -o's temporary file, is not cut short by an impatient second Ctrl-C)
_DEFAULTS = {"SIGINT": signal.default_int_handler, "SIGTERM": signal.SIG_DFL, "SIGHUP": signal.SIG_DFL}


@contextmanager
def _signals_unwind(received: list[int]) -> Iterator[Callable[[], None]]:
    """Until the yielded stop_raising() is called (once the command has run), SIGINT raises KeyboardInterrupt
    and SIGTERM and SIGHUP raise _Terminated (where they would kill the process outright), each signal
    appended to `received` first, so that main reports it even if something swallows the exception. One
    swallowed where Python can only print it ('Exception ignored in' a gc callback, as JAX's) is raised
    again in the main thread REDELIVER_S later instead of printed. A signal within UNWIND_S of the one
    whose exception was raised is only appended (an impatient second Ctrl-C does not cut short the cleanup
    the first runs, as removing an -o's temporary file), as is every signal after stop_raising(), until the
    block ends (a second Ctrl-C while main reports the first prints no traceback).
    Only Python's default handlers are replaced (an ignored SIGINT stays ignored); they and
    sys.unraisablehook are restored after the block."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    active, lock = [True], threading.Lock()
    raised_at: list[float | None] = [None]  # when a signal's exception was last raised (time.monotonic)

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        if not active[0]:
            return
        now = time.monotonic()
        if raised_at[0] is not None and now - raised_at[0] < UNWIND_S:  # the command is unwinding: let it clean up
            return
        raised_at[0] = now
        raise _signal_exception(signum)

    def redeliver(signum: int) -> None:
        with lock:
            if active[0]:
                raised_at[0] = None  # the exception raised was swallowed: nothing is unwinding
                if hasattr(signal, "pthread_kill"):
                    signal.pthread_kill(threading.main_thread().ident, signum)  # wakes a blocked wait
                else:  # Windows: raised at the main thread's next bytecode
                    _thread.interrupt_main(signum)

    def unraisable(u: Any) -> None:
        if received and u.exc_type is not None and issubclass(u.exc_type, (KeyboardInterrupt, _Terminated)):
            timer = threading.Timer(REDELIVER_S, redeliver, (received[-1],))
            timer.daemon = True
            timer.start()
        else:
            hook(u)

    def stop_raising() -> None:
        with lock:  # no redelivery either
            active[0] = False

    signums = [getattr(signal, n) for n in _DEFAULTS if hasattr(signal, n)]
    before = {s: signal.getsignal(s) for s in signums}
    hook = sys.unraisablehook
    try:
        sys.unraisablehook = unraisable
        for s, h in before.items():
            if h is _DEFAULTS[s.name]:
                signal.signal(s, handler)
        yield stop_raising
    finally:
        try:
            stop_raising()
        finally:
            for s, h in before.items():
                signal.signal(s, h)
            sys.unraisablehook = hook


_SIGNAL_WORDS = {"SIGINT": "interrupted", "SIGHUP": "hung up (SIGHUP)"}


def drop_output(stream: IO[str]) -> None:
    """Points `stream`'s descriptor at /dev/null, so that what is still buffered cannot fail again at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


def _report_signal(command: str, signum: int, error: BaseException | None, ran_on: bool = False) -> int:
    """Prints that the command was interrupted or terminated (and the error raised while it unwound,
    if _run named one; not just any cause: JAX's tracebacks are causes; or that it `ran_on` to the end)
    and returns 128 + signum, also where the terminal is gone and nothing can be printed."""
    name = signal.Signals(signum).name
    what = _SIGNAL_WORDS.get(name, f"terminated ({name})")
    cause = getattr(error, "tracin_then", None)
    then = f" (then: {_one_line(cause)})" if cause is not None else ""
    after = ", but it ran to the end (output written)" if ran_on else ""
    message = f"tracin {command}: {what}{then}{after}\n"
    for stream, text in ((sys.stdout, ""), (sys.stderr, message)):  # what stdout holds goes first
        if stream is None:  # started with that descriptor closed (`2>&-`)
            continue
        try:
            stream.write(text)
            stream.flush()
        except OSError:  # a hangup closed the terminal (or a reader went away): the exit code stays
            try:
                drop_output(stream)
            except (OSError, ValueError):  # no descriptor (an in-memory stream)
                pass
    return 128 + signum


@contextmanager
def _standard_streams() -> Iterator[None]:
    """Where the command started with stdout or stderr closed (`>&-`, `2>&-`: Python's sys.stdout or
    sys.stderr is None), a stand-in writing to /dev/null, marked CLOSED, for the command's run (sys.stdout
    or sys.stderr is None again after it); without it, print(file=None) writes to sys.stdout (a message
    amid the results) and print(file=sys.stdout) fails with a traceback. A descriptor 1 or 2 that is
    itself closed is opened on /dev/null, so that no file the command opens gets it (what a library's C
    code writes there would land in that file), and stays open on /dev/null after main returns, for the
    rest of the process: closing it again would let the next file the process opens take descriptor 1
    or 2, and what is written to that descriptor would land in it."""
    opened: list[tuple[str, IO[str]]] = []
    try:
        for name, fd in (("stdout", 1), ("stderr", 2)):
            if getattr(sys, name) is not None:
                continue
            try:
                os.fstat(fd)
                stream = open(os.devnull, "w")  # noqa: SIM115 (closed below)
            except OSError:  # the descriptor itself is closed
                devnull = os.open(os.devnull, os.O_WRONLY)
                if devnull != fd:
                    os.dup2(devnull, fd)
                    os.close(devnull)
                stream = open(fd, "w", closefd=False)  # noqa: SIM115
            setattr(stream, CLOSED, True)
            setattr(sys, name, stream)
            opened.append((name, stream))
        yield
    finally:
        for name, stream in opened:
            if getattr(sys, name) is stream:
                setattr(sys, name, None)
            stream.close()


def main(argv: list[str] | None = None) -> int:
    try:
        with _standard_streams():
            return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the command's handlers are set or after they are restored
        return 128 + signal.SIGINT


_SCORE_SIDES = {"--test", "--train"}  # score's options, which self-influence lacks


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line parsed; an unknown option or extra argument is the command's usage error
    (`tracin COMMAND: error: ...` after that command's usage), naming a close option where there is one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["self-influence"]:  # score's --test=T / --train=S split, so the hint below names them
        end = argv.index("--") if "--" in argv else len(argv)  # after "--" a path: a store named "--test=x"
        split = [part for a in argv[:end] for part in (a.split("=", 1) if a.split("=", 1)[0] in _SCORE_SIDES else [a])]
        argv = split + argv[end:]
    args, extra = build_parser().parse_known_args(argv)
    command = args.commands[args.command]
    if extra:
        close = difflib.get_close_matches(extra[0], list(command._option_string_actions), n=1)
        hint = f" (did you mean {close[0]}?)" if close and extra[0].startswith("-") else ""
        if args.command == "self-influence" and _SCORE_SIDES & set(extra):
            hint = " (self-influence reads one store, given as its path: tracin self-influence STORE)"
        command.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    del args.commands
    return args


def _main(argv: list[str] | None) -> int:
    args = _parse(argv)
    received: list[int] = []
    with _signals_unwind(received) as stop_raising:  # a second signal while the first is reported: recorded
        try:
            try:
                code = _run(args, received)
            finally:
                stop_raising()
        except BrokenPipeError:
            drop_output(sys.stdout)  # the reader went away
            if received:  # after a hangup, which closed the terminal: the hangup's exit code
                return _report_signal(args.command, received[0], None)
            return BROKEN_PIPE_EXIT
        except KeyboardInterrupt as e:
            return _report_signal(args.command, signal.SIGINT, e)
        except _Terminated as e:
            return _report_signal(args.command, e.signum, e)
        if received:  # the command ran on: something swallowed the signal's exception
            return _report_signal(args.command, received[0], None, ran_on=code == 0)
        return code


def console(argv: list[str] | None = None) -> None:
    """The `tracin` program (console script, python -m tracin; python -m tracin.demo with `argv` ["demo", ...]):
    main(argv), then, where a signal ended the command, SIGINT, SIGTERM and SIGHUP ignored while the process exits
    (Python's finalization restores their default action, by which a late second Ctrl-C would kill the process
    by SIGINT instead of exit code 130)."""
    code = main(argv)
    if code in {128 + getattr(signal, n) for n in _DEFAULTS if hasattr(signal, n)}:
        for name in _DEFAULTS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    console()
