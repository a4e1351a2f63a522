"""Fingerprints of data and checkpoints."""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import io
import json
import math
import os
import re
import sys
import threading
import typing

import numpy as np
import pytest

from tracin._export import fingerprint
from tracin._export.fingerprint import (
    DataFingerprint,
    callable_identity,
    checkpoint_file_digest,
    digest_arrays,
    digest_path,
)
from tracin._export.pretrained_folder import weight_files
from tracin._export.resume import changed_inputs, without_code


def test_array_digests_see_order_dtype_shape_and_contents():
    a, b = np.arange(6, dtype=np.float32), np.ones(3, np.int64)
    base = digest_arrays([a, b])
    assert digest_arrays([a.copy(), b.copy()]) == base
    assert (
        len(
            {
                base,
                digest_arrays([b, a]),
                digest_arrays([a.astype(np.float64), b]),
                digest_arrays([a.reshape(2, 3), b]),
                digest_arrays([a + 1, b]),
            }
        )
        == 5
    )


def test_path_digests_follow_file_contents(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_bytes(b"abc")
    before = digest_path(tmp_path / "d")
    (tmp_path / "d" / "x").write_bytes(b"abd")
    assert digest_path(tmp_path / "d") != before
    assert digest_path(tmp_path / "d" / "x") != digest_path(tmp_path / "d")  # names count too
    # review309: a file in a subfolder (an Orbax or sharded checkpoint's nested layout) counts too
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "y").write_bytes(b"abc")
    nested = digest_path(tmp_path / "d")
    (tmp_path / "d" / "sub" / "y").write_bytes(b"abd")
    assert nested != before and digest_path(tmp_path / "d") != nested


def test_a_save_pretrained_folder_is_digested_by_the_files_its_loader_reads(tmp_path):
    """A Trainer checkpoint-N/ folder: optimizer, scheduler, RNG and trainer state do not count."""
    folder = tmp_path / "checkpoint-500"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    extras = ["optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "config.json"]
    for name in extras:
        (folder / name).write_bytes(b"state")
    before = digest_path(folder)
    for name in extras:
        (folder / name).write_bytes(b"changed")
    assert digest_path(folder) == before
    (folder / "model.safetensors").write_bytes(b"weights2")
    assert digest_path(folder) != before


def test_a_sharded_folder_is_digested_by_its_index_and_shards(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    index = {"weight_map": {"a": "pytorch_model-1.bin", "b": "pytorch_model-2.bin"}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    for name in ("pytorch_model-1.bin", "pytorch_model-2.bin", "optimizer.pt", "stale-shard.bin"):
        (folder / name).write_bytes(name.encode())
    before = digest_path(folder)
    (folder / "optimizer.pt").write_bytes(b"other")
    (folder / "stale-shard.bin").write_bytes(b"other")  # not listed by the index: not read
    assert digest_path(folder) == before
    for name, content in (("pytorch_model-2.bin", b"other"), ("pytorch_model.bin.index.json", json.dumps(index) + " ")):
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        assert digest_path(folder) != before
        before = digest_path(folder)
    (folder / "pytorch_model-2.bin").unlink()
    with pytest.raises(FileNotFoundError, match="ckpt: no shard listed by its index at .*pytorch_model-2.bin"):
        digest_path(folder, "ckpt")


def _pass(fp: DataFingerprint, batches, where="pass"):
    fp.begin(where)
    for x, y in batches:
        fp.batch([y], [x])
    fp.end()


def test_a_functions_identity_ignores_the_future_imports_in_effect():
    """exec and notebooks pass their __future__ imports on to the code they compile: one loss compiled with and
    without `from __future__ import annotations` in effect (other co_flags) has one identity (no resume refused)."""
    import __future__

    fns = []
    for flags in (0, __future__.annotations.compiler_flag):
        namespace: dict = {}
        source = "def loss(p, x, y):\n    return (p * x - y) ** 2\n"
        exec(compile(source, "<cell>", "exec", flags=flags, dont_inherit=True), namespace)
        fns.append(namespace["loss"])
    assert fns[0].__code__.co_flags != fns[1].__code__.co_flags
    assert callable_identity(fns[0]) == callable_identity(fns[1])


def test_later_passes_must_see_the_first_pass_targets_in_order():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 2)), np.arange(6)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    fp = DataFingerprint()
    _pass(fp, batches)
    data = fp.data
    _pass(fp, batches)  # same data: fine
    with pytest.raises(ValueError, match="checkpoint 2: batch 0 of the data holds other targets"):
        _pass(fp, [(x[3:], y[3:]), (x[:3], y[:3])], "checkpoint 2")
    with pytest.raises(ValueError, match="gave 1 batches, the first pass gave 2"):
        _pass(fp, batches[:1])
    assert fp.data == data


def test_later_passes_must_see_the_first_pass_targets_with_the_same_inputs():
    """The same inputs with their targets reshuffled (labels drawn again each pass): the targets tell."""
    x, y = np.random.default_rng(0).normal(size=(6, 2)), np.arange(6)
    fp = DataFingerprint()
    _pass(fp, [(x[:3], y[:3]), (x[3:], y[3:])])
    with pytest.raises(ValueError, match="checkpoint 1: batch 1 of the data holds other targets than on the first"):
        _pass(fp, [(x[:3], y[:3]), (x[3:], y[[4, 3, 5]])], "checkpoint 1")


def test_later_passes_must_see_the_first_pass_inputs_too():
    """Rows of one class (equal targets) in another order: only their inputs tell."""
    x, y = np.random.default_rng(0).normal(size=(6, 2)), np.zeros(6)
    fp = DataFingerprint()
    _pass(fp, [(x[:3], y[:3]), (x[3:], y[3:])])
    with pytest.raises(ValueError, match="checkpoint 1: batch 1 of the data holds other inputs than on the first"):
        _pass(fp, [(x[:3], y[:3]), (x[[3, 5, 4]], y[3:])], "checkpoint 1")


def test_later_passes_compare_every_input_array_not_only_the_last():
    """review309: token ids reshuffled in a batch whose other input (an attention mask of ones) is the same, or
    labels reshuffled beside per-row weights of one: only the first array tells, and a later checkpoint's pass
    (or a resume) must still see it."""
    ids, mask = np.random.default_rng(0).integers(0, 100, size=(6, 4)), np.ones((6, 4))
    fp = DataFingerprint()
    for where, order in (("data", [0, 1, 2, 3, 4, 5]), ("checkpoint 0", [0, 1, 2, 3, 4, 5])):
        fp.begin(where)
        fp.batch(None, [ids[order], mask])
        fp.end()
    fp.begin("checkpoint 1")
    with pytest.raises(ValueError, match="checkpoint 1: batch 0 of the data holds other inputs than on the first"):
        fp.batch(None, [ids[[1, 0, 2, 3, 4, 5]], mask])
    weighted = DataFingerprint()  # targets (labels, per-row weights of one): the labels alone tell
    weighted.begin("data")
    weighted.batch([np.arange(6), np.ones(6)], [mask])
    weighted.end()
    weighted.begin("checkpoint 0")
    with pytest.raises(ValueError, match="checkpoint 0: batch 0 of the data holds other targets than on the first"):
        weighted.batch([np.arange(6)[::-1], np.ones(6)], [mask])


def test_the_data_digest_covers_inputs():
    x, y = np.zeros((4, 2)), np.arange(4)
    one, other = DataFingerprint(), DataFingerprint()
    _pass(one, [(x, y)])
    _pass(other, [(x + 1, y)])
    assert one.data != other.data


def test_only_the_first_pass_digests_the_data(monkeypatch):
    """BLAKE2b ran over every byte on every pass (review11 cost_ll.py: 66% of a last_layer export);
    later passes compare CRC-32s, still catching a changed value. The recorded digest is unchanged (a
    store written before resumes): BLAKE2b of each batch's input digest then target digest."""
    import hashlib

    from tracin._export import fingerprint

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 3)), np.arange(6)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    expected = hashlib.blake2b(digest_size=16)
    for a, b in batches:
        expected.update(digest_arrays([a]).encode() + digest_arrays([b]).encode())
    calls = []
    original = fingerprint.digest_arrays
    monkeypatch.setattr(fingerprint, "digest_arrays", lambda arrays: calls.append(1) or original(arrays))
    fp = DataFingerprint()
    _pass(fp, batches)
    assert fp.data == expected.hexdigest() and len(calls) == 4
    for _ in range(3):
        _pass(fp, batches)
    assert len(calls) == 4
    changed = x.copy()
    changed[4, 1] = np.nextafter(changed[4, 1], np.inf)
    with pytest.raises(ValueError, match="batch 1 of the data holds other inputs"):
        _pass(fp, [(changed[:3], y[:3]), (changed[3:], y[3:])])


