"""Warnings raised by tasks on Dask workers: recorded there, sent back with the task's result, and
shown on the client once per distinct warning, naming the shards and worker that raised it."""

from __future__ import annotations

import builtins
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

from dask.sizeof import sizeof
from distributed import get_worker

from .._caller import _PACKAGE, user_stacklevel
from .._export.loss_watch import STARTS as _LOSS_WATCH_STARTS
from .._export.sinks import ZERO_STARTS as _ZERO_ROWS_STARTS
from ._cluster import worker_name

KEPT = 100  # distinct warnings a task keeps and sends back; more are counted (Warned.more), not kept
COUNTED = 10_000  # distinct warnings beyond KEPT a task tells apart (by hash) to count them; later ones are not counted
NOTED = 10  # warnings a failed task's error lists in its note
_NUMBERS = re.compile(r"\d+")  # what tells apart the shards' copies of one warning (the rows each names)
_OTHERS = 5  # other shards' copies of a warning whose differing words are listed with the first's
# (up to _ROW_SHARDS for the NaN-loss and all-0-rows warnings: the rows they name are what the user must fix,
# review343 L2; not every one of thousands of shards', a line of 100,000 characters: review360 F5)
_ROW_SHARDS = 50
# LossWatch's and ZeroRows' warnings: the rows named (one shard's "row 7 ..., its", another's "3 rows (1, 5, 9) ...,
# their": copies of one warning worded for their counts), then the checkpoint, if named
_ROWS_NAMED = re.compile(
    rf"({re.escape(_LOSS_WATCH_STARTS)}|{re.escape(_ZERO_ROWS_STARTS)})(.*?) of the data(?: at checkpoint (\d+))?:"
)

_LOCK = threading.Lock()
_local = threading.local()  # .handlers: this thread's handlers, innermost last; .showing: inside _show
_state: dict[str, Any] = {"users": 0, "next": None, "recorders": 0, "filters": None}  # see handled(), recorded()
_ALWAYS = "(?:)"  # recorded()'s "always" filter's message: every message, in a filter no one else adds


class Raised(NamedTuple):
    """A distinct warning a task raised: its category as (module, qualified name, the nearest built-in
    warning class above it), its message, where it was raised (file, line, module name or None), and the
    key of the task and the worker that raised it (None: a task not on a Dask worker); `ours`: raised by
    tracin's own code (a warning Dask's task runner may be the first frame outside tracin of, see _located)."""

    category: tuple[str, str, str]
    message: str
    filename: str
    lineno: int
    module: str | None
    task: str | None
    worker: str
    ours: bool = False


@dataclass(frozen=True)
class Warned:
    """A task's result `value` with the warnings it and the tasks before it raised (`more`: the distinct
    ones beyond KEPT a task, not sent). A result without warnings travels as it is."""

    value: Any
    raised: tuple[Raised, ...]
    more: int = 0


@sizeof.register(Warned)
def _sizeof(warned: Warned) -> int:
    """The bytes of a Warned result, its value's as Dask counts them (for the worker's memory limits)."""
    return sizeof(warned.value) + sizeof(list(warned.raised))


class Caught:
    """The warnings a thread raised inside recorded(), deduplicated as they come, so that memory stays
    bounded however many are raised: the first occurrence of each of the first KEPT distinct (category,
    message) (`kept`, in order), and the number of distinct ones beyond (`more`, told apart by hash, at
    most COUNTED of them)."""

    def __init__(self) -> None:
        self.kept: dict[tuple[type[Warning], str], warnings.WarningMessage] = {}
        self.ours: set[tuple[type[Warning], str]] = set()  # keys of `kept` that tracin's own code raised
        self._beyond: set[int] = set()

    @property
    def more(self) -> int:
        return len(self._beyond)

    def add(self, message: Any, category: type[Warning], filename: str, lineno: int, ours: bool = False) -> None:
        key = (category, str(message))
        if key in self.kept:
            return
        if len(self.kept) < KEPT:
            self.kept[key] = warnings.WarningMessage(message, category, filename, lineno)
            if ours:
                self.ours.add(key)
        elif len(self._beyond) < COUNTED:
            self._beyond.add(hash(key))


