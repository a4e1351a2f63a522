"""Resuming a torch export into a store whose loss function identity (callable_identity) was recorded
with another code, another module name (a script run as __main__, then imported), or in the format
of versions that did not digest code; and how reordered checkpoints are named."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from drifted_states import drifted_states
from tracin._export.fingerprint import callable_identity, identity_before_code
from tracin._export.resume import changed_inputs, refuse_another_export, same_function, without_code
from tracin.torch import export_gradients

_SOURCE = """
import torch.nn.functional as F
{before}
STOP = 0  # the call that raises (an interrupted export), 0: none
calls = [0]


def loss_fn(outputs, targets):
    calls[0] += 1
    if calls[0] == STOP:
        raise KeyboardInterrupt
    return F.cross_entropy(outputs, targets, reduction="none"{extra})


def make_loss(base):
    def loss(outputs, targets):
        return base(outputs, targets)

    return loss


factory_loss = make_loss(loss_fn)  # a closure holding a function of the same script
"""


def _loss(tmp_path: Path, module: str, extra: str = "", before: str = "", name: str = "loss_fn") -> types.FunctionType:
    """loss_fn (or `name`) of _SOURCE (`extra` arguments, `before` lines above it): imported from a
    file as `module`, or run as a script ("__main__")."""
    path = tmp_path / f"{module.strip('_')}{len(list(tmp_path.glob('*.py')))}.py"
    path.write_text(_SOURCE.format(extra=extra, before=before))
    if module == "__main__":
        namespace: dict = {"__name__": "__main__"}
        exec(compile(path.read_text(), str(path), "exec", dont_inherit=True), namespace)
        return namespace[name]
    spec = importlib.util.spec_from_file_location(module, path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    try:
        spec.loader.exec_module(loaded)
    finally:
        del sys.modules[module]
    return getattr(loaded, name)


@pytest.fixture
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    states = drifted_states(model, 2)
    x = torch.randn(11, 4)
    y = torch.randint(0, 3, (11,))
    return model, [(states[0], 0.5), (states[1], 0.25)], (x, y)


def _export(problem, loss, store):
    model, checkpoints, data = problem
    return export_gradients(model, checkpoints, data, loss, store=store, batch_size=4, progress=False)


def test_an_edited_loss_function_is_refused_on_resume(problem, tmp_path):
    _export(problem, _loss(tmp_path, "lossmod"), tmp_path / "s")
    edited = _loss(tmp_path, "lossmod", ", label_smoothing=0.3")
    with pytest.raises(ValueError, match=r"the loss function differs .*: its code differs \(edited, or a library upg"):
        _export(problem, edited, tmp_path / "s")
    moved = _loss(tmp_path, "lossmod", before="# a comment and blank lines move it: its code is the same\n\n\n")
    assert _export(problem, moved, tmp_path / "s").complete


def _rows(store: Path) -> list[np.ndarray]:
    return [np.load(f) for f in sorted(store.glob("checkpoint_*.npy"))]


def test_a_script_loss_resumed_by_import_is_the_same_function(problem, tmp_path):
    script = _loss(tmp_path, "__main__")
    script.__globals__["STOP"] = 4  # in the second checkpoint's pass (3 batches each)
    with pytest.raises(KeyboardInterrupt):
        _export(problem, script, tmp_path / "s")
    resumed = _export(problem, _loss(tmp_path, "exp"), tmp_path / "s")  # refused ("other inputs") before
    assert resumed.complete and resumed.metadata["fingerprints"]["loss"] == callable_identity(script)
    whole = _export(problem, _loss(tmp_path, "exp"), tmp_path / "whole")
    assert whole.complete
    for a, b in zip(_rows(tmp_path / "s"), _rows(tmp_path / "whole"), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="its code differs"):  # the same name, another code: still refused
        _export(problem, _loss(tmp_path, "exp", ", label_smoothing=0.3"), tmp_path / "s")


def test_a_script_factory_loss_holding_a_script_function_resumes_by_import(problem, tmp_path):
    """review7 R1: make_loss(loss_fn) run as a script held "__main__.loss_fn" in its closure digest,
    "exp.loss_fn" imported: refused with the same code."""
    script = _loss(tmp_path, "__main__", name="factory_loss")
    script.__globals__["STOP"] = 4
    with pytest.raises(KeyboardInterrupt):
        _export(problem, script, tmp_path / "s")
    resumed = _export(problem, _loss(tmp_path, "exp", name="factory_loss"), tmp_path / "s")
    assert resumed.complete and resumed.metadata["fingerprints"]["loss"] == callable_identity(script)
    _export(problem, _loss(tmp_path, "exp", name="factory_loss"), tmp_path / "whole")
    for a, b in zip(_rows(tmp_path / "s"), _rows(tmp_path / "whole"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_store_recording_a_factory_loss_before_code_digests_resumes(problem, tmp_path):
    """A store written before code digests named the functions a closure holds with their module
    (identity_before_code): it resumes with the same factory loss, and refuses, as those versions
    did, one holding a function of another module."""
    loss = _loss(tmp_path, "lossmod", name="factory_loss")
    loss.__globals__["STOP"] = 4
    with pytest.raises(KeyboardInterrupt):
        _export(problem, loss, tmp_path / "s")
    loss.__globals__["STOP"] = 0
    before = identity_before_code(callable_identity(loss))
    assert before.startswith("lossmod.make_loss.<locals>.loss closure[base]=") and " code[" not in before
    assert without_code(callable_identity(loss)) != before  # the closure digest named "lossmod.loss_fn"
    manifest = tmp_path / "s" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["metadata"]["fingerprints"]["loss"] = before
    manifest.write_text(json.dumps(doc))
    resumed = _export(problem, loss, tmp_path / "s")
    assert resumed.complete and resumed.metadata["fingerprints"]["loss"] == before
    _export(problem, loss, tmp_path / "whole")
    for a, b in zip(_rows(tmp_path / "s"), _rows(tmp_path / "whole"), strict=True):
        np.testing.assert_array_equal(a, b)
    held = _loss(tmp_path, "lossmod", name="factory_loss").__globals__["make_loss"](_loss(tmp_path, "other"))
    with pytest.raises(ValueError, match="the loss function differs"):
        _export(problem, held, tmp_path / "s")


def test_a_store_recording_the_loss_without_code_resumes_with_the_same_function(problem, tmp_path):
    loss = _loss(tmp_path, "lossmod")
    loss.__globals__["STOP"] = 4
    with pytest.raises(KeyboardInterrupt):
        _export(problem, loss, tmp_path / "s")
    loss.__globals__["STOP"] = 0
    manifest = tmp_path / "s" / "manifest.json"
    doc = json.loads(manifest.read_text())
    assert doc["metadata"]["fingerprints"]["loss"].startswith("lossmod.loss_fn code[")
    doc["metadata"]["fingerprints"]["loss"] = "lossmod.loss_fn"  # as versions before code digests wrote it
    manifest.write_text(json.dumps(doc))
    resumed = _export(problem, loss, tmp_path / "s")
    assert resumed.complete and resumed.metadata["fingerprints"]["loss"] == "lossmod.loss_fn"
    _export(problem, loss, tmp_path / "whole")
    for a, b in zip(_rows(tmp_path / "s"), _rows(tmp_path / "whole"), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"the loss function differs \(lossmod.loss_fn there, other.loss_fn code"):
        _export(problem, _loss(tmp_path, "other"), tmp_path / "s")


def test_same_function_compares_names_code_and_recorded_formats():
    code = " code[3.11]=" + "a" * 32
    other = " code[3.11]=" + "b" * 32
    assert same_function("m.f", "m.f" + code)
    assert same_function("m.f closure[k]=12", "m.f closure[k]=12" + code)
    assert not same_function("m.f closure[k]=12", "m.f closure[k]=34" + code)
    assert not same_function("m.f", "n.f" + code)
    assert same_function("__main__.f" + code, "pkg.exp.f" + code)
    assert same_function("pkg.exp.f" + code, "__main__.f" + code)
    assert same_function("partial(__main__.f" + code + ", (), {})", "partial(exp.f" + code + ", (), {})")
    assert not same_function("__main__.f" + code, "exp.f" + other)
    assert not same_function("__main__.f" + code, "exp.g" + code)
    assert not same_function("a.f" + code, "b.f" + code)  # neither ran as a script
    tagged = "partial({}.f" + code + ", (), {{'tag': 'exp.v1'}})"  # review7 R5: the name alone is renamed
    assert same_function(tagged.format("__main__"), tagged.format("exp"))
    assert same_function(tagged.format("exp"), tagged.format("__main__"))
    instance = "{0}.L: <{0}.L object> {{'k': {1}}}" + code  # a loss object's default repr names its module
    assert same_function(instance.format("__main__", 1), instance.format("exp", 1))
    assert same_function(instance.format("exp", 1), instance.format("__main__", 1))
    assert not same_function(instance.format("__main__", 1), instance.format("exp", 2))
    assert without_code("partial(m.f" + code + ", (), {})") == "partial(m.f, (), {})"


def test_changed_inputs_names_reordered_checkpoints_and_another_python():
    assert changed_inputs({"checkpoints": ["a", "b", "c"]}, {"checkpoints": ["c", "b", "a"]}) == [
        "the same checkpoints in another order"
    ]
    assert changed_inputs({"checkpoints": ["a", "b", "c"]}, {"checkpoints": ["a", "b", "d"]}) == [
        "checkpoints[2] differs"
    ]
    (change,) = changed_inputs({"loss": "m.f code[3.10]=" + "a" * 32}, {"loss": "m.f code[3.11]=" + "b" * 32})
    assert "recorded under Python 3.10, this is Python 3.11" in change


def _ce(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def test_a_checkpoint_given_in_another_form_is_named_as_such_on_resume(problem, tmp_path):
    model, checkpoints, data = problem
    with pytest.raises(KeyboardInterrupt):
        export_gradients(
            model, checkpoints, _Interrupting(data), _ce, store=tmp_path / "s", batch_size=4, progress=False
        )
    torch.save(checkpoints[0][0], tmp_path / "c0.pt")
    as_file = [(str(tmp_path / "c0.pt"), checkpoints[0][1]), checkpoints[1]]
    with pytest.raises(
        ValueError,
        match=r"other inputs: checkpoints\[0\] was given as an in-memory state_dict there and as a file \(or folder\) "
        r"here .*pass it the same way to resume\. Rows",
    ):
        export_gradients(model, as_file, data, _ce, store=tmp_path / "s", batch_size=4, progress=False)
    changed = [({k: v + 1 for k, v in checkpoints[0][0].items()}, checkpoints[0][1]), checkpoints[1]]
    with pytest.raises(ValueError, match=r"other inputs: checkpoints\[0\] differs\. Rows"):
        export_gradients(model, changed, data, _ce, store=tmp_path / "s", batch_size=4, progress=False)
    resumed = export_gradients(model, checkpoints, data, _ce, store=tmp_path / "s", batch_size=4, progress=False)
    assert resumed.complete
    assert changed_inputs({"checkpoints": ["a", "b"]}, {"checkpoints": ["c", "b"]}, (["file", "state"], None)) == [
        "checkpoints[0] differs"
    ]


def test_changed_learning_rates_are_named_as_such(problem, tmp_path):
    model, checkpoints, data = problem
    with pytest.raises(KeyboardInterrupt):
        export_gradients(
            model, checkpoints, _Interrupting(data), _ce, store=tmp_path / "s", batch_size=4, progress=False
        )
    metadata = json.loads((tmp_path / "s" / "manifest.json").read_text())["metadata"]
    refuse_another_export(tmp_path / "s", metadata, [0.5, 0.25])  # the same: nothing to say
    with pytest.raises(
        ValueError, match=r"other settings: the learning rates \[0.5, 0.25\] there vs \[0.5, 0.2\] here"
    ):
        refuse_another_export(tmp_path / "s", metadata, [0.5, 0.2])


def test_a_changed_projection_names_the_entries_that_differ_not_both_records(problem, tmp_path):
    """review269 F1: a projection of another seed was refused with both whole records (every segment: thousands
    of characters for a transformer), the one difference left to be found by eye."""
    import tracin

    model, checkpoints, data = problem
    projection = tracin.Projection(6, seed=0)
    with pytest.raises(KeyboardInterrupt):
        export_gradients(
            model,
            checkpoints,
            _Interrupting(data),
            _ce,
            store=tmp_path / "s",
            batch_size=4,
            progress=False,
            projection=projection,
        )
    metadata = json.loads((tmp_path / "s" / "manifest.json").read_text())["metadata"]
    other = copy.deepcopy(metadata)
    other["projection"]["seed"] = 1
    with pytest.raises(ValueError, match=r"other settings: projection: seed 0 there vs 1 here(?!.*segments)"):
        refuse_another_export(tmp_path / "s", other, [0.5, 0.25])


class _Interrupting:
    """(x, y) batches of 4 whose third pass (the first checkpoint's rows) stops after one batch."""

    def __init__(self, data):
        self.data, self.passes = data, 0

    def __iter__(self):
        self.passes += 1
        x, y = self.data
        for i, start in enumerate(range(0, len(x), 4)):
            if self.passes == 3 and i == 1:
                raise KeyboardInterrupt
            yield x[start : start + 4], y[start : start + 4]


def test_a_store_resumed_with_another_preconditioner_names_the_preconditioner(problem, tmp_path):
    # the optimizer states are fingerprinted only with a preconditioner: without this check first, dropping
    # them (preconditioner=None) read as "the optimizer states saved with the checkpoints differ"
    model, checkpoints, data = problem
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    _ce(model(data[0]), data[1]).sum().backward()
    optimizer.step()
    state = copy.deepcopy(optimizer.state_dict())  # one state for both checkpoints: the same object
    with_states = [(*c, state) for c in checkpoints]
    common = dict(store=tmp_path / "s", batch_size=4, progress=False)
    export_gradients(model, with_states, data, _ce, preconditioner="adam", **common)
    with pytest.raises(
        ValueError,
        match=r"another preconditioner: the preconditioner differs \('adam' there, None here\)\. Rows from both "
        r"cannot be mixed: resume with preconditioner='adam'",
    ):
        export_gradients(model, checkpoints, data, _ce, **common)
    with pytest.raises(ValueError, match=r"the preconditioner differs \('adam' there, 'adam_update' here\)"):
        export_gradients(model, with_states, data, _ce, preconditioner="adam_update", **common)
    assert export_gradients(model, with_states, data, _ce, preconditioner="adam", **common).complete
    # the reverse: a plain store asks for no optimizer states (fix-review39 F5)
    plain = dict(common, store=tmp_path / "plain")
    export_gradients(model, checkpoints, data, _ce, **plain)
    refused = r"\(None there, 'adam' here\)\. .*: resume with preconditioner=None, export"
    with pytest.raises(ValueError, match=refused) as e:
        export_gradients(model, with_states, data, _ce, preconditioner="adam", **plain)
    assert "optimizer states it was exported with" not in str(e.value)


def _adam_state(model, data) -> dict:
    """copy.deepcopy of an Adam state_dict after one step on `data`, the model's weights restored."""
    weights = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    _ce(model(data[0]), data[1]).sum().backward()
    optimizer.step()
    model.load_state_dict(weights)
    return copy.deepcopy(optimizer.state_dict())


def test_stores_with_and_without_optimizer_state_sources_resume(problem, tmp_path):
    # metadata["optimizer_state_sources"] (how each optimizer-state digest was made) is part of a store's spec: a
    # store exported before it was recorded resumes without it (scoring trusts it), one recording it resumes too
    model, checkpoints, data = problem
    state = _adam_state(model, data)
    with_states = [(*c, state) for c in checkpoints]
    common = dict(batch_size=4, progress=False, preconditioner="adam")
    for name, older in (("older", True), ("newer", False)):
        with pytest.raises(KeyboardInterrupt):
            export_gradients(model, with_states, _Interrupting(data), _ce, store=tmp_path / name, **common)
        manifest = tmp_path / name / "manifest.json"
        doc = json.loads(manifest.read_text())
        assert doc["metadata"]["optimizer_state_sources"] == ["state", "state"]
        if older:
            del doc["metadata"]["optimizer_state_sources"]
            manifest.write_text(json.dumps(doc))
        resumed = export_gradients(model, with_states, data, _ce, store=tmp_path / name, **common)
        assert resumed.complete
        assert ("optimizer_state_sources" in resumed.metadata) is not older
        assert ("optimizer_state_sources" in json.loads(manifest.read_text())["metadata"]) is not older
        in_memory = export_gradients(model, with_states, data, _ce, **common)
        for got, expected in zip(resumed.kernel_side().blocks, in_memory.kernel_side().blocks, strict=True):
            np.testing.assert_array_equal(got, expected)
    # a side exported with other optimizer states: refused against the newer store, trusted against the older
    other = [(*c, _adam_state(model, (data[0][:5], data[1][:5]))) for c in checkpoints]
    test = export_gradients(model, other, data, _ce, **common)
    from tracin import GradientStore, scores
    from tracin.scoring import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match=r"optimizer states of checkpoints \[0, 1\] differ"):
        scores(test, GradientStore.open(tmp_path / "newer"))
    assert scores(test, GradientStore.open(tmp_path / "older")).shape == (11, 11)