def _loss(outputs, targets):
    return outputs


class _Loss:
    def __init__(self, smoothing: float):
        self.smoothing, self._cache = smoothing, object()

    def __call__(self, outputs, targets):
        return outputs


def test_callable_identity_names_functions_and_settings_not_addresses():
    code = f" code[{sys.version_info.major}.{sys.version_info.minor}]="
    assert callable_identity(_loss).startswith(f"{__name__}._loss{code}")
    wrapped = callable_identity(functools.wraps(_loss)(lambda o, t: o))
    assert without_code(wrapped) == without_code(callable_identity(_loss))  # named as the function it wraps
    assert without_code(callable_identity(lambda o, t: o)) == (
        f"{__name__}.test_callable_identity_names_functions_and_settings_not_addresses.<locals>.<lambda>"
    )
    partial = callable_identity(functools.partial(_loss, targets=1))
    assert without_code(partial) == f"partial({__name__}._loss, (), {{'targets': 1}})" and code in partial
    assert callable_identity(len) == "builtins.len"  # no code to digest
    a, b = _Loss(0.1), _Loss(0.1)
    assert callable_identity(a) == callable_identity(b)  # two objects: same repr once addresses are dropped
    assert "{'smoothing': 0.1}" in callable_identity(a) and " at 0x" not in callable_identity(a)
    assert callable_identity(_Loss(0.2)) != callable_identity(a)


class _Model:
    """An object whose loss method reads a setting of its own (review44 F1: Model(1.0).loss and
    Model(10.0).loss had one identity, so a resumed store mixed rows of both losses)."""

    def __init__(self, temperature: float):
        self.temperature, self.name, self.table, self._cache = temperature, "m", {"a": 1}, 0

    def loss(self, outputs, targets):
        return outputs / self.temperature

    @classmethod
    def build(cls, outputs, targets):
        return outputs


def test_a_bound_method_is_identified_with_its_objects_plain_settings():
    one, ten = callable_identity(_Model(1.0).loss), callable_identity(_Model(10.0).loss)
    assert without_code(one) == f"{__name__}._Model.loss self{{'name': 'm', 'temperature': 1.0}}"
    assert one != ten and without_code(ten).endswith("self{'name': 'm', 'temperature': 10.0}")
    assert callable_identity(_Model(1.0).loss) == one  # another object of the same settings: the same loss
    changed = changed_inputs({"loss": one}, {"loss": ten})
    assert changed and "temperature': 1.0} code" in changed[0] and "temperature': 10.0} code" in changed[0]
    assert " self" not in callable_identity(_Model.build)  # a class method: the class's attributes are not read


@dataclasses.dataclass(frozen=True)
class _Dropout:
    """A module-like dataclass (as Flax linen and Equinox modules are): plain fields, an array, a nested one."""

    rate: float
    dims: tuple = ()
    table: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(2))
    inner: typing.Any = None
    link: typing.Any = dataclasses.field(default=None, repr=False)  # as Flax's `parent`: not a setting


def _closing_over(module):
    def loss(outputs, targets):
        return outputs * module.rate

    return loss


class _Holder:
    def __init__(self, head):
        self.head = head

    def loss(self, outputs, targets):
        return outputs * self.head.rate


def test_a_dataclass_in_a_closure_or_held_by_a_bound_methods_object_is_identified_by_its_plain_fields():
    """A closure (or the object a loss method is bound to) holding a Flax-like module: nn.Dropout(0.1) and
    nn.Dropout(0.5) had one identity, so a store resumed with the other loss mixed rows of both."""
    low, high = (callable_identity(_closing_over(_Dropout(r))) for r in (0.1, 0.5))
    assert low != high and " closure[module]=" in low
    assert callable_identity(_closing_over(_Dropout(0.1))) == low  # equal fields: the same loss
    changed = changed_inputs({"loss": low}, {"loss": high})
    assert changed and "module" in changed[0]
    nested = {callable_identity(_closing_over(_Dropout(0.1, inner=_Dropout(r)))) for r in (0.2, 0.3)}
    assert len(nested) == 2 and low not in nested
    assert callable_identity(_closing_over(_Dropout(0.1, dims=(1, 2)))) != low
    # arrays (weights, loaded per checkpoint) and fields the dataclass does not show are not settings
    assert callable_identity(_closing_over(_Dropout(0.1, table=np.ones(2)))) == low
    assert callable_identity(_closing_over(_Dropout(0.1, link=_Dropout(0.9)))) == low
    held = [callable_identity(_Holder(_Dropout(r)).loss) for r in (0.1, 0.5)]
    assert held[0] != held[1] and "self{'head': '_Dropout(rate=0.1, dims=(), inner=None)'}" in held[0]


@dataclasses.dataclass(frozen=True)
class _Stack:
    """An Equinox-like module keeping its layers in a tuple, whose method is the loss."""

    layers: tuple
    act: typing.Any = None

    def loss(self, outputs, targets):
        return outputs


class _Layers:
    """A torch-style object holding module-like dataclasses in a list."""

    def __init__(self, layers):
        self.layers = layers

    def loss(self, outputs, targets):
        return outputs


def test_a_bound_methods_object_holding_dataclasses_in_a_tuple_or_list_is_identified_by_their_fields():
    """Equinox keeps submodules in tuples (MLP.layers): a closure read them, the object of a bound method
    did not, so Head((Scale(1.0),)).loss and Head((Scale(100.0),)).loss resumed one store silently."""
    low, high = (callable_identity(_Stack((_Dropout(r),)).loss) for r in (0.1, 0.5))
    assert low != high and "self{'act': None, 'layers': '(_Dropout(rate=0.1, dims=(), inner=None))'}" in low
    assert callable_identity(_Stack((_Dropout(0.1),)).loss) == low
    changed = changed_inputs({"loss": low}, {"loss": high})
    assert changed and "rate=0.1" in changed[0] and "rate=0.5" in changed[0]
    listed = [callable_identity(_Layers([_Dropout(0.2), _Dropout(r)]).loss) for r in (0.1, 0.5)]
    assert listed[0] != listed[1] and "self{'layers': '[_Dropout(rate=0.2" in listed[0]
    # an object holding no dataclass keeps the identity it had: its lists are not read
    assert " self" not in callable_identity(_Layers([1.0, 2.0]).loss)
    # an Equinox model of many layers: its long text recorded as a digest, which still tells them apart
    many = [callable_identity(_Stack(tuple(_Dropout(r) for _ in range(40))).loss) for r in (0.1, 0.5)]
    assert many[0] != many[1] and len(many[0]) < 200 and "'layers': 'tuple digest=" in many[0]


