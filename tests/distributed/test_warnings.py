"""Warnings raised by tasks on the workers reach the client once each, naming the call, the first shard
that raised them, its worker and how many shards did (not only the workers' logs)."""

from __future__ import annotations

import functools
import re
import sys
import threading
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

import tracin
import tracin.distributed as td
from tracin.distributed import _tasks, _warnings
from tracin.distributed._shards import StoreRows

from .conftest import read_on_workers, write_store

WORKER = r"worker tcp://127\.0\.0\.1:\d+"
_opened_before: dict[str, object] = {}  # on each worker while patched: _tasks._opened as it was


class _OwnWarning(UserWarning):
    """A warning class of this module, which the client has imported too."""


def _warning_opened(side: object) -> object:
    """_tasks._opened on a worker while patched: every store shard a task opens warns; the one starting at
    row 0 warns once more, in a class of this module."""
    if isinstance(side, StoreRows):
        for _ in range(3):  # raised three times in a task: shown once
            warnings.warn("every shard warns", RuntimeWarning, stacklevel=1)
        if side.start == 0:
            warnings.warn("the first shard warns", _OwnWarning, stacklevel=1)
    return _opened_before["opened"](side)


def _patch() -> None:
    _opened_before["opened"], _tasks._opened = _tasks._opened, _warning_opened


def _unpatch() -> None:
    _tasks._opened = _opened_before.pop("opened", _tasks._opened)  # a worker started since: never patched


@pytest.fixture
def warning_shards(client):
    """The session cluster's workers with _tasks._opened warning (_warning_opened)."""
    client.run(_patch)
    try:
        yield client
    finally:
        client.run(_unpatch)


def _from_tracin(record: list) -> list[warnings.WarningMessage]:
    return [w for w in record if str(w.message).startswith("tracin.distributed ")]


def _only(record: list, text: str) -> warnings.WarningMessage:
    (found,) = [w for w in _from_tracin(record) if str(w.message).endswith(f": {text}")]
    return found


@pytest.mark.parametrize("call", ["self_influence", "top_k", "aggregate"])
def test_a_scoring_tasks_warnings_reach_the_client_once_with_their_shards(warning_shards, tied, floats, call):
    """self_influence: shard results gathered; top_k of a train store: merged by a tree of tasks; aggregate of
    a test store: added by a chain of tasks. The old code showed none of them on the client."""
    if call == "self_influence":
        store = tied["store"]
        with pytest.warns((RuntimeWarning, _OwnWarning)) as record:
            found = td.self_influence(store, client=warning_shards, shards=4)
        train = tied["train"]
        expected = 0.5 * (train[0].astype(np.float64) ** 2).sum(1) + 2.0 * (train[1].astype(np.float64) ** 2).sum(1)
        np.testing.assert_allclose(found, expected, rtol=1e-6)
        first = "rows [0, 250)"
    elif call == "top_k":
        store = tied["store"]
        with pytest.warns((RuntimeWarning, _OwnWarning)) as record:
            found = td.top_k(tied["test"], store, 5, client=warning_shards, shards=4)
        np.testing.assert_array_equal(found.values, np.sort(tied["scores"], axis=1)[:, ::-1][:, :5])
        first = "rows [0, 250)"
    else:
        store = floats["test_store"]  # cut on the test side, at its row chunks of 7 rows
        train = tracin.Gradients(floats["train"], floats["weights"])
        with pytest.warns((RuntimeWarning, _OwnWarning)) as record:
            found = td.aggregate(store, train, client=warning_shards, shards=4)
        np.testing.assert_allclose(found, floats["scores"].sum(0), rtol=1e-4, atol=1e-4)
        first = "rows [0, 7)"
    every, one = _only(record, "every shard warns"), _only(record, "the first shard warns")
    assert len(_from_tracin(record)) == 2
    assert every.category is RuntimeWarning and one.category is _OwnWarning
    what = "top_k (proponents)" if call == "top_k" else call
    prefix = rf"^tracin\.distributed {re.escape(what)}, {re.escape(first)} of {re.escape(str(store.path))} on {WORKER}"
    assert re.match(rf"{prefix} \(from 4 of 4 shards\): every shard warns$", str(every.message)), str(every.message)
    assert re.match(rf"{prefix} \(from 1 of 4 shards\): the first shard warns$", str(one.message)), str(one.message)
    assert every.filename == __file__  # the line that raised it on the worker
    assert "_tasks.py" not in one.filename and one.lineno > 0