@contextmanager
def handled(handler: Callable[[Any, type[Warning], str, int], bool]) -> Iterator[None]:
    """Every warning this thread shows inside passed to `handler(message, category, filename, lineno)`
    first, which returns True to take it (recorded, or dropped) or False to let it be shown as before (by
    the thread's outer handlers, innermost first, then by the showwarning there was).
    warnings.showwarning is replaced by one function, _show, while any thread of the process is inside
    (the first in installs it, the last out puts back the showwarning before it, unless replaced since):
    the client's passes (_export._shown_once) and the tasks' recordings (recorded(), on a worker thread
    of the client's process with Client(processes=False)) share it, so that neither ever hands warnings
    to the other's (each saving the other's as the one before made a cycle: review343 H1)."""
    with _LOCK:
        if _state["users"] == 0:
            if warnings.showwarning is not _show:  # else left by a catch_warnings another thread entered meanwhile
                _state["next"] = warnings.showwarning
            warnings.showwarning = _show
        _state["users"] += 1
    handlers = getattr(_local, "handlers", None)
    if handlers is None:
        handlers = _local.handlers = []
    handlers.append(handler)
    try:
        yield
    finally:
        handlers.pop()
        with _LOCK:
            _release()


def _release() -> None:
    """One user of _show less (under _LOCK): the last puts back the showwarning before it, unless replaced."""
    _state["users"] -= 1
    if _state["users"] == 0 and warnings.showwarning is _show:
        warnings.showwarning = _state["next"]


def _show(
    message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    """warnings.showwarning while handled() is used: the thread's handlers, innermost first, then the
    showwarning before. A warning shown while this thread is in here already (a showwarning installed since,
    handing warnings back to this one) is shown by Python's own showwarning instead: never a loop."""
    if getattr(_local, "showing", False):
        warnings._showwarning_orig(message, category, filename, lineno, file, line)  # type: ignore[attr-defined]
        return
    _local.showing = True
    try:
        for handler in reversed(getattr(_local, "handlers", None) or ()):
            if handler(message, category, filename, lineno):
                return
        show = _state["next"]
        (warnings._showwarning_orig if show is None or show is _show else show)(  # type: ignore[attr-defined]
            message, category, filename, lineno, file, line
        )
    finally:
        _local.showing = False


@contextmanager
def recorded() -> Iterator[Caught]:
    """Every warning raised on this thread inside, whatever the filters (as simplefilter("always")),
    added to the Caught yielded instead of shown (its first occurrence, see Caught).
    The filters are the whole process's, and a worker runs tasks on several threads at once: the first
    thread in adds one "always" filter for all, the last one out takes out that filter only (not the
    filters as it found them: a catch_warnings the client's thread left meanwhile, with
    Client(processes=False), would have its filters put back for good); the showwarning is handled()'s,
    shared with the client's passes. A warnings.catch_warnings() another thread (one recording none: the
    client's) is in meanwhile takes or drops these threads' warnings while it lasts."""
    caught = Caught()
    with _LOCK:
        if _state["recorders"] == 0:
            warnings.filterwarnings("always", message=_ALWAYS)
            _state["filters"] = warnings.filters  # the list it is in: a catch_warnings entered since puts it back
        _state["recorders"] += 1

    def record(message: Any, category: type[Warning], filename: str, lineno: int) -> bool:
        caught.add(message, category, filename, lineno, ours=_warned_by_tracin())
        return True

    try:
        with handled(record):
            yield caught
    finally:
        with _LOCK:
            _state["recorders"] -= 1
            if _state["recorders"] == 0:
                _unfiltered()


def _unfiltered() -> None:
    """recorded()'s "always" filter taken out of the filters, if there (a catch_warnings left meanwhile may
    have put back filters without it), and out of the list it was added to (which a catch_warnings another
    thread entered meanwhile and leaves later puts back), and Python told they changed (its registries)."""
    for filters in (warnings.filters, _state["filters"]):
        for i, f in enumerate(filters):
            if f[0] == "always" and getattr(f[1], "pattern", None) == _ALWAYS and f[2] is Warning and f[3] is None:
                del filters[i]
                break
    _state["filters"] = None
    getattr(warnings, "_filters_mutated", lambda: None)()


def _warned_by_tracin() -> bool:
    """Whether the code that called warnings.warn (the first frame above this module's and the warnings
    module's) is tracin's: its warnings may point at Dask's task runner, the first frame outside tracin."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in (__file__, warnings.__file__):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(_PACKAGE)


def unwrapped(args: tuple) -> tuple[tuple, list[Raised], int]:
    """A task's arguments with the Warned results of the tasks before it (as arguments, or in a list
    argument) replaced by their values; the warnings they carried, and their count not sent."""
    raised: list[Raised] = []
    more = 0

    def value(x: Any) -> Any:
        nonlocal more
        if isinstance(x, Warned):
            raised.extend(x.raised)
            more += x.more
            return x.value
        return x

    out = tuple([value(y) for y in x] if isinstance(x, list) else value(x) for x in args)
    return out, raised, more


def carried(value: Any, earlier: list[Raised], more: int, caught: Caught) -> Any:
    """A task's result: `value`, or a Warned with the `earlier` warnings (of the tasks before it) and the
    distinct ones `caught` kept (raised here; those beyond KEPT counted in `more`)."""
    mine = _distinct(caught)
    if not earlier and not mine and not more and not caught.more:
        return value
    return Warned(value, (*earlier, *mine), more + caught.more)


def note_raised(e: BaseException, caught: Caught) -> None:
    """A note on a task's error `e` listing the warnings it raised before it (the first NOTED), if any."""
    mine = _distinct(caught)
    if not mine:
        return
    listed = "; ".join(f"{r.category[1]}: {r.message}" for r in mine[:NOTED])
    unlisted = max(len(mine) - NOTED, 0) + caught.more
    rest = f"; and {unlisted} more" if unlisted else ""
    add_note(e, f"tracin.distributed: the task warned on worker {mine[0].worker} before this error: {listed}{rest}")