@dataclasses.dataclass
class _Lazy:
    """As a bound Flax linen module: setup() adds its submodules (and other attributes) on first use."""

    rate: float

    def loss(self, outputs, targets):
        if "drop" not in self.__dict__:
            self.drop, self.calls = _Dropout(self.rate), 1
        return outputs * self.drop.rate


def test_a_dataclass_bound_methods_object_is_read_by_its_declared_fields_not_the_attributes_it_gains():
    """A bound Flax module's setup() grows its __dict__ once the loss has run: a store exported with
    b.loss was refused ('the loss function differs') when resumed with the same b.loss."""
    lazy = _Lazy(0.1)
    before = callable_identity(lazy.loss)
    assert without_code(before) == f"{__name__}._Lazy.loss self{{'rate': 0.1}}"
    lazy.loss(1.0, None)
    assert callable_identity(lazy.loss) == before
    assert callable_identity(_Lazy(0.5).loss) != before


def _relu(z):
    return max(z, 0.0)


def _gelu(z):
    return z


@dataclasses.dataclass(frozen=True)
class _Act:
    """A module-like dataclass holding its activation function (a Flax module's act=nn.relu)."""

    act: typing.Any
    scale: float = 1.0


_ACTIVATION = """
def act(z):
    return z * 2
"""


def test_functions_dataclass_fields_hold_are_identified_by_name_and_code():
    """A Flax module's act=nn.relu vs act=nn.gelu (an Equinox MLP's activation) had one identity."""
    relu = callable_identity(_closing_over(_Act(_relu)))
    assert relu == callable_identity(_closing_over(_Act(_relu)))
    assert relu != callable_identity(_closing_over(_Act(_gelu)))
    builtins = {callable_identity(_closing_over(_Act(f))) for f in (math.tanh, math.sin, math.tanh)}
    assert len(builtins) == 2 and relu not in builtins
    partials = {callable_identity(_closing_over(_Act(functools.partial(_relu, z=z)))) for z in (1.0, 2.0)}
    assert len(partials) == 2 and relu not in partials
    # by qualname and code, as a closure's functions: a script's function is the same imported, an edit is not
    script, imported = (
        callable_identity(_closing_over(_Act(_defined(_ACTIVATION, m, "act")))) for m in ("__main__", "m")
    )
    edited = callable_identity(_closing_over(_Act(_defined(_ACTIVATION.replace("* 2", "* 3"), "m", "act"))))
    assert script == imported != edited
    lambdas = {callable_identity(_closing_over(_Act(f))) for f in (lambda z: z, lambda z: -z)}
    assert len(lambdas) == 2
    bound = [callable_identity(_Stack((), act=f).loss) for f in (_relu, _gelu)]
    assert bound[0] != bound[1] and "'act': '_relu code[" in bound[0]
    # a field holding the loss whose closure holds the dataclass: described once, not endlessly
    held = _Act(None)
    loss = _closing_over(held)
    object.__setattr__(held, "act", loss)
    assert callable_identity(loss) == callable_identity(loss)


@dataclasses.dataclass
class _Node:
    value: int
    below: typing.Any = None

    def loss(self, outputs, targets):
        return outputs


def _chain(values):
    node = None
    for value in reversed(values):
        node = _Node(value, node)
    return node


def test_deeply_nested_dataclasses_are_read_to_a_bound_without_a_recursion_error():
    """A chain of thousands of nested dataclasses raised RecursionError out of export_gradients."""
    values = list(range(3000))
    deep = callable_identity(_closing_over(_chain(values)))
    assert deep == callable_identity(_closing_over(_chain(values)))
    assert deep != callable_identity(_closing_over(_chain([-1, *values[1:]])))
    # past the bound, the type's name alone: a change that deep is not seen
    assert deep == callable_identity(_closing_over(_chain([*values[:-1], -1])))
    method = callable_identity(_chain(values).loss)
    assert method == callable_identity(_chain(values).loss) != callable_identity(_chain([7, *values[1:]]).loss)


_METHOD_FIELD = """
import dataclasses


class Scaler:
    def __init__(self, s):
        self.s = s

    def f(self, z):
        return z * self.s


@dataclasses.dataclass
class Head:
    post: object

    def loss(self, outputs, targets):
        return self.post(outputs)


def make(s):
    return Head(Scaler(s).f).loss
"""


def test_a_method_a_dataclass_field_holds_is_named_without_its_module():
    """Head(Scaler(2.0).f).loss exported from a script and resumed after importing it was refused: the
    field's method was named "__main__.Scaler.f" there, "lossmod.Scaler.f" here."""
    from tracin._export.resume import same_function

    script, imported = (callable_identity(_defined(_METHOD_FIELD, m, "make")(2.0)) for m in ("__main__", "lossmod"))
    assert "self{'post': \"Scaler.f self{'s': 2.0} code[" in script
    assert script.partition(" ")[2] == imported.partition(" ")[2] and same_function(script, imported)
    # its object's settings and its code still count
    assert callable_identity(_defined(_METHOD_FIELD, "lossmod", "make")(3.0)) != imported
    edited = _defined(_METHOD_FIELD.replace("z * self.s", "z + self.s"), "lossmod", "make")(2.0)
    assert callable_identity(edited) != imported
    # a builtin keeps its module
    assert "'act': 'math.tanh'" in callable_identity(_Stack((), act=math.tanh).loss)


@dataclasses.dataclass
class _Logged:
    """A loss object appending to a call log (a list field), holding submodules in a list and a dict."""

    temperature: float = 1.0
    history: list = dataclasses.field(default_factory=list)
    heads: typing.Any = None

    def loss(self, outputs, targets):
        self.history.append(len(self.history))
        return outputs / self.temperature


def test_list_and_dict_fields_count_for_the_dataclasses_and_functions_they_hold_not_plain_values():
    """A @dataclass loss object's `history: list` it appended to changed its identity at every call: its
    export, killed and resumed with the same object, was refused (a non-dataclass object's was not)."""
    logged = _Logged()
    before = callable_identity(logged.loss)
    logged.loss(1.0, None)
    logged.loss(1.0, None)
    assert callable_identity(logged.loss) == before and "history" not in before
    assert callable_identity(_Logged(2.0).loss) != before
    # as in another object's attribute: only the dataclasses it holds
    assert callable_identity(_Layers([_Dropout(0.2), 1.0]).loss) == callable_identity(_Layers([_Dropout(0.2)]).loss)
    assert callable_identity(_Layers([_Dropout(0.2)]).loss) != callable_identity(_Layers([_Dropout(0.3)]).loss)
    # the dataclasses and functions lists and dicts hold still count, a dict's by sorted keys
    listed = [callable_identity(_Logged(heads=[_Dropout(r), 3]).loss) for r in (0.1, 0.5)]
    assert listed[0] != listed[1] and "'heads': '[_Dropout(rate=0.1" in listed[0]
    assert callable_identity(_Logged(heads=[_relu]).loss) != callable_identity(_Logged(heads=[_gelu]).loss)
    keyed = [callable_identity(_Logged(heads={"b": _Dropout(0.2), "a": _Dropout(r), "n": 1}).loss) for r in (0.1, 0.9)]
    assert (
        keyed[0] != keyed[1] and "'heads': \"{'a': _Dropout(rate=0.1, dims=(), inner=None), 'b': _Dropout" in keyed[0]
    )
    swapped = callable_identity(_Logged(heads={"a": _Dropout(0.1), "b": _Dropout(0.2)}).loss)
    assert swapped == keyed[0]
    assert callable_identity(_Logged(heads={"a": 1.0}).loss) == callable_identity(_Logged(heads={"a": 2.0}).loss)
    # a non-dataclass object's dict of dataclasses too
    assert callable_identity(_Layers({"a": _Dropout(0.1)}).loss) != callable_identity(
        _Layers({"a": _Dropout(0.9)}).loss
    )
    # a list holding itself (twice) is read once
    cyclic: list = [_Dropout(0.1)]
    cyclic += [cyclic, cyclic]
    assert callable_identity(_Layers(cyclic).loss) == callable_identity(_Layers(cyclic).loss)