def test_the_clients_filters_apply_to_a_workers_warnings(warning_shards, tied):
    """By category, and by module (the module that raised it on the worker), as for the call in one process."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        warnings.filterwarnings("ignore", module=re.escape(__name__))
        td.self_influence(tied["store"], client=warning_shards, shards=2)
    assert _from_tracin(record) == []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        td.self_influence(tied["store"], client=warning_shards, shards=2)
    assert [w.category for w in _from_tracin(record)] == [_OwnWarning]


def test_a_failed_tasks_warnings_are_in_its_errors_notes(warning_shards, tmp_path):
    rows = [np.ones((40, 4), dtype=np.float32)]
    rows[0][3, 1] = np.nan
    store = write_store(tmp_path / "bad", rows, None)
    with pytest.raises(ValueError, match=r"first in rows \[3\]") as e:
        td.self_influence(store, client=warning_shards, shards=4)
    (note,) = [n for n in getattr(e.value, "__notes__", []) if "before this error" in n]
    assert re.fullmatch(
        rf"tracin\.distributed: the task warned on {WORKER} before this error: RuntimeWarning: every shard warns; "
        "_OwnWarning: the first shard warns",
        note,
    ), note


def _warned_batches(batches: list, failing: bool) -> object:
    """The batches a worker reads, after a warning (and then an error, `failing`)."""
    warnings.warn("read on a worker", UserWarning, stacklevel=1)
    if failing:
        raise ValueError("this worker cannot read the data")
    return iter(batches)


@pytest.mark.parametrize("failing", [False, True])
def test_an_export_tasks_warnings_reach_the_client_once_with_their_shards(client, tmp_path, failing):
    torch = pytest.importorskip("torch")
    from .test_export import _same_store, _setup

    model, checkpoints, (inputs, targets), loss = _setup(20, 4)
    batches = [(inputs[i : i + 10], targets[i : i + 10]) for i in (0, 10)]
    data = read_on_workers(batches, functools.partial(_warned_batches, batches, failing))
    store = tmp_path / "s"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if failing:
            with pytest.raises(ValueError, match="this worker cannot read the data") as e:
                td.export_gradients("torch", model, checkpoints, data, loss, store=store, client=client, shards=2)
            assert any(
                re.fullmatch(
                    rf"tracin\.distributed: the task warned on {WORKER} before this error: UserWarning: read on a "
                    "worker",
                    n,
                )
                for n in e.value.__notes__
            ), e.value.__notes__
            return
        with pytest.warns(UserWarning) as record:
            found = td.export_gradients(
                "torch",
                model,
                checkpoints,
                data,
                loss,
                store=store,
                client=client,
                shards=2,
                num_threads=1,
                progress=False,
            )
        expected = tracin.torch.export_gradients(
            model, checkpoints, batches, loss, store=tmp_path / "one", progress=False
        )
    finally:
        torch.set_num_threads(before)
    _same_store(found, expected)  # the rows as one process exports them
    (shown,) = _from_tracin(record)  # each task read the data 3 times: once per checkpoint, once to check it
    assert shown.category is UserWarning
    assert re.fullmatch(
        rf"tracin\.distributed export \(torch\), rows \[0, 10\) of {re.escape(str(store))} on {WORKER} "
        r"\(from 2 of 2 shards\): read on a worker",
        str(shown.message),
    ), str(shown.message)


def test_recording_is_per_thread_and_restores_the_filters():
    """Two threads recording at once each get their own warnings (the first of identical ones); a
    thread recording none is shown its warnings as before; once both are done the process's filters
    and showwarning are as they were."""
    filters, show = list(warnings.filters), warnings.showwarning
    inside, go, leave = threading.Barrier(3), threading.Event(), threading.Event()
    found: dict[str, list[str]] = {}

    def task(name: str) -> None:
        with _warnings.recorded() as caught:
            inside.wait()
            go.wait()  # not while this thread's catch_warnings(record=True) below, which takes every thread's
            for _ in range(2):
                warnings.warn(f"from {name}", RuntimeWarning, stacklevel=1)
            leave.wait()
        found[name] = [str(w.message) for w in caught.kept.values()]

    threads = [threading.Thread(target=task, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    inside.wait()
    with warnings.catch_warnings(record=True) as outside:  # this thread records none: its warning is its own
        warnings.warn("not in a task", UserWarning, stacklevel=1)
    go.set()
    leave.set()
    for t in threads:
        t.join()
    assert found == {"a": ["from a"], "b": ["from b"]}
    assert [str(w.message) for w in outside] == ["not in a task"]
    assert warnings.filters == filters and warnings.showwarning is show


def test_a_category_the_client_lacks_is_its_built_in_base_and_many_warnings_are_counted(monkeypatch):
    raised = _warnings.Raised(("not_on_the_client", "Odd", "RuntimeWarning"), "odd", "x.py", 3, None, None, "w")
    with pytest.warns(
        RuntimeWarning, match=r"^tracin\.distributed test, a task merging shard results on worker w: odd$"
    ):
        _warnings.show([raised], 0, "test", {}, 1)
    monkeypatch.setattr(_warnings, "KEPT", 2)
    with _warnings.recorded() as caught:
        for i in range(5):
            warnings.warn(f"number {i}", UserWarning, stacklevel=1)
    result = _warnings.carried("value", [], 0, caught)
    assert [r.message for r in result.raised] == ["number 0", "number 1"] and result.more == 3
    with pytest.warns(UserWarning) as record:
        _warnings.show(list(result.raised), result.more, "test", {}, 1)
    assert [str(w.message) for w in record][-1] == (
        "tracin.distributed test: 3 more distinct warnings raised on the workers were not sent back "
        "(at most 2 a task; each task counts at most 10000 more)"
    )


def test_a_task_keeps_the_first_of_each_warning_and_at_most_kept_whatever_it_raises():
    """10^5 identical warnings and 10^4 distinct ones (raised in turn): the task keeps the first
    occurrence of KEPT distinct ones, in the order first raised, each where it was first raised, and
    counts the others (the identical one once); a failed task's note lists NOTED and counts the rest."""
    with _warnings.recorded() as caught:
        line = sys._getframe().f_lineno + 1
        warnings.warn("the same", DeprecationWarning, stacklevel=1)  # first here, then below
        for i in range(10**5):
            warnings.warn("the same", DeprecationWarning, stacklevel=1)
            if i % 10 == 0:
                warnings.warn(f"row {i // 10}", RuntimeWarning, stacklevel=1)
    assert len(caught.kept) == _warnings.KEPT and caught.more == 10**4 + 1 - _warnings.KEPT
    result = _warnings.carried("value", [], 7, caught)
    assert result.value == "value" and result.more == 7 + 10**4 + 1 - _warnings.KEPT
    expected = ["the same", *(f"row {i}" for i in range(_warnings.KEPT - 1))]
    assert [r.message for r in result.raised] == expected
    first = result.raised[0]
    assert first.category == ("builtins", "DeprecationWarning", "DeprecationWarning")
    assert (first.filename, first.lineno, first.module) == (__file__, line, __name__)
    assert {r.category[1] for r in result.raised[1:]} == {"RuntimeWarning"}

    error = ValueError("failed")
    _warnings.note_raised(error, caught)
    listed = "; ".join(
        ["DeprecationWarning: the same", *(f"RuntimeWarning: row {i}" for i in range(_warnings.NOTED - 1))]
    )
    assert error.__notes__[-1].endswith(f"before this error: {listed}; and {10**4 + 1 - _warnings.NOTED} more")


