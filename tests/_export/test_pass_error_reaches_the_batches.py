"""An error raised by the export loop while it computes or stores a batch (Ctrl-C, a full disk, a NaN row a store
refuses) is thrown into the pass's batches generator at its yield, so that what the generator does on leaving
(the adapters' LossWatch.flushed: a NaN-loss warning, a note on that very error under a warnings filter
"error") sees the error, not a GeneratorExit, and runs before the error leaves the export."""

from __future__ import annotations

import traceback
import warnings

import numpy as np
import pytest

from tests._export.test_driver import _Batch, _data, _Scaled
from tracin._export.driver import Options, export
from tracin._export.loss_watch import STARTS, LossWatch

_CKPTS = [({"scale": 2.0}, 0.5)]


class _Failing(_Scaled):
    """Fails computing the batch at row `at` with `error`; its batches generator records what it was left by."""

    def __init__(self, error: BaseException, at: int = 4):
        super().__init__(_data(12, 4))
        self.error, self.at, self.left_by = error, at, []

    def batches(self):
        try:
            yield from super().batches()
        except BaseException as e:
            self.left_by.append(e)
            raise

    def compute(self, state, batch):
        if batch.start == self.at:
            raise self.error
        return super().compute(state, batch)


def _options(store=None) -> Options:
    return Options("full", None, "float32", store, progress=False)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(28, "No space left on device"), ValueError("x")])
def test_the_generator_is_left_by_the_loops_own_error(error):
    framework = _Failing(error)
    with pytest.raises(type(error)) as raised:
        export(framework, _CKPTS, _options(), [])
    assert raised.value is error
    assert framework.left_by == [error]  # not a GeneratorExit, nor (left to the garbage collector) nothing yet


class _Watched(_Failing):
    """A pass that records a NaN loss for row 1 (batch 0) in a LossWatch, flushed as the adapters do."""

    def __init__(self, error: BaseException):
        super().__init__(error)
        self.watch = LossWatch("numpy's grad", "no case")

    def batches(self):
        with self.watch.flushed():
            yield from _Scaled.batches(self)

    def compute(self, state, batch):
        self.watch(np.where(np.arange(batch.count) + batch.start == 1, np.nan, 1.0), batch)
        return super().compute(state, batch)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_under_a_filter_error_the_nan_loss_warning_is_a_note_on_the_loops_error(tmp_path, error):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(type(error)) as raised:
            export(_Watched(error), _CKPTS, _options(tmp_path / "g"), [])
    assert raised.value is error
    notes = getattr(error, "__notes__", [])
    assert len(notes) == 1 and notes[0].startswith(f"RuntimeWarning: {STARTS}row 1 of the data at checkpoint 0")


def test_without_the_filter_the_warning_is_given_before_the_error_leaves():
    error = OSError(28, "No space left on device")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(OSError) as raised:
            export(_Watched(error), _CKPTS, _options(), [])
        said = [str(w.message) for w in caught]  # raised.value still holds the traceback (and the generator)
    assert raised.value is error and not getattr(error, "__notes__", [])
    assert len(said) == 1 and said[0].startswith(f"{STARTS}row 1 of the data at checkpoint 0"), said


class _Swallowing(_Failing):
    """A batches generator that takes the error thrown in and goes on yielding (closed by the loop)."""

    def batches(self):
        start = 0
        for x in self.data:
            try:
                yield _Batch(start, len(x), x)
            except BaseException as e:
                self.left_by.append(e)
            start += len(x)


def test_a_generator_that_takes_the_error_is_closed_and_the_error_raised():
    error = OSError(28, "No space left on device")
    framework = _Swallowing(error)
    with pytest.raises(OSError) as raised:
        export(framework, _CKPTS, _options(), [])
    assert raised.value is error and framework.left_by[0] is error
    assert isinstance(framework.left_by[-1], GeneratorExit)


class _CleanupFails(_Failing):
    def batches(self):
        try:
            yield from _Scaled.batches(self)
        finally:
            raise RuntimeError("cleanup failed")