@dataclasses.dataclass(frozen=True)
class _Weights:
    """A frozen config keeping its class weights in a list (and maybe more in a dict)."""

    class_weights: list
    by_name: typing.Any = None

    def loss(self, outputs, targets):
        return outputs * self.class_weights[0]


def test_plain_values_of_lists_and_dicts_count_in_frozen_dataclasses_not_in_mutable_ones():
    """The plain values of a list or dict field counted in no dataclass: a frozen config's class weights
    (as Flax's Sequence[float] dropout rates or an Equinox module's list of scales) [1.0, 5.0] and
    [1.0, 1.0] had one identity, so a store resumed with the other finished silently. A list reads as a
    tuple there (Flax makes it one when it binds a module)."""
    first = callable_identity(_Weights([1.0, 5.0]).loss)
    assert first != callable_identity(_Weights([1.0, 1.0]).loss) and "'class_weights': '(1.0, 5.0)'" in first
    assert callable_identity(_Weights([1.0, 5.0]).loss) == first
    keyed = callable_identity(_Weights([1.0], {"b": 2.0, "a": [1.0, None]}).loss)
    assert keyed == callable_identity(_Weights([1.0], {"a": [1.0, None], "b": 2.0}).loss)  # sorted keys
    assert "'by_name': \"{'a': (1.0, None), 'b': 2.0}\"" in keyed
    assert keyed != callable_identity(_Weights([1.0], {"a": [1.0, None], "b": 3.0}).loss)
    assert callable_identity(_closing_over(_Weights([1.0]))) != callable_identity(_closing_over(_Weights([2.0])))
    assert callable_identity(_Stack(([0.1],)).loss) != callable_identity(_Stack(([0.5],)).loss)
    assert callable_identity(_Stack(([0.1],)).loss) == callable_identity(_Stack(((0.1,),)).loss)
    # a frozen dataclass in a mutable one's list still counts its own lists
    assert callable_identity(_Logged(heads=[_Weights([1.0])]).loss) != callable_identity(
        _Logged(heads=[_Weights([2.0])]).loss
    )
    # a mutable dataclass's list, in a frozen one too, stays out: a call log
    logged = _Logged()
    before = [callable_identity(_Stack((logged,)).loss), callable_identity(_Weights([1.0], logged).loss)]
    logged.loss(1.0, None)
    assert [callable_identity(_Stack((logged,)).loss), callable_identity(_Weights([1.0], logged).loss)] == before
    assert callable_identity(_Logged(heads={"a": 1.0}).loss) == callable_identity(_Logged(heads={"a": 2.0}).loss)


def test_an_item_without_settings_keeps_its_place_in_a_tuple_or_list_field():
    """A tuple or list field (a list in a frozen dataclass reads as one) holding an array or a set beside a
    submodule was left out whole, so the submodule's setting could change silently (review53 F1: an
    Equinox Head([Dropout(0.1), W(array)]) resumed with Dropout(0.9)); such an item is recorded as "_"."""
    first = callable_identity(_Stack((_Weights([0.1]), np.ones(2))).loss)
    assert first != callable_identity(_Stack((_Weights([0.9]), np.ones(2))).loss)
    assert "(_Weights(class_weights=(0.1), by_name=None), _)" in first
    assert first == callable_identity(_Stack((_Weights([0.1]), np.zeros(2))).loss)  # weights are no setting
    assert callable_identity(_Weights([0.1, {1}]).loss) != callable_identity(_Weights([0.9, {1}]).loss)
    assert "act" not in callable_identity(_Stack((np.ones(2),), act=np.ones(1)).loss)  # only arrays: left out


def test_numpy_scalar_fields_are_the_same_under_any_print_options():
    """np.float64, np.complex128 and np.str_ subclass float, complex and str: a field holding one was
    recorded by its repr, "np.float64(0.1)" under NumPy 2 but "0.1" under NumPy 1 or legacy print options,
    so a store exported in one was refused in the other (np.longdouble too: its .item() stays one)."""
    values = [np.float64(0.1), np.complex128(1j), np.str_("a"), np.longdouble(0.1), np.bool_(True), np.float32(0.5)]

    def identities():
        return [callable_identity(_Stack((), act=v).loss) for v in values] + [
            callable_identity(_Weights([v]).loss) for v in values
        ]

    now = identities()
    np.set_printoptions(legacy="1.25")
    try:
        legacy = identities()
    finally:
        np.set_printoptions(legacy=False)
    assert legacy == now and len(set(now)) == len(now)
    assert "'act': 'float64(0.1)'" in now[0] and "'act': 'complex128(1j)'" in now[1]
    assert "'act': \"str('a')\"" in now[2] and f"'act': '{np.dtype(np.longdouble).name}(0.1)'" in now[3]
    assert "'act': 'bool(True)'" in now[4] and "'class_weights': '(float32(0.5))'" in now[-1]
    assert callable_identity(_Stack((), act=np.float64(0.1)).loss) != callable_identity(_Stack((), act=0.1).loss)


class _Reduction(enum.Enum):
    MEAN = "mean"
    SUM = "sum"


def test_enums_dtypes_numpy_scalars_ufuncs_and_torch_modules_in_fields_are_identified():
    """Fields holding an enum (Flax's precision), a dtype, a NumPy float32, np.tanh or nn.ReLU() were
    left out: a loss changed in them resumed its store silently."""
    torch = pytest.importorskip("torch")

    def ident(value):
        return callable_identity(_Stack((), act=value).loss)

    pairs = [
        (_Reduction.MEAN, _Reduction.SUM),
        (np.float32, np.float16),
        (np.dtype("float32"), np.dtype("int32")),
        (np.float32(1.0), np.float32(100.0)),
        (np.int64(1), np.int64(2)),
        (np.float32(1.0), np.int64(1)),
        (np.tanh, np.sin),
        (torch.float32, torch.bfloat16),
        (torch.nn.ReLU(), torch.nn.Tanh()),
        (torch.nn.Dropout(0.1), torch.nn.Dropout(0.5)),
    ]
    for a, b in pairs:
        assert ident(a) == ident(a) != ident(b), (a, b)
    assert "'act': 'dtype(float32)'" in ident(np.float32) and ident(np.float32) == ident(np.dtype("float32"))
    assert "'act': '_Reduction.MEAN'" in ident(_Reduction.MEAN)
    assert "'act': 'float32(1.0)'" in ident(np.float32(1.0))
    assert "'act': 'Dropout(p=0.1, inplace=False)'" in ident(torch.nn.Dropout(0.1))
    # in a tuple (Equinox layers) and a closure's dataclass too
    assert ident((np.float32(1.0),)) != ident((np.float32(2.0),))
    assert callable_identity(_closing_over(_Act(np.tanh))) != callable_identity(_closing_over(_Act(np.sin)))


class _Weighted:
    """A loss object holding its class weights as a public NumPy array."""

    def __init__(self, weights: np.ndarray):
        self.weights, self.reduction = weights, "none"

    def __call__(self, outputs, targets):
        return outputs