def test_a_task_counts_distinct_warnings_beyond_kept_up_to_counted(monkeypatch):
    """Distinct warnings beyond KEPT are told apart up to COUNTED of them (so memory stays bounded),
    repeats of one counted once; none is kept."""
    monkeypatch.setattr(_warnings, "KEPT", 3)
    monkeypatch.setattr(_warnings, "COUNTED", 50)
    with _warnings.recorded() as caught:
        for i in range(200):
            warnings.warn(f"number {i % 20}", UserWarning, stacklevel=1)
        for i in range(200):
            warnings.warn(f"other {i}", UserWarning, stacklevel=1)
    assert [key[1] for key in caught.kept] == ["number 0", "number 1", "number 2"]
    assert caught.more == 50  # 17 "number" beyond the 3 kept, then 33 "other" until COUNTED


def test_a_catch_warnings_left_by_another_thread_after_a_recording_does_not_make_warnings_recurse():
    """A thread recording none that leaves warnings.catch_warnings() after a task's recording ended (the
    client's thread with Client(processes=False), pytest's catch_warnings of a test) puts _show back as
    warnings.showwarning: the next recording must not take it for the showwarning before it (which a
    thread recording none is then shown through: _show calling itself)."""
    filters, show, seen = list(warnings.filters), warnings.showwarning, []
    recording, entered, left = threading.Event(), threading.Event(), threading.Event()

    def task() -> None:
        with _warnings.recorded():
            recording.set()
            entered.wait()
        left.set()

    warnings.showwarning = lambda message, *args: seen.append(str(message))
    try:
        thread = threading.Thread(target=task)
        thread.start()
        recording.wait()
        with warnings.catch_warnings():  # entered while the task records, left after it
            entered.set()
            left.wait()
        thread.join()
        recording.clear(), entered.clear()
        thread = threading.Thread(target=task)
        thread.start()
        recording.wait()
        try:
            warnings.warn("not in a task", UserWarning, stacklevel=1)
        finally:
            entered.set()
            thread.join()
    finally:
        warnings.showwarning, warnings.filters[:] = show, filters
    assert seen == ["not in a task"]