def add_note(e: BaseException, note: str) -> None:
    """`note` added to e's notes, which travel with e to the client; before Python 3.11 (no add_note)
    recorded in e.__notes__ as add_note would (for the client to print)."""
    try:
        if hasattr(e, "add_note"):
            e.add_note(note)
        else:
            e.__notes__ = [*getattr(e, "__notes__", ()), note]
    except (AttributeError, TypeError):  # an exception that takes no attributes: as it is
        pass


def _distinct(caught: Caught) -> list[Raised]:
    """One Raised per warning `caught` kept (a distinct category and message, where it was first raised),
    in order; the module of each file looked up in one pass over sys.modules."""
    if not caught.kept:
        return []
    try:
        task, worker = get_worker().get_current_task(), worker_name()
    except (ValueError, KeyError):  # not running on a Dask worker (a task called directly)
        task, worker = None, worker_name()
    modules = _modules_by_file()
    return [
        Raised(
            _category_named(w.category),
            key[1],
            w.filename,
            w.lineno,
            modules.get(w.filename),
            task,
            worker,
            key in caught.ours,
        )
        for key, w in caught.kept.items()
    ]


def _category_named(category: type[Warning]) -> tuple[str, str, str]:
    """(module, qualified name, nearest built-in warning class): a client lacking the module (a
    package only the workers have) shows the warning as the built-in class."""
    base = next(c for c in category.__mro__ if c.__module__ == "builtins" and issubclass(c, Warning))
    return category.__module__, category.__qualname__, base.__name__


def _category(named: tuple[str, str, str]) -> type[Warning]:
    """The class _category_named named, as this process has it imported, else the built-in class."""
    found: Any = sys.modules.get(named[0])
    for part in named[1].split("."):
        found = getattr(found, part, None)
    if isinstance(found, type) and issubclass(found, Warning):
        return found
    return getattr(builtins, named[2])


def _modules_by_file() -> dict[str, str]:
    """The imported modules' names by their file (which warning filters' module= matches, as
    warnings.warn names it; the first name of a file imported under two)."""
    found: dict[str, str] = {}
    for name, module in list(sys.modules.items()):
        filename = getattr(module, "__file__", None)
        if isinstance(filename, str):
            found.setdefault(filename, name)
    return found


def _located(r: Raised, call: Any) -> tuple[str, int, str | None]:
    """Where to show `r` on the client: (file, line, module) where it was raised on the worker, or, for a
    tracin warning located in a file of Dask's or distributed's (pointing at the first frame outside tracin,
    on a worker Dask's task runner: review343 L4), the user's line that called into tracin (`call`, a frame),
    as a local export's warning is shown. Dask's own warnings stay where raised (filters by module apply)."""
    top = (r.module or "").partition(".")[0]
    if not r.ours or (top not in _DASK and not any(r.filename.startswith(d) for d in _dask_folders())):
        return r.filename, r.lineno, r.module
    return call.f_code.co_filename, call.f_lineno, call.f_globals.get("__name__")


_DASK = ("dask", "distributed")


def _dask_folders() -> list[str]:
    """The folders of the dask and distributed packages imported here (with a trailing separator)."""
    found = []
    for name in _DASK:
        file = getattr(sys.modules.get(name), "__file__", None)
        if isinstance(file, str):
            found.append(os.path.dirname(file) + os.sep)
    return found