def test_a_generator_whose_cleanup_fails_raises_that_chained_to_the_loops_error():
    error = ValueError("x")  # not a KeyboardInterrupt: raised before the fix, it would stop pytest
    with pytest.raises(RuntimeError, match="cleanup failed") as raised:
        export(_CleanupFails(error), _CKPTS, _options(), [])
    assert raised.value.__context__ is error


class _Plain(_Failing):
    """batches() an iterator without throw (a list's): the loop's error is raised as it is."""

    def batches(self):
        return iter(list(_Scaled.batches(self)))


def test_batches_that_are_no_generator_get_the_error_raised_as_it_is():
    error = ValueError("x")
    with pytest.raises(ValueError) as raised:
        export(_Plain(error), _CKPTS, _options(), [])
    assert raised.value is error


def _frames(error: BaseException) -> list[str]:
    return [frame.name for frame in traceback.extract_tb(error.__traceback__)]


@pytest.mark.parametrize("error", [ValueError("x"), OSError(28, "No space left on device")])
def test_the_error_keeps_the_traceback_of_where_it_was_raised(error):
    """Thrown into the generator, the error came back with the generator's frame and _thrown_into's inserted
    between export and the loop (fr368): its traceback is the one an iterator without throw leaves it."""
    with pytest.raises(type(error)) as raised:
        export(_Failing(error), _CKPTS, _options(), [])
    thrown = _frames(raised.value)
    plain_error = type(error)(*error.args)
    with pytest.raises(type(error)) as plain:
        export(_Plain(plain_error), _CKPTS, _options(), [])
    assert thrown == _frames(plain.value)
    assert thrown[-1] == "compute" and "_thrown_into" not in thrown and "batches" not in thrown


def test_a_stop_iteration_computing_a_batch_is_raised_as_itself():
    """A StopIteration from loss_fn (a next() on a spent iterator) thrown into the generator came back as
    RuntimeError('generator raised StopIteration') pointing at _thrown_into (PEP 479; fr368): it is raised as
    it is, as when the batches are no generator, and the generator was left by it."""
    error = StopIteration()
    framework = _Failing(error)
    with pytest.raises(StopIteration) as raised:
        export(framework, _CKPTS, _options(), [])
    assert raised.value is error and _frames(raised.value)[-1] == "compute"
    (left_by,) = framework.left_by  # (its `yield from` makes it PEP 479's RuntimeError there)
    assert left_by is error or left_by.__cause__ is error


class _WatchedLikeTheAdapters(_Watched):
    """Yields each batch itself inside LossWatch.flushed, as the adapters do (no `yield from`)."""

    def batches(self):
        with self.watch.flushed():
            for batch in _Scaled.batches(self):  # noqa: UP028 - not `yield from`: the throw stops at this yield
                yield batch


def test_under_a_filter_error_a_stop_iteration_gets_the_nan_loss_note(tmp_path):
    error = StopIteration()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(StopIteration) as raised:
            export(_WatchedLikeTheAdapters(error), _CKPTS, _options(tmp_path / "g"), [])
    assert raised.value is error
    notes = getattr(error, "__notes__", [])
    assert len(notes) == 1 and notes[0].startswith(f"RuntimeWarning: {STARTS}row 1 of the data at checkpoint 0")


class _Returning(_Failing):
    """A batches generator that takes the error thrown in and returns (its StopIteration is no error)."""

    def batches(self):
        start = 0
        for x in self.data:
            try:
                yield _Batch(start, len(x), x)
            except BaseException as e:
                self.left_by.append(e)
                return
            start += len(x)


def test_a_generator_that_takes_the_error_and_returns_leaves_the_error_raised():
    """throw() answered by the generator's return is a StopIteration: it was raised instead of the loop's error
    (the error only its __context__; fr368)."""
    error = OSError(28, "No space left on device")
    framework = _Returning(error)
    with pytest.raises(OSError) as raised:
        export(framework, _CKPTS, _options(), [])
    assert raised.value is error and framework.left_by == [error]
    assert _frames(raised.value)[-1] == "compute"
