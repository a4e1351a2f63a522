"""Warnings raised by tasks on Dask workers: recorded there, sent back with the task's result, and
shown on the client once per distinct warning, naming the shards and worker that raised it."""

from __future__ import annotations

import builtins
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

from dask.sizeof import sizeof
from distributed import get_worker

from .._caller import user_stacklevel
from ._cluster import worker_name

KEPT = 100  # distinct warnings a task sends back; more are counted (Warned.more), not sent
NOTED = 10  # warnings a failed task's error lists in its note

_LOCK = threading.Lock()
_local = threading.local()  # .caught: the list of the innermost recorded() of this thread
_state: dict[str, Any] = {"users": 0, "saved": None, "show": None}  # the catch_warnings all recorders share


class Raised(NamedTuple):
    """A distinct warning a task raised: its category as (module, qualified name, the nearest built-in
    warning class above it), its message, where it was raised (file, line, module name or None), and the
    key of the task and the worker that raised it (None: a task not on a Dask worker)."""

    category: tuple[str, str, str]
    message: str
    filename: str
    lineno: int
    module: str | None
    task: str | None
    worker: str


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


@contextmanager
def recorded() -> Iterator[list[warnings.WarningMessage]]:
    """Every warning raised on this thread inside, whatever the filters (as simplefilter("always")),
    appended to the list yielded instead of shown. warnings.catch_warnings changes the whole process,
    and a worker runs tasks on several threads at once: the first thread in enters one catch_warnings
    for all (the "always" filter, and a showwarning handing each warning to its thread's list, or to the
    showwarning before for a thread recording none), the last one out leaves it. The warnings state is
    the process's: a warnings.catch_warnings() another thread (one recording none: the client's, with
    Client(processes=False)) is in meanwhile takes or drops these threads' warnings while it lasts."""
    caught: list[warnings.WarningMessage] = []
    with _LOCK:
        if _state["users"] == 0:
            saved = warnings.catch_warnings()
            saved.__enter__()
            warnings.simplefilter("always")
            _state["saved"] = saved
            if warnings.showwarning is not _show:  # else left by another thread's catch_warnings (not thread-safe)
                _state["show"] = warnings.showwarning
            warnings.showwarning = _show
        _state["users"] += 1
    outer = getattr(_local, "caught", None)
    _local.caught = caught
    try:
        yield caught
    finally:
        _local.caught = outer
        with _LOCK:
            _state["users"] -= 1
            if _state["users"] == 0:
                _state["saved"].__exit__(None, None, None)


def _show(
    message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    caught = getattr(_local, "caught", None)
    if caught is None:  # a thread recording nothing (the worker's own): shown as before
        _state["show"](message, category, filename, lineno, file, line)
    else:
        caught.append(warnings.WarningMessage(message, category, filename, lineno, file, line))


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


def carried(value: Any, earlier: list[Raised], more: int, caught: list[warnings.WarningMessage]) -> Any:
    """A task's result: `value`, or a Warned with the `earlier` warnings (of the tasks before it) and the
    first KEPT distinct ones of `caught` (raised here; the others counted in `more`)."""
    mine = _distinct(caught)
    if not earlier and not mine and not more:
        return value
    return Warned(value, (*earlier, *mine[:KEPT]), more + max(len(mine) - KEPT, 0))


def note_raised(e: BaseException, caught: list[warnings.WarningMessage]) -> None:
    """A note on a task's error `e` listing the warnings it raised before it (the first NOTED), if any."""
    mine = _distinct(caught)
    if not mine:
        return
    listed = "; ".join(f"{r.category[1]}: {r.message}" for r in mine[:NOTED])
    rest = f"; and {len(mine) - NOTED} more" if len(mine) > NOTED else ""
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


def _distinct(caught: list[warnings.WarningMessage]) -> list[Raised]:
    """One Raised per distinct (category, message) of `caught`, where it was first raised, in order."""
    if not caught:
        return []
    try:
        task, worker = get_worker().get_current_task(), worker_name()
    except (ValueError, KeyError):  # not running on a Dask worker (a task called directly)
        task, worker = None, worker_name()
    found: dict[tuple, Raised] = {}
    for w in caught:
        category = _category_named(w.category)
        key = (category, str(w.message))
        if key not in found:
            found[key] = Raised(category, str(w.message), w.filename, w.lineno, _module_of(w.filename), task, worker)
    return list(found.values())


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


def _module_of(filename: str) -> str | None:
    """The name of the imported module whose file is `filename` (which warning filters' module=
    matches, as warnings.warn names it), or None."""
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) == filename:
            return name
    return None


def show(raised: list[Raised], more: int, what: str, labels: dict[str, str], shards: int) -> None:
    """Each distinct (category, message) of `raised` warned once on the client, with warn_explicit at
    the line that raised it on the worker (so that the client's filters by category and module apply),
    the message prefixed with the call (`what`), the first shard in the call's order that raised it
    (`labels`: task key -> shard, in the order submitted), its worker, and how many of the call's
    `shards` shard tasks raised it."""
    order: dict[str, int] = {}  # shard -> its place among the call's (a chain's links share their part's)
    for label in labels.values():
        order.setdefault(label, len(order))
    grouped: dict[tuple, list[Raised]] = {}
    for r in raised:
        grouped.setdefault((r.category, r.message), []).append(r)
    for (category, message), found in grouped.items():
        shown = sorted({labels[r.task] for r in found if r.task in labels}, key=order.__getitem__)
        first = next((r for r in found if r.task in labels and labels[r.task] == shown[0]), found[0])
        where = shown[0] if shown else "a task merging shard results"
        count = f" (from {len(shown)} of {shards} shards)" if shown and shards > 1 else ""
        warnings.warn_explicit(
            f"tracin.distributed {what}, {where} on worker {first.worker}{count}: {message}",
            _category(category),
            first.filename,
            first.lineno,
            **({} if first.module is None else {"module": first.module}),  # module=None would drop it
        )
    if more:
        warnings.warn(
            f"tracin.distributed {what}: {more} more distinct warnings raised on the workers were not sent back "
            f"(at most {KEPT} a task)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