def test_shards_copies_of_a_warning_naming_their_rows_are_one_warning():
    """float16's low-precision warning names each range's rows: one warning with the count of shards, the
    first shard's, not one per shard; distinct messages of one task stay apart (review327 F2)."""
    labels = {f"t{i}": f"rows [{10 * i}, {10 * i + 10})" for i in range(10)}
    raised = [
        _warnings.Raised(
            ("builtins", "RuntimeWarning", "RuntimeWarning"),
            f"rows {10 * i} to {10 * i + 9} tiny",
            "x.py",
            3,
            None,
            f"t{i}",
            "w",
        )
        for i in range(10)
    ]
    raised.append(
        _warnings.Raised(
            ("builtins", "RuntimeWarning", "RuntimeWarning"), "rows 1 to 2 tiny", "x.py", 3, None, "t0", "w"
        )
    )
    with pytest.warns(RuntimeWarning) as record:
        _warnings.show(raised, 0, "test", labels, 10)
    others = "; ".join(f"rows [{10 * i}, {10 * i + 10}): '{10 * i} to {10 * i + 9}'" for i in range(1, 6))
    told = f"from 10 of 10 shards; other shards' copies name other numbers: {others} and 4 more"
    prefix = f"tracin.distributed test, rows [0, 10) on worker w ({told})"
    assert [str(w.message) for w in record] == [f"{prefix}: rows 0 to 9 tiny", f"{prefix}: rows 1 to 2 tiny"]


def test_the_numbers_other_shards_copies_name_are_told():
    """Copies of a warning grouped with their digits masked may name what the user acts on (the rows whose
    loss is NaN, the checkpoint): those of the shards not shown are named with their shard, not lost."""
    labels = {f"t{i}": f"rows [{10 * i}, {10 * i + 10})" for i in range(4)}
    category = ("builtins", "RuntimeWarning", "RuntimeWarning")
    raised = [
        _warnings.Raised(category, f"NaN loss for row {row} at checkpoint {ck}: drop it", "x.py", 3, None, task, "w")
        for row, ck, task in ((3, 0, "t0"), (27, 0, "t2"), (35, 2, "t3"), (3, 0, "t1"))
    ]
    with pytest.warns(RuntimeWarning) as record:
        _warnings.show(raised, 0, "test", labels, 4)
    assert [str(w.message) for w in record] == [
        "tracin.distributed test, rows [0, 10) on worker w (from 4 of 4 shards; other shards' copies name other "
        "numbers: rows [20, 30): '27'; rows [30, 40): '35 at checkpoint 2:'): NaN loss for row 3 at checkpoint 0: "
        "drop it"
    ]


def test_two_exports_client_passes_in_two_threads_leave_the_warnings_as_they_were():
    """Export A's last pass (not showing again its first pass's warnings) and export B's first pass, in two
    threads, ending out of order: the warning machinery is left as it was and a later warning is shown (a
    catch_warnings per pass left A's 'ignore' filter for the process, and its showwarning)."""
    from tracin.distributed._export import _shown_once

    show, filters = warnings.showwarning, list(warnings.filters)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    message = "an argument warning export A's first pass showed"

    def a() -> None:
        with _shown_once({(UserWarning, message)}):
            a_in.set()
            b_in.wait(30)
        a_out.set()

    def b() -> None:
        a_in.wait(30)
        with _shown_once(set()):
            b_in.set()
            a_out.wait(30)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert warnings.showwarning is show and warnings.filters == filters
    with pytest.warns(UserWarning, match=message):
        warnings.warn(message, UserWarning, stacklevel=1)


def test_other_shards_copies_are_listed_in_shard_order_and_a_merging_tasks_is_named():
    """The other shards' differing numbers are listed in the order of the shards (not as they came back),
    and a copy from a task that is no shard is named as a merging task's."""
    labels = {f"t{i}": f"rows [{10 * i}, {10 * i + 10})" for i in range(3)}
    category = ("builtins", "RuntimeWarning", "RuntimeWarning")
    raised = [
        _warnings.Raised(category, f"NaN loss for row {row}", "x.py", 3, None, task, "w")
        for row, task in ((25, "t2"), (99, "merge"), (1, "t0"), (15, "t1"))
    ]
    with pytest.warns(RuntimeWarning) as record:
        _warnings.show(raised, 0, "test", labels, 3)
    assert [str(w.message) for w in record] == [
        "tracin.distributed test, rows [0, 10) on worker w (from 3 of 3 shards; other shards' copies name other "
        "numbers: rows [10, 20): '15'; rows [20, 30): '25'; a task merging shard results: '99'): NaN loss for row 1"
    ]


def test_shown_once_nested_in_a_thread_restores_the_outer_seen_and_leaves_a_replaced_showwarning():
    """A pass nested in another (same thread) gives back the outer pass's `seen` when it ends; a showwarning
    installed while a pass runs (a catch_warnings entered there) is left when the last pass ends."""
    from tracin.distributed._export import _shown_once

    show, shown = warnings.showwarning, []
    warnings.showwarning = lambda message, *args: shown.append(str(message))
    try:
        with _shown_once({(UserWarning, "outer's")}):
            with _shown_once(set()):
                pass
            warnings.warn("outer's", UserWarning, stacklevel=1)  # the outer pass showed it already
            warnings.warn("new", UserWarning, stacklevel=1)
        assert shown == ["new"]

        def replaced(message: object, *args: object) -> None:
            shown.append(f"replaced: {message}")

        with _shown_once(set()):
            warnings.showwarning = replaced
        assert warnings.showwarning is replaced
    finally:
        warnings.showwarning = show