def test_an_optimizer_state_given_in_another_form_is_named_as_such_on_resume(problem, tmp_path):
    model, checkpoints, data = problem
    state = _adam_state(model, data)
    common = dict(store=tmp_path / "s", batch_size=4, progress=False, preconditioner="adam")
    with pytest.raises(KeyboardInterrupt):
        export_gradients(model, [(*c, state) for c in checkpoints], _Interrupting(data), _ce, **common)
    torch.save(state, tmp_path / "opt.pt")
    as_file = [(*checkpoints[0], str(tmp_path / "opt.pt")), (*checkpoints[1], state)]
    with pytest.raises(
        ValueError,
        match=r"other inputs: the optimizer states saved with the checkpoints differ \(checkpoints\[0\]\[2\] was "
        r"given as an in-memory state there and as a file \(or folder\) here, .*pass it the same way to resume\)\. "
        r"Rows",
    ):
        export_gradients(model, as_file, data, _ce, **common)
    other = _adam_state(model, (data[0][:5], data[1][:5]))
    differ = r"other inputs: the optimizer states saved with the checkpoints differ\. Rows"
    with pytest.raises(ValueError, match=differ):
        export_gradients(model, [(*checkpoints[0], other), (*checkpoints[1], state)], data, _ce, **common)
    assert export_gradients(model, [(*c, state) for c in checkpoints], data, _ce, **common).complete