def test_callable_identity_digests_the_arrays_a_loss_holds():
    plain = callable_identity(_Weighted(None))
    assert " arrays[" not in plain  # identities of array-free losses are as older versions made them
    a = callable_identity(_Weighted(np.array([1.0, 2.0, 3.0])))
    assert a == callable_identity(_Weighted(np.array([1.0, 2.0, 3.0])))  # stable: contents, not addresses
    assert " arrays[weights]=" in a and " at 0x" not in a
    others = [np.array([1.0, 5.0, 0.1]), np.array([1.0, 2.0, 3.0], np.float32), np.array([[1.0, 2.0, 3.0]])]
    assert len({a, *(callable_identity(_Weighted(w)) for w in others)}) == 4  # contents, dtype, shape


def test_a_loss_identity_gaining_arrays_is_a_change_explained_for_older_stores():
    old = "m.Loss: Loss() {'reduction': 'none'}"
    (change,) = changed_inputs({"loss": old}, {"loss": old + " arrays[weight]=ab"})
    assert change.startswith(f"the loss function differs ({old} there, {old} arrays[weight]=ab here)")
    assert "before the arrays a loss holds" in change
    (change,) = changed_inputs({"loss": old + " arrays[weight]=cd"}, {"loss": old + " arrays[weight]=ab"})
    assert "before the arrays" not in change


def _make_loss(scale, weights=None):
    def loss(outputs, targets):
        return scale * outputs if weights is None else weights * outputs

    return loss


def _recursive(n):
    return n if n < 1 else _recursive(n - 1)


def _recursive_factory(k):
    def inner(n):
        return k if n < 1 else inner(n - 1)

    return inner


def test_callable_identity_digests_closure_settings_and_partial_arrays():
    """A factory's captured setting and an array given to functools.partial (whose repr NumPy and JAX
    abbreviate with '...') are fingerprinted; identities of functions without them are unchanged."""
    name = f"{__name__}._make_loss.<locals>.loss"
    same, other = callable_identity(_make_loss(1.0)), callable_identity(_make_loss(100.0))
    assert same == callable_identity(_make_loss(1.0)) != other
    assert same.startswith(name + " closure[scale, weights]=") and other.startswith(name + " closure[")
    assert without_code(same) != without_code(other)  # the closure digest tells them apart, not the code
    big = np.ones(5000, np.float32)
    changed = big.copy()
    changed[2500] = 100.0
    assert repr(big) == repr(changed)  # what the partial's identity held alone
    identities = {
        callable_identity(functools.partial(_loss, targets=a)) for a in (big, changed, big.astype(np.float64))
    }
    assert len(identities) == 3 and all(" arrays[targets]=" in i for i in identities)
    weighted = {callable_identity(_make_loss(1.0, w)) for w in (big, changed)}
    assert len(weighted) == 2
    assert without_code(callable_identity(_recursive)) == f"{__name__}._recursive"  # a global, not a closure
    assert callable_identity(_recursive_factory(2)) != callable_identity(_recursive_factory(3))  # no endless loop
    (change,) = changed_inputs({"loss": name}, {"loss": without_code(same)})
    assert "before the settings a function's closure holds" in change


def _self_partial_factory(k):
    def step(x, depth):
        return x * k if depth == 0 else again(x, depth - 1)

    again = functools.partial(step)
    return step, again


def test_a_partial_of_a_function_held_in_its_own_closure_is_described_without_endless_recursion():
    step, again = _self_partial_factory(2)
    name = f"{__name__}._self_partial_factory.<locals>.step"
    assert callable_identity(step).startswith(f"{name} closure[again, k]=")  # a RecursionError before
    assert callable_identity(again).startswith(f"partial({name} closure[again, k]=")
    assert callable_identity(step) == callable_identity(_self_partial_factory(2)[0])
    assert callable_identity(step) != callable_identity(_self_partial_factory(3)[0])


def _weighted_loss(weights):
    log = {}

    def loss(outputs, targets):
        log[len(log)] = weights[0]
        return weights[1] * outputs

    return loss


def test_lists_of_settings_a_loss_closure_holds_are_its_identity():
    """Class weights in a captured list count again (review11 closure_list_resume.py: editing them
    resumed a store silently), and the refusal names the closure variables; a dict the loss logs
    into is left out. A call counter belongs outside the closure."""
    weights = [1.0, 3.0]
    loss = _weighted_loss(weights)
    before = callable_identity(loss)
    loss(1.0, None)
    assert callable_identity(loss) == before and " closure[weights]=" in before
    weights[1] = 10.0
    now = callable_identity(loss)
    assert now != before
    (change,) = changed_inputs({"loss": before}, {"loss": now})
    assert "the loss function differs" in change and "a value its closure holds changed (weights)" in change
    assert "call counter" in change
    assert callable_identity(_make_loss((1, 2))) != callable_identity(_make_loss((1, 3)))


@dataclasses.dataclass(frozen=True)
class _Config:
    names: frozenset
    depth: int = 2


class _Named(typing.NamedTuple):
    names: frozenset


def test_stable_repr_sorts_sets_inside_dataclasses_namedtuples_and_dict_subclasses():
    """Each printed its set in PYTHONHASHSEED's order (review11 setobj2.py), so an Equinox static
    field Cfg(frozenset) refused a store resumed in another process; objects without a set keep
    their repr (digests recorded before stay the same)."""
    from tracin._export.fingerprint import stable_repr

    words = [f"w{i}" for i in range(8)]
    names = frozenset(reversed(words))
    text = "frozenset({" + ", ".join(map(repr, words)) + "})"
    assert stable_repr(_Config(names)) == f"_Config(names={text}, depth=2)"
    assert stable_repr(_Named(names)) == f"_Named(names={text})"
    assert stable_repr(collections.OrderedDict(a=names)) == f"OrderedDict({{'a': {text}}})"
    assert stable_repr((_Config(names),)) == f"(_Config(names={text}, depth=2),)"
    plain = [_Config((1, 2)), _Named(3), collections.OrderedDict(a=1)]
    assert [stable_repr(o) for o in plain] == [repr(o) for o in plain]


def _compiled(source: str, module: str = "lossmod", filename: str = "loss.py") -> typing.Any:
    """The function `f` that `source` defines, as module `module` defines it from `filename`."""
    namespace: dict = {"__name__": module}
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)
    return namespace["f"]


_F = "def f(o, t, s=0.1):\n    return sum(x * s for x in o) + (lambda v: v + 1)(t)\n"


def test_callable_identity_digests_a_functions_code_not_where_it_is():
    """An edited body, default, nested lambda or generator changes the identity; moving the function
    (another file, other line numbers, a comment) does not."""
    base = callable_identity(_compiled(_F))
    assert base == callable_identity(
        _compiled("# moved\n\n\n" + _F.replace("\n    return", "  # a comment\n    return"), filename="other.py")
    )
    edited = [
        _F.replace("x * s", "x * s * 2"),  # the generator's code (a nested code object)
        _F.replace("v + 1", "v + 2"),  # the lambda's
        _F.replace("s=0.1", "s=0.3"),  # a default value
        _F.replace("sum(", "max("),  # a global it names
        _F.replace("(o, t,", "(o, t, u=None,"),  # its arguments
        _F.replace("return", "try:\n        return").replace("(t)\n", "(t)\n    finally:\n        pass\n"),
    ]
    identities = {base, *(callable_identity(_compiled(e)) for e in edited)}
    assert len(identities) == len(edited) + 1
    assert all(without_code(i) == "lossmod.f" for i in identities)  # the name alone, as before


def test_callable_identity_digests_keyword_only_default_values():
    """review309: a keyword-only default (loss(o, t, *, s=0.1)) is in neither the code nor the positional
    defaults; an edited one is another loss, so a resume must not take the old rows as its own."""
    kw = "def f(o, t, *, s=0.1):\n    return sum(x * s for x in o) - t\n"
    base = callable_identity(_compiled(kw))
    assert base == callable_identity(_compiled(kw))
    assert base != callable_identity(_compiled(kw.replace("s=0.1", "s=0.3")))
    assert base != callable_identity(_compiled(kw.replace("s=0.1", "s=0.1, r=2")))


def test_callable_identity_digests_the_code_of_functions_a_closure_or_partial_holds():
    def factory(helper):
        def loss(o, t):
            return helper(o, t)

        return loss

    a, b = _compiled("def f(o, t):\n    return o - t\n"), _compiled("def f(o, t):\n    return o + t\n")
    assert callable_identity(factory(a)) != callable_identity(factory(b))
    assert without_code(callable_identity(factory(a))) == without_code(callable_identity(factory(b)))
    assert callable_identity(functools.partial(a, t=1)) != callable_identity(functools.partial(b, t=1))
    # review309: a partial the closure holds (make_loss(functools.partial(helper, t=1))): the helper's code counts
    assert callable_identity(factory(functools.partial(a, t=1))) != callable_identity(
        factory(functools.partial(b, t=1))
    )
    method = _Loss(0.1).__call__
    assert callable_identity(method).endswith(callable_identity(_Loss.__call__).rpartition(" ")[2])


_FACTORY = """
import functools


def inner(o, t):
    return o - t


def make(base, scale):
    def f(o, t):
        return scale * base(o, t)

    return f


f = make(inner, 0.5)
g = make(functools.partial(inner, t=2), 0.5)
"""


def _defined(source: str, module: str, name: str = "f") -> typing.Any:
    namespace: dict = {"__name__": module}
    exec(compile(source, "loss.py", "exec", dont_inherit=True), namespace)
    return namespace[name]


def test_functions_a_closure_holds_are_named_without_their_module():
    """A factory's loss holding a function of the same script (review7 R1: make_loss(_loss_inner) run
    as a script, then imported, was refused): the closure names it by its qualname, whose code the
    outer digest covers; an edit of the held function still tells them apart."""
    from tracin._export.fingerprint import identity_before_code

    for name in ("f", "g"):
        script, imported = (callable_identity(_defined(_FACTORY, m, name)) for m in ("__main__", "lossmod"))
        assert without_code(script).replace("__main__.", "lossmod.", 1) == without_code(imported)
        assert script.partition(" ")[2] == imported.partition(" ")[2]
    imported = callable_identity(_defined(_FACTORY, "lossmod"))
    edited = callable_identity(_defined(_FACTORY.replace("o - t", "o + t"), "lossmod"))
    assert without_code(edited) == without_code(imported) and edited != imported
    # what tracin 900451f recorded (its closure digest named the held functions with their module)
    before = {
        "f": "lossmod.make.<locals>.f closure[base, scale]=b5f31c6e24ef71c7670dcbea31527bb4",
        "g": "lossmod.make.<locals>.f closure[base, scale]=85301eddac045c86287b9ce242c75cb0",
    }
    for name, text in before.items():
        now = callable_identity(_defined(_FACTORY, "lossmod", name))
        assert without_code(now) != text and identity_before_code(now) == text
    assert identity_before_code(callable_identity(_loss)) is None  # no closure: the name alone, as before


_MODULE_LOSS = """
import torch
import torch.nn.functional as F


class Base(torch.nn.Module):
    def forward(self, o, t):
        return F.cross_entropy(o, t, reduction="none")


class Loss(Base):
    pass


class Callable:
    def __call__(self, o, t):
        return F.cross_entropy(o, t, reduction="none")


def scaled(k):
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(o, t):
            return k * fn(o, t)

        return wrapper

    return decorate


@scaled(1.0)
def decorated(o, t):
    return F.cross_entropy(o, t, reduction="none")
"""


def _made(source: str, name: str) -> typing.Any:
    """`name` of `source` (module "lossmod"): an instance when it is a class."""
    made = _defined("import functools\n" + source, "lossmod", name)
    return made() if isinstance(made, type) else made


def test_loss_objects_and_decorators_digest_their_own_code_not_the_frameworks():
    """review7 R2: an edited forward of a custom nn.Module loss (inherited too), an edited __call__
    of a loss class, an edited decorator or its setting all changed nothing; a library loss object
    and torch.no_grad() as a decorator (the frameworks' classes and wrappers) still add no code digest."""
    torch = pytest.importorskip("torch")
    smoothed = 'reduction="none", label_smoothing=0.3)'
    edits = {
        "Loss": ('reduction="none")\n\n\nclass Loss', smoothed + "\n\n\nclass Loss"),
        "Callable": ('reduction="none")\n\n\ndef scaled', smoothed + "\n\n\ndef scaled"),
        "decorated": ("k * fn", "k * k * fn"),
    }
    for name, (before, after) in edits.items():
        assert before in _MODULE_LOSS
        identity = callable_identity(_made(_MODULE_LOSS, name))
        assert " code[" in identity and identity == callable_identity(_made(_MODULE_LOSS, name))
        edited = callable_identity(_made(_MODULE_LOSS.replace(before, after), name))
        assert edited != identity and without_code(edited) == without_code(identity)
    setting = _made(_MODULE_LOSS.replace("@scaled(1.0)", "@scaled(2.0)"), "decorated")
    assert callable_identity(setting) != callable_identity(_made(_MODULE_LOSS, "decorated"))
    library = callable_identity(torch.nn.CrossEntropyLoss(label_smoothing=0.1))
    assert library == "torch.nn.modules.loss.CrossEntropyLoss: CrossEntropyLoss() " + (
        "{'ignore_index': -100, 'label_smoothing': 0.1, 'reduction': 'mean'}"
    )
    assert callable_identity(torch.no_grad()(_loss)) == callable_identity(_loss)  # a wrapper torch defines


def test_a_compiled_or_data_parallel_loss_module_digests_the_forward_it_wraps():
    """review8 S3: torch.compile(Loss()) and nn.DataParallel(Loss()) are torch classes wrapping the
    user's module: an edited forward of the wrapped loss changed nothing."""
    torch = pytest.importorskip("torch")
    smoothed = 'reduction="none", label_smoothing=0.3)\n\n\nclass Loss'
    edited = _MODULE_LOSS.replace('reduction="none")\n\n\nclass Loss', smoothed)
    for wrap in (torch.compile, torch.nn.DataParallel):
        identity = callable_identity(wrap(_made(_MODULE_LOSS, "Loss")))
        assert " code[" in identity and identity == callable_identity(wrap(_made(_MODULE_LOSS, "Loss")))
        assert callable_identity(wrap(_made(edited, "Loss"))) != identity


_SCRIPTED = """
import torch
import torch.nn.functional as F


def plain(o, t):
    return F.cross_entropy(o, t, reduction="none")


class Scaled(torch.nn.Module):
    def __init__(self, scale, weight=None):
        super().__init__()
        self.inner = torch.nn.CrossEntropyLoss(weight=weight, reduction="none")
        self.scale = scale

    def forward(self, o, t):
        return self.inner(o, t) * self.scale
"""

_SCRIPTED_IDENTITIES = """
import importlib.util, json, sys
import torch
spec = importlib.util.spec_from_file_location("scriptedloss", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
from tracin._export.fingerprint import callable_identity
made = [torch.jit.script(mod.plain), torch.jit.script(torch.nn.CrossEntropyLoss(reduction="none")),
        torch.jit.script(mod.Scaled(2.0))]
print(json.dumps([callable_identity(f) for f in made]))
"""