def _others(found: list[Raised], firsts: dict[str, Raised], labels: dict[str, str], order: dict[str, int]) -> str:
    """What the other shards' copies of a warning (`found`, its copies differing in numbers only) say
    that the first shard's (`firsts`) do not: the words around their numbers that differ, a few shards'
    (the rows or checkpoints each names may be what the user must act on), up to _ROW_SHARDS shards' for
    the NaN-loss and all-0-rows warnings (LossWatch's, ZeroRows': they exist to name the rows to fix)."""
    seen: dict[str, str] = {}
    for r in sorted(found, key=lambda r: order.get(labels.get(r.task, ""), len(order))):
        if r.message not in firsts:
            seen.setdefault(r.message, labels.get(r.task, "a task merging shard results"))
    first = next(iter(firsts))
    limit = _ROW_SHARDS if _ROWS_NAMED.match(first) else _OTHERS
    listed = [f"{where}: '{_differing(message, first)}'" for message, where in list(seen.items())[:limit]]
    more = f" and {len(seen) - limit} more" if len(seen) > limit else ""
    return f"other shards' copies name other numbers: {'; '.join(listed)}{more}"


def _differing(message: str, first: str) -> str:
    """What `message`, a copy of the warning `first` (their words the same but for numbers), says that
    `first` does not: the rows (and checkpoint) a NaN-loss or all-0-rows warning names, else the words from
    the first that differs to the last."""
    if (named := _ROWS_NAMED.match(message)) is not None:
        _, rows, checkpoint = named.groups()
        return rows if checkpoint is None else f"{rows} at checkpoint {checkpoint}"
    base, words = first.split(" "), message.split(" ")
    start = next((i for i, (a, b) in enumerate(zip(base, words, strict=True)) if a != b), 0)
    end = next((i for i, (a, b) in enumerate(zip(reversed(base), reversed(words), strict=True)) if a != b), 0)
    return " ".join(words[start : len(words) - end])


def _copies(r: Raised) -> tuple:
    """What the shards' copies of one warning share: its category and message with every number a "#", or
    for tracin's own NaN-loss or all-0-rows warning, singular or plural, its kind (and its other wordings:
    ZeroRows' naming all of a shard's rows, LossWatch's with a 16-bit loss that may have overflowed, whose
    advice differs)."""
    if r.ours and (named := _ROWS_NAMED.match(r.message)) is not None:  # (another's warning may start alike)
        overflowed = re.search(r"a \w+ loss that overflowed", r.message)
        return r.category, named.group(1), named.group(2).startswith("all "), overflowed is not None
    return r.category, _NUMBERS.sub("#", r.message)


def show(raised: list[Raised], more: int, what: str, labels: dict[str, str], shards: int) -> None:
    """Each distinct (category, message) of `raised` warned once on the client, with warn_explicit at
    the line that raised it on the worker (so that the client's filters by category and module apply;
    one located in Dask's task runner, a tracin warning's on a worker, at the user's call, see _located),
    the message prefixed with the call (`what`), the first shard in the call's order that raised it
    (`labels`: task key -> shard, in the order submitted), its worker, and how many of the call's
    `shards` shard tasks raised it."""
    call = sys._getframe(user_stacklevel() - 1)  # the user's line that called into tracin
    order: dict[str, int] = {}  # shard -> its place among the call's (a chain's links share their part's)
    for label in labels.values():
        order.setdefault(label, len(order))
    grouped: dict[tuple, list[Raised]] = {}
    for r in raised:  # shards' copies of a warning naming their own rows ("rows 20 to 29") are one warning
        grouped.setdefault(_copies(r), []).append(r)
    for (category, *_), found in grouped.items():
        shown = sorted({labels[r.task] for r in found if r.task in labels}, key=order.__getitem__)
        mine = [r for r in found if r.task in labels and labels[r.task] == shown[0]] if shown else found
        where = shown[0] if shown else "a task merging shard results"
        firsts: dict[str, Raised] = {}
        for r in mine:  # the first shard's, each message once
            firsts.setdefault(r.message, r)
        told = [f"from {len(shown)} of {shards} shards"] if shown and shards > 1 else []
        told += [_others(found, firsts, labels, order)] if len(firsts) < len({r.message for r in found}) else []
        count = f" ({'; '.join(told)})" if told else ""
        for first in firsts.values():
            filename, lineno, module = _located(first, call)
            warnings.warn_explicit(
                f"tracin.distributed {what}, {where} on worker {first.worker}{count}: {first.message}",
                _category(category),
                filename,
                lineno,
                **({} if module is None else {"module": module}),  # module=None would drop it
            )
    if more:
        warnings.warn(
            f"tracin.distributed {what}: {more} more distinct warnings raised on the workers were not sent back "
            f"(at most {KEPT} a task; each task counts at most {COUNTED} more)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
