"""What the data fingerprint and the array, folder and tensor digests tell apart (mutation testing m399):
a later pass giving one batch too many is refused at that batch naming it so, the recorded digest of data
without targets, object arrays digested by value, a folder's files in sorted order, a bfloat16 tensor's shape."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from tracin._export.fingerprint import DataFingerprint, callable_identity, digest_arrays, digest_path


def _pass(fp: DataFingerprint, batches, where: str = "checkpoint 0") -> None:
    fp.begin(where)
    for inputs, targets in batches:
        fp.batch(None if targets is None else [targets], [inputs])
    fp.end()


def test_a_later_pass_giving_a_batch_more_is_refused_at_that_batch_naming_the_first_pass_count():
    """The extra batch is refused when it is given (before its rows are computed), as one batch too many:
    not as 'other targets' (no batch of the first pass is at its index), not an IndexError."""
    x, y = np.arange(12.0).reshape(6, 2), np.arange(6)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    fp = DataFingerprint()
    _pass(fp, batches, "data")
    fp.begin("checkpoint 1")
    for inputs, targets in batches:
        fp.batch([targets], [inputs])
    with pytest.raises(
        ValueError, match=r"^checkpoint 1: the data gave more batches than the 2 of the first pass"
    ) as e:
        fp.batch([y[:1]], [x[:1]])
    assert "other targets" not in str(e.value) and "other inputs" not in str(e.value)


def test_the_data_digest_without_targets_folds_each_batch_input_digest_twice():
    """A language model's data (targets None): `data` is BLAKE2b-128 of each batch's input digest, given
    twice (in the targets' place), as stores written before record it; not the digest of no targets."""
    ids = np.random.default_rng(3).integers(0, 50, size=(5, 4))
    batches = [(ids[:2], None), (ids[2:], None)]
    expected = hashlib.blake2b(digest_size=16)
    for inputs, _ in batches:
        d = digest_arrays([inputs]).encode()
        expected.update(d + d)
    fp = DataFingerprint()
    _pass(fp, batches, "data")
    assert fp.data == expected.hexdigest()


_OBJECT_DIGEST = """
import numpy as np
from tracin._export.fingerprint import digest_arrays
print(digest_arrays([np.array([''.join(['ca', 't']), 3, None], dtype=object)]))
"""


def test_object_arrays_are_digested_by_value_the_same_in_every_process():
    """An array of Python objects (labels as strings) is digested by its values, not by the object
    pointers its buffer holds: equal values built apart, and another process, give the same digest."""
    built = np.array(["".join(["c", "at"]), 3, None], dtype=object)
    digest = digest_arrays([built])
    expected = hashlib.blake2b(b"|O(3,);" + repr(["cat", 3, None]).encode(), digest_size=16).hexdigest()
    assert digest == expected
    assert digest_arrays([np.array(["dog", 3, None], dtype=object)]) != digest
    other = subprocess.run([sys.executable, "-c", _OBJECT_DIGEST], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == digest


def test_a_folder_is_digested_by_its_files_relative_names_and_bytes_in_sorted_order(tmp_path):
    """Another folder than a save_pretrained one: BLAKE2b-128 of "name;" then the bytes of every file under
    it, in sorted order whatever order they were written in (a copy of the folder digests the same)."""
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    files = {"sub/c.bin": b"\x03\x04", "b.bin": b"bee", "a.bin": b"\x00\x01\x02"}
    for name, data in files.items():  # written in another order than the sorted one
        (folder / name).write_bytes(data)
    expected = hashlib.blake2b(digest_size=16)
    for name in ("a.bin", "b.bin", "sub/c.bin"):
        expected.update(f"{name};".encode() + files[name])
    assert digest_path(folder) == expected.hexdigest()


def test_a_loss_holding_a_bfloat16_tensor_is_identified_by_its_shape_too():
    """Tensors NumPy lacks a dtype for (bfloat16) are digested by their bytes and their shape: the same
    bytes as (2, 3) and as (3, 2) are other class weights."""
    torch = pytest.importorskip("torch")

    class Weighted(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.register_buffer("w", w)

        def forward(self, outputs, targets):
            return outputs.sum(-1)

    w = torch.arange(6, dtype=torch.float32).to(torch.bfloat16)
    wide, tall = callable_identity(Weighted(w.reshape(2, 3))), callable_identity(Weighted(w.reshape(3, 2)))
    assert " arrays[w]=" in wide
    assert wide != tall
    assert callable_identity(Weighted(w.clone().reshape(2, 3))) == wide


def test_a_set_used_as_a_key_of_a_dict_subclass_is_printed_sorted():
    """stable_repr of an OrderedDict whose key is a frozenset (a static field's settings): the set's elements
    sorted, as in a plain dict, not in the order string hashes (PYTHONHASHSEED) give them."""
    from collections import OrderedDict

    from tracin._export.fingerprint import stable_repr

    names = [f"k{i:02d}" for i in range(24)]
    keyed = OrderedDict({frozenset(reversed(names)): 1})
    inside = ", ".join(repr(n) for n in names)
    assert stable_repr(keyed) == f"OrderedDict({{frozenset({{{inside}}}): 1}})"