def test_a_showwarning_left_wrapped_by_another_threads_catch_warnings_does_not_recurse():
    """_shown left as warnings.showwarning when no pass runs (a catch_warnings another thread entered during
    a pass, left after it) is not taken for the showwarning to wrap: a warning in the next pass is shown, not
    a RecursionError; another thread's warnings (no pass of its own) are shown even if a pass saw them."""
    from tracin.distributed._export import _shown, _shown_once

    show, shown = warnings.showwarning, []
    warnings.showwarning = lambda message, *args: shown.append(str(message))
    try:
        with _shown_once(set()):
            pass
        warnings.showwarning = _shown  # as a catch_warnings entered during that pass leaves it
        seen = {(UserWarning, "seen by the pass")}
        with _shown_once(seen):
            warnings.warn("in the next pass", UserWarning, stacklevel=1)
            thread = threading.Thread(target=lambda: warnings.warn("seen by the pass", UserWarning, stacklevel=1))
            thread.start()
            thread.join(30)
        assert shown == ["in the next pass", "seen by the pass"]
    finally:
        warnings.showwarning = show


def _interleaved_pass_and_recording(warn_in_last_pass) -> None:
    """review343 H1's order, forced with events (no sleeps): a client pass (_shown_once) begins; a task on a
    worker thread of this process (Client(processes=False)) starts recording; that pass ends and another
    begins while the task still records; `warn_in_last_pass()` runs in that pass; the task then ends."""
    from tracin.distributed._export import _shown_once

    recording, done = threading.Event(), threading.Event()

    def task() -> None:
        with _warnings.recorded():
            recording.set()
            done.wait(30)

    thread = threading.Thread(target=task)
    try:
        with _shown_once(set()):  # export B's first client pass
            thread.start()
            assert recording.wait(30)  # export A's task records meanwhile
        with _shown_once(set()):  # a later client pass, the task still recording
            warn_in_last_pass()
    finally:
        done.set()
        thread.join(30)


def test_a_client_pass_and_a_task_recording_interleaved_never_hand_warnings_to_each_other():
    """review343 H1: each of _shown_once and recorded() saved the other's showwarning as the one to hand
    warnings to: the client's warnings in the later pass were dropped, and afterwards every warnings.warn
    in any thread raised RecursionError. Now the client's and another thread's warnings are shown, and
    once both end warnings.showwarning is the very object it was before."""
    show, filters, shown = warnings.showwarning, list(warnings.filters), []

    def user_hook(message: object, *args: object) -> None:
        shown.append(str(message))

    def in_last_pass() -> None:
        warnings.warn("the client's, in the later pass", UserWarning, stacklevel=1)
        other = threading.Thread(target=lambda: warnings.warn("another thread's", UserWarning, stacklevel=1))
        other.start()
        other.join(30)

    warnings.showwarning = user_hook
    try:
        _interleaved_pass_and_recording(in_last_pass)
        assert warnings.showwarning is user_hook and warnings.filters == filters
        warnings.warn("after both ended", UserWarning, stacklevel=1)  # RecursionError before the fix
    finally:
        warnings.showwarning, warnings.filters[:] = show, filters
    assert shown == ["the client's, in the later pass", "another thread's", "after both ended"]


def test_a_showwarning_handing_warnings_back_to_the_wrapper_falls_back_to_the_original():
    """A showwarning installed by someone else that hands warnings back to the one tracin installed (each
    the other's next) does not recurse: a warning re-entering in its thread is shown by
    warnings._showwarning_orig."""
    from tracin.distributed._export import _shown_once

    show, shown, printed = warnings.showwarning, [], []

    def loop(message: object, *args: object) -> None:
        shown.append(str(message))
        wrapper(message, *args)

    def original(message: object, *args: object) -> None:
        printed.append(str(message))

    try:
        warnings.showwarning = loop
        with _shown_once(set()):
            wrapper = warnings.showwarning
            warnings.showwarning = loop  # now loop -> wrapper -> loop ...
            with pytest.MonkeyPatch.context() as m:
                m.setattr(warnings, "_showwarning_orig", original)
                warnings.warn("looped", UserWarning, stacklevel=1)
    finally:
        warnings.showwarning = show
    assert shown == ["looped", "looped"] and printed == ["looped"]


