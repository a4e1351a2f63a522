"""tqdm progress bars (tqdm is imported only when a bar may be shown); a silent bar when not wanted.

enabled=None is the automatic choice for work of unknown length: the bar appears only once the
work has run AUTO_DELAY_S seconds, so quick calls print nothing (and make no tqdm bar, which in
Jupyter is a widget), and only where someone sees it (shows_automatically: a terminal or a notebook kernel,
not stderr redirected to a log, which would collect a frame per refresh). Work that goes over the same
examples several times (once per checkpoint) is shown as one pass at a time, counting examples.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

AUTO_DELAY_S = 2.0  # seconds of work before an automatic (enabled=None) bar appears


def check_progress(progress: Any) -> bool | None:
    """`progress` as the scoring and fitting functions take it; TypeError naming it otherwise."""
    if progress is None:
        return None
    if not isinstance(progress, (bool, np.bool_)):  # np.bool_ as normalize= and per_checkpoint= take it
        raise TypeError(f"progress must be True, False or None (automatic), got {progress!r}")
    return bool(progress)


@functools.cache
def tqdm_installed() -> bool:
    """Whether tqdm can be imported (looked up once: a lookup scans sys.path until it is imported)."""
    return importlib.util.find_spec("tqdm") is not None


def stderr_is_a_terminal() -> bool:
    """Whether sys.stderr is a terminal (not a file or a pipe, which would collect a bar's every frame)."""
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except ValueError:  # closed
        return False


def shows_automatically() -> bool:
    """Whether an automatic bar (enabled=None) is shown: tqdm is installed, and stderr is a terminal or
    the code runs in an IPython kernel (Jupyter, VS Code notebooks, Spyder, qtconsole: widget bars where
    ipywidgets is installed, text bars in the cell's output otherwise); not where stderr goes to a file
    or a pipe."""
    return tqdm_installed() and (stderr_is_a_terminal() or in_a_notebook_kernel())


def in_a_notebook_kernel() -> bool:
    """Whether this runs in an IPython kernel (a shell with a kernel; the IPython terminal has none)."""
    ipython = sys.modules.get("IPython")  # only where the caller imported it: a kernel always has
    shell = getattr(ipython, "get_ipython", lambda: None)()
    return getattr(shell, "kernel", None) is not None


def progress_note(enabled: bool | None, text: str) -> None:
    """Prints one line about the work (a resumed or finished export) to stderr where its progress bar would
    show: enabled True, or None where shows_automatically(); nothing for False."""
    if enabled or (enabled is None and shows_automatically()):
        print(text, file=sys.stderr, flush=True)


def progress_bar(
    total: int | None,
    enabled: bool | None,
    desc: str,
    unit: str = "ex",
    *,
    passes: int = 1,
    unit_scale: bool = True,
    initial: int = 0,
) -> Any:
    """A bar counting `unit`s towards `total` (None: unknown), with update(n), set_postfix_str(s)
    and close().

    enabled: True shows the bar, False gives a silent one, None (where shows_automatically()) makes
    and shows it at the first update() once AUTO_DELAY_S seconds have passed, its elapsed time
    counted from now. passes > 1: the work goes `passes` times over `total` units (e.g. the examples, once per
    checkpoint); update() counts over all passes as before, and the bar shows the current pass
    ("desc checkpoint 2/3") and its units, so that it counts examples, not examples x passes (with
    total None, one plain bar). unit_scale: counts shown with SI prefixes ("1.2k ex"); False for
    small counts of whole units ("6/6 shard", not "6.00/6.00 shard").
    initial: units done before (the rows a resumed export finds in its store): the bar starts there (in its
    pass), its rate and time left counting only the units done from now; the caller still counts them,
    first, with update() (as a pass that skips them does), and those first `initial` units are not counted
    again.
    tqdm is needed only when enabled is True.
    """
    if enabled is None and shows_automatically():
        start = time.time()
        paced = total if passes > 1 and total else None
        make = functools.partial(_bar, total, desc, unit, passes, unit_scale, start, initial)
        bar: Any = _Delayed(make, start, paced, passes, initial)
    elif enabled:
        bar = _bar(total, desc, unit, passes, unit_scale, initial=initial)
    else:
        return _Silent()
    return _Counted(bar, initial) if initial > 0 else bar


class _Counted:
    """A bar made at `initial` units: the first `initial` units update() is given are those, not counted again."""

    def __init__(self, bar: Any, initial: int):
        self._bar, self._left = bar, initial

    def update(self, n: int = 1) -> None:
        seen = min(n, self._left)
        self._left -= seen
        if n - seen > 0:
            self._bar.update(n - seen)

    def set_postfix_str(self, s: str) -> None:
        self._bar.set_postfix_str(s)

    def close(self) -> None:
        self._bar.close()


def _bar(
    total: int | None,
    desc: str,
    unit: str,
    passes: int,
    unit_scale: bool,
    start: float | None = None,
    initial: int = 0,
) -> Any:
    """A tqdm bar shown at once; `start`: when the work began (time.time()), if before now; `initial`: units
    done before (over all passes), where the bar starts. Without tqdm,
    a ModuleNotFoundError naming progress=True and how to install tqdm (the core install has only NumPy)."""
    try:
        from tqdm.auto import tqdm
    except ModuleNotFoundError as e:
        if e.name is None or e.name.partition(".")[0] != "tqdm":
            raise  # tqdm is there but something it imports is not: its own message says what
        raise ModuleNotFoundError(
            "progress=True needs tqdm, which is not installed: pip install tqdm (or any of the extras "
            "tracin[demo], tracin[torch], tracin[jax]), or pass progress=False or None",
            name=e.name,
        ) from e

    plain = passes == 1 or total is None  # one pass, or passes of unknown length
    # a resumed pass-by-pass bar starts in the pass holding the first unit not done
    first = 0 if plain or not total else min(initial // total, passes - 1)
    within = initial if plain else initial - first * total
    bar = tqdm(
        total=total,
        initial=within,
        unit=unit,
        unit_scale=unit_scale,
        dynamic_ncols=True,
        desc=desc if plain else _pass_desc(desc, first, passes),
    )
    if start is not None:  # elapsed time and rate counted from the start of the work
        bar.start_t = bar.last_print_t = start
    return bar if plain else _Passes(bar, total, passes, desc, first, within)


def _pass_desc(desc: str, i: int, passes: int) -> str:
    return f"{desc} checkpoint {i + 1}/{passes}"


class _Passes:
    """A tqdm bar over one pass of `total` units, restarted for each of `passes` passes; update()
    takes counts over all passes (a count that crosses a pass boundary moves to the next pass)."""

    def __init__(self, bar: Any, total: int, passes: int, desc: str, first: int = 0, done: int = 0):
        self._bar, self._total, self._passes = bar, total, passes
        self._desc = desc
        self._pass, self._done = first, done  # current pass, units done in it
        self._last = bar.start_t  # when the units counted so far were done (the work's start, for a late bar)

    def update(self, n: int = 1) -> None:
        now = self._bar._time()
        since, self._last = self._last, now
        left = n
        while left > 0:
            step = min(left, self._total - self._done)
            self._bar.update(step)
            self._done += step
            left -= step
            if self._done == self._total and self._pass + 1 < self._passes:
                self._pass, self._done = self._pass + 1, 0
                # Not tqdm's reset(), which redraws at once: a bar still inside its delay stays hidden.
                self._bar.n = self._bar.last_print_n = self._bar.initial = 0  # a resumed pass's initial too
                # Each pass's clock too: else elapsed and the closing rate (n / elapsed) span all passes. A
                # count crossing the boundary part-way (a late bar's replay of the work so far, since its
                # start) is taken as done at an even rate: the pass began that share of the count before now.
                self._bar.start_t = self._bar.last_print_t = now - (now - since) * left / n
                self._bar.set_description_str(_pass_desc(self._desc, self._pass, self._passes), refresh=False)
            elif step == 0:
                break  # more than every pass holds: nothing left to count

    def set_postfix_str(self, s: str) -> None:
        self._bar.set_postfix_str(s)

    def pass_began(self, t: float) -> None:
        """Times the current pass from `t` (time.time()): when it began, before the bar was made."""
        self._bar.start_t = self._bar.last_print_t = t

    def close(self) -> None:
        self._bar.close()


class _Delayed:
    """A bar made by `make()` at the first update() once AUTO_DELAY_S seconds have passed since this
    one was made, given the count and postfix so far; until then (and for quick work, ever) nothing."""

    def __init__(
        self, make: Callable[[], Any], start: float, total: int | None = None, passes: int = 1, initial: int = 0
    ):
        self._make, self._start = make, time.monotonic()
        self._bar: Any = None
        # units counted, from the `initial` a resumed bar is made at (and update() is not given)
        self._initial, self._count, self._postfix = initial, initial, None
        # passes of `total` units: when the last one counted began (time.time()), the update before it
        self._total, self._passes, self._last, self._pass_began = total, passes, start, None

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.time()
        if self._total and n > 0:
            reached = (self._count + n) // self._total
            if reached > self._count // self._total and reached < self._passes:
                # the pass began inside this update's count, taken as done at an even rate since the last one
                self._pass_began = now - (now - self._last) * ((self._count + n) % self._total) / n
            self._last = now
        self._count += n
        if time.monotonic() - self._start >= AUTO_DELAY_S:
            self._bar = self._make()
            if self._postfix is not None:
                self._bar.set_postfix_str(self._postfix)
            self._bar.update(self._count - self._initial)
            if self._pass_began is not None:
                self._bar.pass_began(self._pass_began)

    def set_postfix_str(self, s: str) -> None:
        if self._bar is None:
            self._postfix = s
        else:
            self._bar.set_postfix_str(s)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _Silent:
    """The bar's interface, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass
