"""The examples in tracin's docstrings (review69 F8: help(tracin) and the scoring functions had none) run as written."""

from __future__ import annotations

import doctest

import pytest

import tracin
import tracin.scoring


@pytest.mark.parametrize("module", [tracin, tracin.scoring], ids=lambda m: m.__name__)
def test_module_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, raise_on_error=False, verbose=False)
    assert result.failed == 0, result


@pytest.mark.parametrize("function", ["scores", "top_k", "self_influence", "aggregate"])
def test_each_scoring_function_has_an_example_that_runs(function):
    tests = doctest.DocTestFinder(recurse=False).find(getattr(tracin, function), function, globs={})
    assert sum(len(t.examples) for t in tests) >= 2, f"tracin.{function} has no runnable example"
    runner = doctest.DocTestRunner(verbose=False)
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_the_package_docstring_has_an_example():
    assert doctest.DocTestFinder(recurse=False).find(tracin)[0].examples
