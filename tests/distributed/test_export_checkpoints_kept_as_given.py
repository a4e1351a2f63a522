"""absolute_checkpoints leaves checkpoints that hold no path as given, the very objects (r385 hand mutant
E18: every sequence was rebuilt, so a list subclass of the user's came back a plain list, and an object
shared by two arguments was two objects once pickled and unpickled on a worker)."""

from __future__ import annotations

import os

from tracin.distributed._export import absolute_checkpoints


class _Checkpoints(list):
    """A user's list subclass (with an attribute of its own), not a NamedTuple."""

    note = "mine"


def test_checkpoints_without_paths_are_the_objects_given():
    state = {"w": [1.0, 2.0]}
    entry = (state, 0.1)
    given = _Checkpoints([entry, (state, 0.05)])
    args, kwargs = absolute_checkpoints(("model", given, "data"), {"mode": "full"})
    assert args[1] is given and args[1][0] is entry and type(args[1]) is _Checkpoints
    assert kwargs == {"mode": "full"}
    args, kwargs = absolute_checkpoints(("loss",), {"checkpoints": given})
    assert kwargs["checkpoints"] is given


def test_a_path_entry_is_made_absolute_in_a_plain_sequence_and_others_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = {"w": [1.0]}
    kept = (state, 0.2)
    args, _ = absolute_checkpoints(("model", _Checkpoints([("a.pt", 0.1), kept])), {})
    assert args[1] == [(os.path.join(str(tmp_path), "a.pt"), 0.1), kept]
    assert args[1][1] is kept and type(args[1]) is list  # a subclass other than a NamedTuple: a plain list