def test_every_shards_nan_loss_rows_are_named_however_many_shards():
    """review343 L2: the shards' copies of the NaN-loss warning (LossWatch's) were merged listing five other
    shards' rows, the rest counted ("and 1 more"): the rows to fix went unnamed. All seven shards' rows are
    named, in shard order; other warnings still list five."""
    labels = {f"t{i}": f"rows [{100 * i}, {100 * i + 100})" for i in range(7)}
    category = ("builtins", "RuntimeWarning", "RuntimeWarning")
    tail = "of the data at checkpoint 0: its gradient row is stored as autograd gives it"
    raised = [
        _warnings.Raised(
            category,
            f"loss_fn gives a NaN or infinite loss for row {100 * i + 7} {tail}",
            "x.py",
            3,
            None,
            f"t{i}",
            "w",
        )
        for i in reversed(range(7))
    ]
    raised += [
        _warnings.Raised(category, f"rows {100 * i} to {100 * i + 99} tiny", "x.py", 3, None, f"t{i}", "w")
        for i in range(7)
    ]
    with pytest.warns(RuntimeWarning) as record:
        _warnings.show(raised, 0, "test", labels, 7)
    nan_loss, tiny = (str(w.message) for w in record)
    others = "; ".join(f"rows [{100 * i}, {100 * i + 100}): 'row {100 * i + 7} at checkpoint 0'" for i in range(1, 7))
    assert nan_loss == (
        "tracin.distributed test, rows [0, 100) on worker w (from 7 of 7 shards; other shards' copies name other "
        f"numbers: {others}): loss_fn gives a NaN or infinite loss for row 7 {tail}"
    )
    assert tiny.endswith("rows [500, 600): '500 to 599' and 1 more): rows 0 to 99 tiny")


def test_every_shards_all_zero_rows_are_named_however_many_shards():
    """The shards' copies of the all-0-rows warning (ZeroRows') are merged naming every shard's rows, as the
    NaN-loss warning's are: the rows they name are the ones to look at (fx352)."""
    labels = {f"t{i}": f"rows [{100 * i}, {100 * i + 100})" for i in range(7)}
    category = ("builtins", "UserWarning", "UserWarning")
    tail = "of the data: its gradient is 0 at every checkpoint"
    raised = [
        _warnings.Raised(category, f"all-0 gradients for row {100 * i + 3} {tail}", "x.py", 3, None, f"t{i}", "w")
        for i in range(7)
    ]
    with pytest.warns(UserWarning) as record:
        _warnings.show(raised, 0, "test", labels, 7)
    (message,) = (str(w.message) for w in record)
    others = "; ".join(f"rows [{100 * i}, {100 * i + 100}): 'row {100 * i + 3}'" for i in range(1, 7))
    assert message == (
        "tracin.distributed test, rows [0, 100) on worker w (from 7 of 7 shards; other shards' copies name other "
        f"numbers: {others}): all-0 gradients for row 3 {tail}"
    )