def _scripted_module(path, source: str) -> typing.Any:
    import importlib.util

    path.write_text(source)  # torch.jit.script reads the source from its file
    spec = importlib.util.spec_from_file_location("scriptedloss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_torch_script_loss_is_identified_by_its_code_settings_and_tensors(tmp_path):
    """Was (review60 note): torch.jit.script(nn.CrossEntropyLoss(reduction="none")) crashed export with
    AttributeError ('OrderedModuleDict' object has no attribute 'get'); a scripted function was named by
    its type and a repr with no name or code (any two the same). Now: its TorchScript code, the settings
    its modules hold and their tensors; the same in a fresh process (TorchScript mangles the names of a
    class scripted twice in one process)."""
    import subprocess

    torch = pytest.importorskip("torch")
    mod = _scripted_module(tmp_path / "scriptedloss.py", _SCRIPTED)
    script = torch.jit.script
    ce = callable_identity(script(torch.nn.CrossEntropyLoss(reduction="none")))
    assert ce.startswith("torch.jit.ScriptModule CrossEntropyLoss torch_script=")
    assert callable_identity(script(torch.nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1))) != ce
    weighted = [
        callable_identity(script(torch.nn.CrossEntropyLoss(weight=w, reduction="none")))
        for w in (torch.ones(3), torch.ones(3), torch.tensor([1.0, 2.0, 1.0]))
    ]
    assert weighted[0] == weighted[1] != weighted[2] and " arrays[weight]=" in weighted[0]
    scaled = [callable_identity(script(mod.Scaled(s))) for s in (2.0, 3.0, 2.0)]
    assert scaled[0] == scaled[2] != scaled[1] and scaled[0].startswith("torch.jit.ScriptModule Scaled ")
    plain = callable_identity(script(mod.plain))
    assert plain.startswith("torch.jit.ScriptFunction __torch__.scriptedloss.plain torch_script=")
    (tmp_path / "moved").mkdir()
    moved = _scripted_module(tmp_path / "moved" / "scriptedloss.py", "# a comment\n\n" + _SCRIPTED)
    assert callable_identity(script(moved.plain)) == plain  # its file and lines are not read
    (tmp_path / "edited").mkdir()
    smoothed = _SCRIPTED.replace('reduction="none")\n', 'reduction="none", label_smoothing=0.2)\n', 1)
    edited = _scripted_module(tmp_path / "edited" / "scriptedloss.py", smoothed)
    assert callable_identity(script(edited.plain)) != plain
    fresh = subprocess.run(
        [sys.executable, "-c", _SCRIPTED_IDENTITIES, str(tmp_path / "scriptedloss.py")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(fresh.stdout) == [plain, ce, scaled[0]]


def test_callable_identity_is_safe_to_call_from_threads():
    """review8 S2: beyond 256 closure identities, evicting the oldest memo entry while another thread
    added one raised RuntimeError or KeyError in an unrelated export."""

    def make(k):
        def loss(o, t):
            return k * _loss(o, t)

        return loss

    failures = []

    def work(start):
        try:
            for k in range(start, start + 300):
                callable_identity(make(float(k)))
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            failures.append(err)

    threads = [threading.Thread(target=work, args=(i * 1000,)) for i in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often: the race shows in every run
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == []


def _holding(inner: typing.Any) -> typing.Any:
    """A torch module loss calling the loss it holds as a submodule."""
    torch = pytest.importorskip("torch")

    class Wrap(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, o, t):
            return self.inner(o, t)

    return Wrap(inner)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated
def test_a_module_loss_holding_another_is_identified_by_its_settings_however_deep():
    """Was (review61 note f4): a module loss holding nn.CrossEntropyLoss (scripted or not) had one identity
    whatever the inner label_smoothing or reduction (its repr shows CrossEntropyLoss()): a store exported
    with one resumed with the other silently."""
    torch = pytest.importorskip("torch")
    wrap = _holding
    for scripted in (False, True):
        make = torch.jit.script if scripted else (lambda m: m)
        ids = {
            callable_identity(wrap(make(torch.nn.CrossEntropyLoss(reduction="none", **kw))))
            for kw in ({}, {"label_smoothing": 0.3}, {"ignore_index": 3})
        }
        assert len(ids) == 3
        plain = make(torch.nn.CrossEntropyLoss(reduction="none"))
        assert callable_identity(wrap(plain)) == callable_identity(
            wrap(make(torch.nn.CrossEntropyLoss(reduction="none")))
        )
    deep = [wrap(wrap(torch.nn.CrossEntropyLoss(reduction="none", label_smoothing=s))) for s in (0.0, 0.3)]
    assert callable_identity(deep[0]) != callable_identity(deep[1])
    assert " at 0x" not in callable_identity(deep[1])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated
def test_plain_torch_loss_identities_are_as_before():
    """A store exported with a plain torch loss before submodules' settings were read still resumes: the
    identity strings are those the earlier version made (recorded from it)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    settings = "{'ignore_index': -100, 'label_smoothing': %s, 'reduction': 'none'}"
    cases = {
        f"torch.nn.modules.loss.CrossEntropyLoss: CrossEntropyLoss() {settings % 0.0}": nn.CrossEntropyLoss(
            reduction="none"
        ),
        f"torch.nn.modules.loss.CrossEntropyLoss: CrossEntropyLoss() {settings % 0.1}"
        " arrays[weight]=36ad84b914d48709f72f054c226a0914": nn.CrossEntropyLoss(
            reduction="none", label_smoothing=0.1, weight=torch.tensor([1.0, 2.0, 3.0])
        ),
        "torch.nn.modules.loss.MSELoss: MSELoss() {'reduction': 'none'}": nn.MSELoss(reduction="none"),
        "torch.nn.modules.loss.BCEWithLogitsLoss: BCEWithLogitsLoss() {'reduction': 'none'}"
        " arrays[pos_weight]=93771ae929c3daf60ca52793185cbae0": nn.BCEWithLogitsLoss(
            reduction="none", pos_weight=torch.tensor([2.0])
        ),
        "torch.nn.modules.loss.NLLLoss: NLLLoss() {'ignore_index': 3, 'reduction': 'none'}": nn.NLLLoss(
            reduction="none", ignore_index=3
        ),
        "torch.jit.ScriptModule CrossEntropyLoss torch_script=1c13bdfac2809a57ba6cc7bc0a2ab2c4": torch.jit.script(
            nn.CrossEntropyLoss(reduction="none")
        ),
    }
    for want, loss in cases.items():
        assert callable_identity(loss) == want


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_a_traced_loss_is_identified_by_the_constants_its_code_reads():
    """Was (review61 F1): a torch.jit.trace'd loss's code reads its scalars and tensors as CONSTANTS.c0, whose
    values were not in the identity: traced cross_entropy * 2.0 and * 3.0, or with other class weights, a traced
    module scaling by 2.0 or 3.0, each had one identity (a store resumed with the other silently)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    o, t = torch.randn(4, 3), torch.randint(0, 3, (4,))

    def scaled(k):
        return torch.jit.trace(lambda a, b: F.cross_entropy(a, b, reduction="none") * k, (o, t))

    def weighted(w):
        return torch.jit.trace(lambda a, b: F.cross_entropy(a, b, weight=torch.tensor(w), reduction="none"), (o, t))

    class Scaled(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, a, b):
            return F.cross_entropy(a, b, reduction="none") * self.k

    for make, values in ((scaled, (2.0, 3.0)), (weighted, ([1.0, 9.0, 3.0], [1.0, 2.0, 3.0]))):
        first, again, other = (callable_identity(make(v)) for v in (values[0], values[0], values[1]))
        assert first == again != other
    traced = [torch.jit.trace(Scaled(k), (o, t)) for k in (2.0, 2.0, 3.0)]
    ids = [callable_identity(m) for m in traced]
    assert ids[0] == ids[1] != ids[2]
    saved = io.BytesIO()
    torch.jit.save(traced[0], saved)
    saved.seek(0)
    assert callable_identity(torch.jit.load(saved)) == ids[0]  # saved, its 2.0 is a float64 tensor constant


def _sharded_folder(tmp_path, shard) -> object:
    """A save_pretrained folder whose index lists `shard`; a file outside it holds weights."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"secret")
    (folder / "sub").mkdir()
    (folder / "sub" / "x.bin").write_bytes(b"nested")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "ok.bin", "b": shard}}))
    (folder / "ok.bin").write_bytes(b"ok")
    return folder


@pytest.mark.parametrize("shard", ["../outside.bin", "OUTSIDE", "sub/x.bin", "sub/../ok.bin", ".", "..", "", 5])
def test_an_index_listing_a_shard_outside_its_folder_is_refused_naming_checkpoint_index_and_name(tmp_path, shard):
    """review114 F2: save_pretrained writes plain file names; "../x" was read and digested, an absolute
    path ended in pathlib's "is not in the subpath" ValueError naming neither checkpoint nor index."""
    if shard == "OUTSIDE":
        shard = str(tmp_path / "outside.bin")
    folder = _sharded_folder(tmp_path, shard)
    expected = (
        rf"^ckpt: pytorch_model.bin.index.json in the checkpoint folder {re.escape(str(folder))} lists the shard "
        rf"{re.escape(repr(shard))}, which is not a file name in the folder"
    )
    with pytest.raises(ValueError, match=expected):
        digest_path(folder, "ckpt")
    with pytest.raises(ValueError, match=expected):
        weight_files(folder, "ckpt")  # what tracin.torch's reader lists
    with pytest.raises(ValueError, match=r"^checkpoints\[3\] \(.*ckpt\): pytorch_model.bin.index.json in the"):
        checkpoint_file_digest(folder, 3)


def test_a_deeply_nested_shard_index_is_a_value_error_naming_checkpoint_and_index(tmp_path):
    """review114 F3: json's recursion limit made it a bare RecursionError."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    deep = "[" * 100_000 + "]" * 100_000
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ' + deep + "}")
    message = r"^ckpt: model.safetensors.index.json is not a sharded checkpoint index \(JSON nested 100001 levels"
    with pytest.raises(ValueError, match=message):
        weight_files(folder, "ckpt")
    with pytest.raises(ValueError, match=message):
        digest_path(folder, "ckpt")
    nested = {"weight_map": {"a": "s.bin"}, "metadata": _nested_list(63)}  # 64 levels: still read
    (folder / "model.safetensors.index.json").write_text(json.dumps(nested))
    (folder / "s.bin").write_bytes(b"s")
    assert weight_files(folder, "ckpt").files == ["s.bin"]
    nested["metadata"] = _nested_list(64)
    (folder / "model.safetensors.index.json").write_text(json.dumps(nested))
    with pytest.raises(ValueError, match=r"^ckpt: .* \(JSON nested 65 levels deep, at most 64\)"):
        weight_files(folder, "ckpt")


def _nested_list(levels: int) -> list:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


def _without_hanging(call):
    """call()'s exception (None if it returned), from a thread that a FIFO's blocking open cannot hang."""
    outcome: list = []

    def target():
        try:
            call()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            outcome.append(e)
        else:
            outcome.append(None)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(20)
    return outcome


def test_a_checkpoint_or_state_path_that_is_a_fifo_is_refused_unopened(tmp_path):
    """review114 F4: a FIFO was taken for an empty folder by digest_path (its digest recorded), then
    torch.load blocked on it forever. It is refused naming the argument, before it is opened; so are a
    FIFO in a folder's place and one among a save_pretrained folder's files (not read: not a weight file)."""
    fifo = tmp_path / "ckpt_1.pt"
    os.mkfifo(fifo)
    try:
        outcome = _without_hanging(lambda: checkpoint_file_digest(fifo, 2))
        assert outcome and isinstance(outcome[0], ValueError), outcome
        assert str(outcome[0]) == (
            f"checkpoints[2] ({fifo}): {fifo} is not a regular file or a folder (a FIFO, device or socket: "
            "refused unread)"
        )
        outcome = _without_hanging(lambda: digest_path(fifo))  # an optimizer state's path
        assert outcome and isinstance(outcome[0], ValueError) and str(outcome[0]).startswith(f"{fifo} is not a regular")
        outcome = _without_hanging(lambda: digest_path(fifo, "checkpoints[0][2] (optimizer state)"))
        assert outcome and str(outcome[0]).startswith(f"checkpoints[0][2] (optimizer state): {fifo} is not a regular")
    finally:
        if not outcome:  # release an open the old code blocked in
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    with pytest.raises(ValueError, match=r"^checkpoints\[0\] \(/dev/null\): /dev/null is not a regular file"):
        checkpoint_file_digest("/dev/null", 0)
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"w")
    os.mkfifo(folder / "optimizer.pt")
    outcome = _without_hanging(lambda: digest_path(folder))
    assert outcome == [None]


def test_a_file_replaced_by_a_fifo_after_it_was_listed_is_refused_unblocked(tmp_path, monkeypatch):
    """The open of each file is non-blocking and checked with fstat: a FIFO swapped in after the stat."""
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"weights")
    real_stat = os.stat
    swapped = []

    def stat_then_swap(p, *args, **kwargs):
        result = real_stat(p, *args, **kwargs)
        if os.fspath(p) == str(path) and not swapped:
            swapped.append(True)
            os.unlink(path)
            os.mkfifo(path)
        return result

    monkeypatch.setattr(fingerprint.os, "stat", stat_then_swap)
    outcome = _without_hanging(lambda: digest_path(path, "ckpt"))
    monkeypatch.undo()
    if not outcome:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    assert swapped and outcome and isinstance(outcome[0], ValueError), outcome
    assert str(outcome[0]).startswith(f"ckpt: {path} is not a regular file or a folder")


def _unpickled(fn: typing.Any) -> typing.Any:
    """fn cloudpickled and unpickled, as a Dask worker gets an export's loss_fn."""
    import pickle

    import cloudpickle

    return pickle.loads(cloudpickle.dumps(fn))


_DECORATED = (
    "import functools\n\n\ndef twice(fn):\n    @functools.wraps(fn)\n    def wrapper(o, t, s=0.1):\n"
    "        return 2 * fn(o, t, s)\n    return wrapper\n\n\n@twice\n" + _F
)


def test_a_jitted_function_unpickled_is_identified_as_the_function_before_pickling():
    """r245 F2: jax restores an unpickled jax.jit function without __wrapped__ (a Dask worker's loss_fn):
    it was named "jaxlib._jax.PjitFunction: <PjitFunction>", not as the client's jitted function (every
    distributed task failed, blaming the data), and without a code digest (any two were alike)."""
    jax = pytest.importorskip("jax")
    f = _compiled(_F)
    jitted = jax.jit(f)
    back = _unpickled(jitted)
    assert back is not jitted and not hasattr(back, "__wrapped__")  # what the identity reads past
    identity = callable_identity(jitted)
    assert identity == callable_identity(f) and " code[" in identity
    assert callable_identity(back) == identity
    assert callable_identity(_unpickled(jax.jit(jax.jit(f)))) == identity  # jitted twice
    decorated = jax.jit(_compiled(_DECORATED))  # the wrapper's code counts, here and unpickled
    assert callable_identity(_unpickled(decorated)) == callable_identity(decorated) != identity
    edited = _unpickled(jax.jit(_compiled(_F.replace("x * s", "x * s * 2"))))
    assert callable_identity(edited) != identity
    assert without_code(callable_identity(edited)) == without_code(identity) == "lossmod.f"

    def closing_over(fn):
        def loss(o, t):
            return fn(o, t)

        return loss

    held = closing_over(jax.jit(f))  # a closure over a jitted function: the jitted function named as f
    assert callable_identity(_unpickled(held)) == callable_identity(held)