def test_one_row_and_several_rows_copies_of_a_row_warning_are_one_warning():
    """A shard with one NaN-loss row warns "row 7 ..., its gradient row is", one with several "3 rows (...) ...,
    their gradient rows are": the same warning worded for its count, shown once (it was one warning per
    wording), every shard's rows and checkpoint named; the all-0-rows warning alike, its whole-shard wording
    ("all 100 rows computed") apart."""
    from tracin._export.loss_watch import LossWatch
    from tracin._export.sinks import ZeroRows

    def raised_by(make, task):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            make()
        return [
            _warnings.Raised(
                _warnings._category_named(w.category), str(w.message), "x.py", 3, None, task, "w", ours=True
            )
            for w in record
        ]

    def nan_rows(rows, checkpoint):
        def make():
            watch = LossWatch("autograd", "autograd gives it")
            watch.checkpoint = checkpoint
            losses = np.zeros(100, np.float32)
            losses[np.array(rows) % 100] = np.nan
            watch(losses, SimpleNamespace(start=rows[0] // 100 * 100, count=100))
            watch.flush()

        return make

    def zero_rows(rows, computed):
        def make():
            zero = ZeroRows()
            zero.see(rows[0] // 100 * 100, np.isin(np.arange(computed), np.array(rows) % 100))
            zero.end(0)
            zero.warn()

        return make

    labels = {f"t{i}": f"rows [{100 * i}, {100 * i + 100})" for i in range(3)}
    raised = raised_by(nan_rows([7], 0), "t0") + raised_by(nan_rows([105, 107, 109], 0), "t1")
    raised += raised_by(nan_rows([203], 1), "t2")
    with pytest.warns(RuntimeWarning) as record:
        _warnings.show(raised, 0, "test", labels, 3)
    (message,) = (str(w.message) for w in record)
    assert message.startswith(
        "tracin.distributed test, rows [0, 100) on worker w (from 3 of 3 shards; other shards' copies name other "
        "numbers: rows [100, 200): '3 rows (105, 107, 109) at checkpoint 0'; rows [200, 300): 'row 203 at "
        "checkpoint 1'): loss_fn gives a NaN or infinite loss for row 7 of the data at checkpoint 0: "
    ), message
    raised = raised_by(zero_rows([3], 100), "t0") + raised_by(zero_rows([101, 102], 100), "t1")
    raised += raised_by(zero_rows([200, 201], 2), "t2")  # every row that shard computed: its own warning
    with pytest.warns(UserWarning) as record:
        _warnings.show(raised, 0, "test", labels, 3)
    some, every = (str(w.message) for w in record)
    assert some.startswith(
        "tracin.distributed test, rows [0, 100) on worker w (from 2 of 3 shards; other shards' copies name other "
        "numbers: rows [100, 200): '2 rows (101, 102)'): all-0 gradients for row 3 of the data: its gradient is 0"
    ), some
    assert every.startswith(
        "tracin.distributed test, rows [200, 300) on worker w (from 1 of 3 shards): all-0 gradients for all 2 rows "
        "computed (rows 200 to 201) of the data: "
    ), every


def test_a_warning_located_in_dask_on_the_worker_is_shown_at_the_users_call():
    """review343 L4: a tracin warning on a worker points at the first frame outside tracin, there Dask's task
    runner (dask/_task_spec.py): shown there on the client, it named no line of the user's. It is shown at
    the user's line that called into tracin.distributed, as a local export's is; others stay where raised."""
    import dask

    category = ("builtins", "RuntimeWarning", "RuntimeWarning")
    runner = dask.__file__.replace("__init__.py", "_task_spec.py")
    raised = [
        _warnings.Raised(category, "NaN loss for row 1", runner, 768, "dask._task_spec", "t0", "w", ours=True),
        _warnings.Raised(category, "from the user's loss_fn", "user.py", 3, None, "t0", "w"),
    ]
    with pytest.warns(RuntimeWarning) as record:
        line = sys._getframe().f_lineno + 1
        _warnings.show(raised, 0, "test", {"t0": "rows [0, 10)"}, 1)
    assert [(w.filename, w.lineno) for w in record] == [(__file__, line), ("user.py", 3)]


def test_only_tracins_own_warnings_located_in_dask_are_shown_at_the_users_call():
    """A warning Dask itself raises in a task, located in Dask's files, is not tracin's pointing at Dask's task
    runner: it stays where raised, with its module, so that the client's filters by module still apply (it was
    shown at the user's line, in the user's module: a filter ignoring module 'dask' let it through). A tracin
    warning located in the runner (LossWatch's, its first frame outside tracin there) is still moved."""
    import dask

    from tracin._export.loss_watch import LossWatch

    runner = dask.__file__.replace("__init__.py", "_task_spec.py")
    in_runner: dict = {}
    exec(compile("def run(f):\n    return f()\n", runner, "exec"), in_runner)  # a frame of Dask's task runner
    watch = LossWatch("autograd", "x")
    watch(np.array([np.nan]), type("Rows", (), {"start": 0, "count": 1})())

    def dasks_own() -> None:
        warnings.warn_explicit("Dask's own", FutureWarning, runner, 99, module="dask._task_spec")

    with _warnings.recorded() as caught:
        in_runner["run"](watch.flush)
        in_runner["run"](dasks_own)
    raised = _warnings._distinct(caught)
    for ignored, expected in (([], 2), (["dask"], 1)):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for module in ignored:
                warnings.filterwarnings("ignore", module=module)
            line = sys._getframe().f_lineno + 1
            _warnings.show(raised, 0, "test", {}, 1)
        assert [(w.category, w.filename, w.lineno) for w in record] == [
            (RuntimeWarning, __file__, line),
            (FutureWarning, runner, 99),
        ][:expected]


def _recording_task() -> tuple[threading.Thread, threading.Event, threading.Event]:
    """A thread (not started) whose task records its warnings (_warnings.recorded) from setting `recording`
    until `go` is set."""
    recording, go = threading.Event(), threading.Event()

    def task() -> None:
        with _warnings.recorded():
            recording.set()
            go.wait(30)

    return threading.Thread(target=task), recording, go


def test_a_client_catch_warnings_ending_while_a_task_records_leaves_no_filter_behind():
    """Client(processes=False): the client's catch_warnings around a submit (Job.send's, silencing Dask's
    'Sending large graph') is entered before a task on a worker thread starts recording and ends while it
    records. The task's recording, ending last, put back the filters as it found them, the client's
    temporary filter with them: it stayed after the call. Now it takes out only its own 'always' filter."""
    filters, show = list(warnings.filters), warnings.showwarning
    thread, recording, go = _recording_task()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
            thread.start()
            assert recording.wait(30)
        go.set()
        thread.join(30)
        assert warnings.filters == filters and warnings.showwarning is show
    finally:
        go.set()
        warnings.filters[:], warnings.showwarning = filters, show


def test_a_client_catch_warnings_entered_while_a_task_records_and_left_after_leaves_no_always_filter():
    """The other order: the client's catch_warnings entered while a task records, left after it ended, put
    back the filters it found, the recording's 'always' filter with them: every warning shown every time
    after the call. The recording takes its filter out of the list it added it to as well."""
    filters, show = list(warnings.filters), warnings.showwarning
    thread, recording, go = _recording_task()
    try:
        thread.start()
        assert recording.wait(30)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
            go.set()
            thread.join(30)
        assert warnings.filters == filters  # (its showwarning, handled()'s, it puts back: left, not looping)
    finally:
        go.set()
        warnings.filters[:], warnings.showwarning = filters, show


def test_the_row_warnings_of_thousands_of_shards_name_fifty_then_count():
    """The NaN-loss warning's copies from 2000 shards named every shard's rows, one line of 110,000 characters
    (review360 F5): 50 other shards are named, in shard order, the rest counted."""
    from tracin._export.loss_watch import STARTS

    labels = {f"t{i}": f"shard {i}" for i in range(2000)}
    category = ("builtins", "RuntimeWarning", "RuntimeWarning")
    raised = [
        _warnings.Raised(
            category, f"{STARTS}row {i * 10} of the data at checkpoint 0: its row", "x.py", 3, None, f"t{i}", "w"
        )
        for i in range(2000)
    ]
    with pytest.warns(RuntimeWarning) as record:
        _warnings.show(raised, 0, "test", labels, 2000)
    (message,) = (str(w.message) for w in record)
    named = "; ".join(f"shard {i}: 'row {i * 10} at checkpoint 0'" for i in range(1, 51))
    assert f"other shards' copies name other numbers: {named} and 1949 more): {STARTS}row 0 of" in message
    assert len(message) < 3000


def test_a_shards_float16_overflow_advice_is_not_merged_away():
    """One shard's NaN loss (float32) and another's infinite float16 loss (maybe an overflow: 'compute loss_fn in
    float32') were merged into the first's warning, the overflow advice lost (review370 F2): they stay two."""
    from tracin._export.loss_watch import LossWatch

    def raised_by(dtype, rows, task):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            watch = LossWatch("autograd", "autograd gives it")
            losses = np.ones(100, dtype)
            losses[np.array(rows) % 100] = np.inf if dtype == np.float16 else np.nan
            watch(losses, SimpleNamespace(start=rows[0] // 100 * 100, count=100))
            watch.flush()
        return [
            _warnings.Raised(
                _warnings._category_named(w.category), str(w.message), "x.py", 3, None, task, "w", ours=True
            )
            for w in record
        ]

    labels = {"t0": "rows [0, 100)", "t1": "rows [100, 200)", "t2": "rows [200, 300)"}
    raised = raised_by(np.float32, [7], "t0") + raised_by(np.float16, [105, 107], "t1")
    raised += raised_by(np.float16, [203], "t2")
    with pytest.warns(RuntimeWarning) as record:
        _warnings.show(raised, 0, "export", labels, 3)
    plain, overflow = (str(w.message) for w in record)
    assert plain.startswith("tracin.distributed export, rows [0, 100) on worker w (from 1 of 3 shards): "), plain
    assert "overflowed" not in plain
    assert overflow.startswith(
        "tracin.distributed export, rows [100, 200) on worker w (from 2 of 3 shards; other shards' copies name other "
        "numbers: rows [200, 300): 'row 203 at checkpoint 0'): loss_fn gives a NaN or infinite loss for 2 rows "
        "(105, 107)"
    ), overflow
    assert "a float16 loss that overflowed to infinity" in overflow and "compute loss_fn in float32" in overflow


def test_a_warning_of_the_users_starting_as_tracins_is_shown_as_itself():
    """A user's (or a library's) warning that happens to start with the NaN-loss warning's words was merged into
    tracin's own as if a shard's copy of it, its text shown only as "other numbers" (fr375 F4): only tracin's own
    warnings (Raised.ours) are merged by the rows they name."""
    from tracin._export.loss_watch import STARTS

    category = ("builtins", "RuntimeWarning", "RuntimeWarning")
    labels = {"t0": "rows [0, 100)", "t1": "rows [100, 200)"}
    ours = f"{STARTS}row 7 of the data at checkpoint 0: its gradient row is stored"
    theirs = f"{STARTS}my own note of the data: something else entirely"
    raised = [
        _warnings.Raised(category, ours, "x.py", 3, None, "t0", "w", ours=True),
        _warnings.Raised(category, theirs, "y.py", 5, None, "t1", "w"),
    ]
    with pytest.warns(RuntimeWarning) as record:
        _warnings.show(raised, 0, "export", labels, 2)
    shown = [str(w.message) for w in record]
    assert len(shown) == 2 and shown[1].endswith(f"(from 1 of 2 shards): {theirs}"), shown
