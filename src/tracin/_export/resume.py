"""Naming what changed when an export is run again into a store written from other inputs.

The store refuses any spec change on its own (with both metadata dicts in full); this check comes
first and says in words which parameters (columns) differ, else which fingerprinted input does: the
data, a checkpoint, the model (its structure, or by name a module attribute, non-persistent buffer
or class's forward code: model_changes) or the loss function. A store recording the model's
structure alone (before the rest was fingerprinted) resumes with the same structure. A store exported before
metadata["checkpoint_sources"] was recorded resumes without it, with the digests it holds of
in-memory checkpoints (as_exported_before), and likewise one exported before
metadata["optimizer_state_sources"] was; one whose loss function identity was recorded before
code was digested, or under a script's __main__ name, resumes with the same function. An unfinished
store that records no rows (left by an export that failed at its first batch) holds nothing to mix:
an export that is not a range writer makes it again for its own inputs (replace_empty_export).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .fingerprint import identity_before_code

if TYPE_CHECKING:
    from pathlib import Path

    from ..store._format import Manifest

_WHAT = {
    "data": "the data (inputs or targets) differ, or the batch size does (the data is fingerprinted batch by batch: "
    "resume with the batch_size, or DataLoader batch_size, the store was exported with)",
    "model": "the model differs (module types or settings, parameter or buffer names, shapes or dtypes)",
    "loss": "the loss function differs",
    "layer_input": "layer_input differs",
    "optimizer_states": "the optimizer states saved with the checkpoints differ",
}
# how to get past a store that an export cannot resume (export_gradients has no overwrite=)
EXPORT_ADVICE = "export into another directory, or delete this one"
# export options a store's metadata records, compared (after the inputs) when an export would resume it
_SETTINGS = ("framework", "mode", "dtype", "projection", "preconditioner", "last_layer")


def changed_inputs(
    before: dict,
    now: dict,
    sources: tuple[Any, Any] = (None, None),
    optimizer_sources: tuple[Any, Any] = (None, None),
) -> list[str]:
    """What differs between two exports' metadata["fingerprints"], in words; `sources`: their
    metadata["checkpoint_sources"] (a checkpoint given as a file on one side and as an in-memory
    state_dict on the other is digested differently: that is named rather than a change);
    `optimizer_sources`: their metadata["optimizer_state_sources"], the same for optimizer states."""
    changes = []
    old, new = before.get("checkpoints"), now.get("checkpoints")
    if old != new:
        if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and sorted(old) == sorted(new):
            changes.append("the same checkpoints in another order")
        elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
            changes += [_checkpoint_change(c, sources) for c, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]
        else:
            changes.append(
                f"the checkpoints differ ({len(old) if isinstance(old, list) else 'unknown'} "
                f"there, {len(new) if isinstance(new, list) else 'unknown'} here)"
            )
    for key in sorted(set(before) | set(now)):
        if key == "model" and before.get(key) != now.get(key):
            changes += model_changes(before.get(key), now.get(key))
        elif key == "optimizer_states" and before.get(key) != now.get(key):
            changes.append(_WHAT[key] + _optimizer_form_change(before.get(key), now.get(key), optimizer_sources))
        elif key != "checkpoints" and before.get(key) != now.get(key):
            detail = f" ({before.get(key)} there, {now.get(key)} here)" if key in ("loss", "layer_input") else ""
            changes.append(
                _WHAT.get(key, f"fingerprint {key!r} differs")
                + detail
                + _unrecorded(before.get(key), without_code(now.get(key)))
                + _closure_change(before.get(key), now.get(key))
                + _code_change(before.get(key), now.get(key))
            )
    return changes


_FORMS = {"file": "a file (or folder)", "state": "an in-memory state_dict"}


def _checkpoint_change(c: int, sources: tuple[Any, Any]) -> str:
    """'checkpoints[c] differs', or, when it was given in another form (metadata["checkpoint_sources"]:
    a file there, an in-memory state_dict here), that: the two are digested differently, so whether
    it holds the same weights cannot be told."""
    forms = [s[c] if isinstance(s, list) and c < len(s) else None for s in sources]
    if forms[0] != forms[1] and all(f in _FORMS for f in forms):
        return (
            f"checkpoints[{c}] was given as {_FORMS[forms[0]]} there and as {_FORMS[forms[1]]} here (digested "
            "differently, so the same weights cannot be told): pass it the same way to resume"
        )
    return f"checkpoints[{c}] differs"


_STATE_FORMS = {"file": "a file (or folder)", "state": "an in-memory state"}


def _optimizer_form_change(old: Any, new: Any, sources: tuple[Any, Any]) -> str:
    """When a differing optimizer-state digest was made from a file on one side and from an in-memory
    state on the other (metadata["optimizer_state_sources"]): says so (digested differently, whether the
    state is the same cannot be told); "" otherwise."""
    if not isinstance(old, list) or not isinstance(new, list) or len(old) != len(new):
        return ""
    if not all(isinstance(s, list) and len(s) == len(old) for s in sources):
        return ""
    moved = [
        c
        for c, (a, b) in enumerate(zip(old, new, strict=True))
        if a != b and sources[0][c] != sources[1][c] and sources[0][c] in _STATE_FORMS and sources[1][c] in _STATE_FORMS
    ]
    if not moved:
        return ""
    c = moved[0]
    return (
        f" (checkpoints[{c}][2] was given as {_STATE_FORMS[sources[0][c]]} there and as "
        f"{_STATE_FORMS[sources[1][c]]} here, digested differently, so the same state cannot be told: pass it "
        "the same way to resume)"
    )


def _structure(model: Any) -> Any:
    """The digest of a model's structure in a "model" fingerprint: all of it as versions before the
    settings, buffer values and code were recorded made it (a string), its "structure" entry now."""
    return model.get("structure") if isinstance(model, dict) else model


_MODEL_PARTS = {
    "settings": "attributes differ",
    "buffers": "non-persistent buffer values (in no checkpoint) differ",
    "code": "module classes' forward code differs",
}


def _without_forward_tensors(before: Any, now: Any) -> tuple[Any, Any]:
    """Two "model" fingerprints without the tensor attributes that only one of them records: those a forward
    stores for inspection (self.attn = weights.detach()), absent before the model first ran; not a change of
    the model."""
    if not isinstance(before, dict) or not isinstance(now, dict):
        return before, now
    old, new = before.get("settings"), now.get("settings")
    if not isinstance(old, dict) or not isinstance(new, dict):
        return before, now
    one_sided = {n for n in set(old) ^ set(new) if str(old.get(n, new.get(n))).startswith("tensor ")}
    return (
        {**before, "settings": {n: v for n, v in old.items() if n not in one_sided}},
        {**now, "settings": {n: v for n, v in new.items() if n not in one_sided}},
    )


def model_changes(before: Any, now: Any) -> list[str]:
    """How two exports' fingerprints["model"] (tracin.torch model_digest) differ, in words: the structure,
    then the modules' attributes (with both values), non-persistent buffers and classes' forward code
    by name. A record without settings, buffers and code (written before they were recorded) is
    compared by its structure alone; tensor attributes only one side records are left out
    (_without_forward_tensors)."""
    before, now = _without_forward_tensors(before, now)
    if before == now:
        return []
    if _structure(before) != _structure(now) or not isinstance(before, dict) or not isinstance(now, dict):
        return [] if _structure(before) == _structure(now) else [_WHAT["model"]]
    changes = []
    for part, what in _MODEL_PARTS.items():
        old, new = before.get(part), now.get(part)
        if old == new or not isinstance(old, dict) or not isinstance(new, dict):
            continue
        names = sorted(set(old) | set(new))
        differing = [n for n in names if old.get(n) != new.get(n)]
        if part == "settings":
            shown = [f"{n} {old.get(n, '(none)')} there, {new.get(n, '(none)')} here" for n in differing[:5]]
        else:
            shown = [
                n + ("" if n in old and n in new else " (only " + ("there)" if n in old else "here)"))
                for n in differing[:5]
            ]
        text = f"the model's {what}: {'; '.join(shown)}{' ...' if len(differing) > 5 else ''}"
        if part == "settings":
            text += (
                " (a value forward updates, such as a call counter, belongs in a private attribute, named with a "
                "leading _, which is not fingerprinted)"
            )
        if part == "buffers":
            text += (
                " (a forward may rewrite such a buffer, as dynamic rotary scaling does after a sequence longer than "
                "the model's maximum: resume in a fresh process, with the model as loaded)"
            )
        if part == "code":
            versions = [sorted({v.partition(":")[0] for v in d.values()}) for d in (old, new)]
            text += (
                f" (recorded under Python {', '.join(versions[0])}, this is Python {', '.join(versions[1])}: "
                "bytecode differs between versions; resume with the Python version that started the export)"
                if versions[0] != versions[1]
                else " (edited, or a library upgraded: finish the export with the code and library versions that "
                "started it)"
            )
        changes.append(text)
    return changes or [_WHAT["model"]]


def changed_params(before: Any, now: Any) -> str | None:
    """How two exports' metadata["params"] ([{"name", "shape"}] in row order) differ, in words; None when they
    are equal or not both such lists."""
    if before == now or not all(isinstance(p, list) and all(isinstance(e, dict) for e in p) for p in (before, now)):
        return None
    shapes = [{e.get("name"): e.get("shape") for e in p} for p in (before, now)]
    parts = []
    for names, where in ((shapes[0].keys() - shapes[1].keys(), "there"), (shapes[1].keys() - shapes[0].keys(), "here")):
        if names:
            parts.append(f"only {where}: {', '.join(map(repr, sorted(map(str, names))[:5]))}")
    parts += [
        f"{n!r} {shapes[0][n]} there, {shapes[1][n]} here"
        for n in shapes[0]
        if n in shapes[1] and shapes[0][n] != shapes[1][n]
    ]
    columns = [sum(int(np.prod(e.get("shape") or [], dtype=np.int64)) for e in p) for p in (before, now)]
    what = "; ".join(parts[:5]) or "the same parameters in another order"
    return f"{what} ({columns[0]} columns there, {columns[1]} here)"


# what callable_identity came to record after the name, by the suffix it then gained
_NEWLY_RECORDED = {
    " arrays[": "the arrays a loss holds, such as class weights,",
    " closure[": "the settings a function's closure holds (a make_loss(scale) factory's scale)",
}


def _unrecorded(before: Any, now: Any) -> str:
    """Why two identities differing only by the arrays or closure settings now recorded
    (callable_identity) may not be a change: a store written before they were fingerprinted."""
    if not isinstance(before, str) or not isinstance(now, str):
        return ""
    for suffix, what in _NEWLY_RECORDED.items():
        if suffix not in before and now.startswith(before + suffix):
            return (
                f" (a store written before {what} were fingerprinted shows none: if they are unchanged, "
                "finish it with that tracin version)"
            )
    return ""


_CODE = re.compile(r" code\[(\d+\.\d+)\]=([0-9a-f]{32})")


def without_code(identity: Any) -> Any:
    """A function identity (callable_identity) as tracin recorded it before it digested code: without
    its " code[3.11]=<digest>" parts; anything else as is."""
    return _CODE.sub("", identity) if isinstance(identity, str) else identity


def _code_change(before: Any, now: Any) -> str:
    """When two identities (callable_identity) differ only by their code digests: says so, and when
    the Python versions that made them differ, that bytecode does too."""
    if not isinstance(before, str) or not isinstance(now, str):
        return ""
    if " code[" not in before or without_code(before) != without_code(_main_renamed(before, now)):
        return ""
    versions = [sorted({m.group(1) for m in _CODE.finditer(text)}) for text in (before, now)]
    if versions[0] == versions[1]:
        return (
            ": its code differs (edited, or a library upgraded: the function, a decorator or the loss class's "
            "forward or __call__, or a function its closure holds; a library's functions count too): finish "
            "the export with the code and library versions that started it"
        )
    return (
        f": recorded under Python {', '.join(versions[0])}, this is Python {', '.join(versions[1])}, and "
        "bytecode differs between Python versions: resume the export with the Python version that started it"
    )


def _function_name(identity: str) -> tuple[int, str]:
    """Where the "module.qualname" an identity (callable_identity) starts with is, inside any
    partial(...), and that name (a loss object's type name, without its ":")."""
    start = 0
    while identity.startswith("partial(", start):
        start += len("partial(")
    return start, re.split(r"[ ,:]", identity[start:], maxsplit=1)[0]


def _main_renamed(before: str, now: str) -> str:
    """`now` named as `before` when one of them names a script's function (or loss class) "__main__.q"
    and the other the same qualname q in a module: the leading name replaced, and a loss object's
    default repr "<module.q object>"; `now` otherwise."""
    (_, old), (start, new) = _function_name(before), _function_name(now)
    main = [name.startswith("__main__.") for name in (old, new)]
    if main[0] == main[1]:
        return now
    qualname = (old if main[0] else new)[len("__main__.") :]
    if not (new if main[0] else old).endswith("." + qualname):
        return now
    rest = now[start + len(new) :]
    if rest.startswith(": "):
        rest = rest.replace(f"<{new} object>", f"<{old} object>", 1)
    return now[:start] + old + rest


def same_function(stored: Any, now: Any) -> bool:
    """Whether the function identity `now` (callable_identity) names the same function as `stored`,
    a store's, though the texts differ: `stored` recorded before code was digested and equal to
    `now` as those versions made it (without its code digests, its closure naming the functions it
    holds with their module: identity_before_code), or the same code (whose digest covers the
    qualname) from a script run as __main__ on one side and imported as a module on the other."""
    if not isinstance(stored, str) or not isinstance(now, str) or stored == now:
        return False
    if " code[" not in stored:
        return stored in (without_code(now), identity_before_code(now))
    return " code[" in now and _main_renamed(stored, now) == stored


def _closure_change(before: Any, now: Any) -> str:
    """When two identities (callable_identity) differ only by the digest of the same closure
    variables: names them as what changed, and where a call counter belongs."""
    if not isinstance(before, str) or not isinstance(now, str):
        return ""
    head = [
        text.rpartition(" closure[")[0] + "|" + text.rpartition(" closure[")[2].partition("]=")[0]
        for text in (before, now)
    ]
    if " closure[" not in before or head[0] != head[1]:
        return ""
    names = head[0].rpartition("|")[2]
    return (
        f": a value its closure holds changed ({names}); a call counter or log the function updates "
        "belongs outside its closure (a module variable), as it would change its identity at every call"
    )


def _existing_store(path: str | os.PathLike) -> Any:
    """The store at `path` (GradientStore, unfinished ones too: its metadata and weights), None when
    there is none readable yet."""
    from ..store import GradientStore

    try:  # without allow_partial: no rows are read, so range writers' progress files need not be
        return GradientStore.open(path)
    except (OSError, ValueError):  # no store yet, or one whose defects the writer reports
        return None


def _export_metadata(store: Any) -> dict | None:
    """The metadata of `store` (or None) when it is an export's (has fingerprints), else None."""
    existing = None if store is None else store.metadata
    return existing if isinstance(existing, dict) and isinstance(existing.get("fingerprints"), dict) else None


def _existing_metadata(path: str | os.PathLike) -> dict | None:
    """The metadata of the store at `path` when it is an export's (has fingerprints), else None."""
    return _export_metadata(_existing_store(path))


_FUNCTIONS = ("loss", "layer_input")  # the fingerprints that are function identities (callable_identity)


def as_exported_before(path: str | os.PathLike, metadata: dict, legacy_digest: Callable[[int], str | None]) -> dict:
    """`metadata` with the store's identity of the loss function and layer_input where they name the
    same function (same_function: a store written before code was digested, or a script's __main__
    function imported by name), and with the store's model fingerprint where it is the digest of this
    model's structure alone (versions before the settings, buffer values and forward code were
    recorded) or differs from it only by tensor attributes a forward stored (_without_forward_tensors),
    so that the store resumes; and `metadata` as a store exported before
    "checkpoint_sources" was recorded holds it, when `path` holds such a store (its spec lacks the
    key), so that the store resumes, or is returned when finished, as it is: without
    "checkpoint_sources", and with the stored digest of each in-memory checkpoint whose digest
    differs but whose `legacy_digest(c)` (the digest those versions made; None when it never
    changed) equals it; likewise without "optimizer_state_sources" for a store exported before that
    was recorded. `metadata` otherwise. Scoring trusts such a store's checkpoints (optimizer states)
    as it always did."""
    existing = _existing_metadata(path)
    if existing is None:
        return metadata
    functions = {
        key: existing["fingerprints"][key]
        for key in _FUNCTIONS
        if same_function(existing["fingerprints"].get(key), metadata["fingerprints"].get(key))
    }
    if functions:
        metadata = {**metadata, "fingerprints": {**metadata["fingerprints"], **functions}}
    model, ours = existing["fingerprints"].get("model"), metadata["fingerprints"].get("model")
    stripped = _without_forward_tensors(model, ours)
    if (isinstance(model, str) and model == _structure(ours)) or (model != ours and stripped[0] == stripped[1]):
        # recorded before the model's settings, buffer values and code were: compared by its structure; or
        # differing only by tensors a forward stored (_without_forward_tensors)
        metadata = {**metadata, "fingerprints": {**metadata["fingerprints"], "model": model}}
    if "optimizer_state_sources" in metadata and "optimizer_state_sources" not in existing:
        # a store exported before it was recorded resumes without it (scoring trusts its optimizer states)
        metadata = {k: v for k, v in metadata.items() if k != "optimizer_state_sources"}
    if "checkpoint_sources" in existing:
        return metadata
    digests = list(metadata["fingerprints"]["checkpoints"])
    stored = existing["fingerprints"].get("checkpoints")
    if isinstance(stored, list) and len(stored) == len(digests):
        for c, source in enumerate(metadata["checkpoint_sources"]):
            if source == "state" and digests[c] != stored[c] and legacy_digest(c) == stored[c]:
                digests[c] = stored[c]
    fingerprints = {**metadata["fingerprints"], "checkpoints": digests}
    return {k: v for k, v in metadata.items() if k != "checkpoint_sources"} | {"fingerprints": fingerprints}


def replace_empty_export(path: str | os.PathLike, spec: dict, resumed: dict, fresh: dict) -> bool:
    """Replaces the store at `path` by a new one of this export's spec (GradientStore.create's n_rows,
    dims, weights, dtype, factored) with metadata `fresh` when it is an unfinished export's store
    (fingerprinted metadata, no ids) that records no rows, in its manifest or in a range writer's
    progress file, and whose spec or metadata differs from this export's (`resumed`: `fresh` as
    as_exported_before matched it to the store). It holds nothing to mix: an export that failed at its
    first batch (a loss without reduction='none', a bug in the model's forward) or was interrupted
    before it left it. Decided again under the store's exclusive lock (a RuntimeError while another
    writer or range writers hold it). Whether it was replaced; any other store is left as it is (for
    refuse_another_export and the store to say what differs)."""
    from ..store._create import _build, _wanted_manifest
    from ..store._files import store_root
    from ..store._locks import DirectoryLock

    root = store_root(path)
    if not _replaceable(root, _wanted_manifest(**spec, metadata=resumed)):
        return False
    lock = DirectoryLock(root)
    try:
        if not _replaceable(root, _wanted_manifest(**spec, metadata=resumed)):
            return False
        _build(root, _wanted_manifest(**spec, metadata=fresh), None, overwrite=True, advice=None)
    finally:
        lock.release()
    return True


def _replaceable(root: Path, wanted: Manifest) -> bool:
    """Whether the store at `root` is an unfinished export's without ids that records no rows
    (_holds_no_rows) and differs from the Manifest `wanted`."""
    from ..store._files import read_manifest
    from ..store._format import is_own_file

    try:
        found = read_manifest(root)
    except (OSError, ValueError):  # none, or one whose defects the store reports
        return False
    if found.has_ids or not isinstance(found.metadata.get("fingerprints"), dict) or not _holds_no_rows(root, found):
        return False
    if not all(is_own_file(name) for name in os.listdir(root)):  # the user's own files: left to the refusal
        return False
    given = [(m.weights if m.weights_given else None) for m in (found, wanted)]
    return (found.n_rows, found.factored, found.dtype, found.dims, given[0], found.metadata) != (
        wanted.n_rows,
        wanted.factored,
        wanted.dtype,
        wanted.dims,
        given[1],
        wanted.metadata,
    )


def _holds_no_rows(root: Path, manifest: Manifest) -> bool:
    """Whether the store at `root` (its Manifest `manifest`) is unfinished and records no rows, in its
    manifest or in any range writer's progress file (one unreadable counts as holding rows)."""
    from ..store._locks import range_files
    from ..store._ranges import read_progress

    if manifest.complete or any(manifest.written):
        return False
    try:
        progress = [read_progress(root, manifest, a, b) for _, a, b, kind in range_files(root) if kind == "json"]
    except (OSError, ValueError):
        return False
    return not any(any(p.written) for p in progress if p is not None)


def _advice(path: str | os.PathLike, lead: str) -> str:
    """How to get past a store an export refuses, after `lead`: export elsewhere or delete it; when it
    records no rows, "; it holds no rows yet: unless an export is writing it now, delete it" instead."""
    from ..store._files import read_manifest, store_root

    root = store_root(path)
    try:
        empty = _holds_no_rows(root, read_manifest(root))
    except (OSError, ValueError):
        empty = False
    if empty:  # an export in its first batch may be writing it: deleting it then would break that export
        return "; it holds no rows yet: unless an export is writing it now, delete it, or export into another directory"
    return lead + EXPORT_ADVICE


def refuse_another_export(path: str | os.PathLike, metadata: dict, weights: Sequence[float] | None = None) -> None:
    """ValueError naming what changed when `path` holds a store exported with other parameters,
    fingerprints, settings (_SETTINGS) than `metadata`'s, or other learning rates than `weights` (the
    store's weights: one per checkpoint, or per checkpoint and layer in a factored store); nothing when
    there is no readable store there yet."""
    store = _existing_store(path)
    existing = _export_metadata(store)
    if existing is None or not isinstance(metadata.get("fingerprints"), dict):
        return
    params = changed_params(existing.get("params"), metadata.get("params"))
    if params:  # first: other columns change the checkpoint digests too (a leaf newly differentiated)
        raise ValueError(
            f"{os.fspath(path)} holds gradients of other parameters than this export's: {params}; another "
            "model or layers=, or a tracin version that differentiates other leaves. Rows of other columns "
            f"cannot be mixed{_advice(path, ': ')}"
        )
    kinds = [_kind(m.get("preconditioner")) for m in (existing, metadata)]
    if "preconditioner" not in existing and kinds[1] is not None:  # a store from before preconditioners
        raise ValueError(
            f"{os.fspath(path)} holds plain gradients, exported by a tracin from before preconditioners (its "
            f"metadata records none), and rows exported with preconditioner={kinds[1]!r} cannot be mixed with "
            "them" + _advice(path, ": ")
        )
    if "preconditioner" in existing and "preconditioner" in metadata and kinds[0] != kinds[1]:
        # before the inputs: the optimizer states are fingerprinted only with a preconditioner, so a store
        # exported with one and resumed without (or the reverse) would read as other optimizer states
        raise ValueError(
            f"{os.fspath(path)} holds gradients exported with another preconditioner: the preconditioner differs "
            f"({kinds[0]!r} there, {kinds[1]!r} here). Rows from both cannot be mixed: resume with "
            f"preconditioner={kinds[0]!r}"
            + (" (and the optimizer states it was exported with)" if kinds[0] is not None else "")
            + _advice(path, ", ")
        )
    sources = (existing.get("checkpoint_sources"), metadata.get("checkpoint_sources"))
    states = (existing.get("optimizer_state_sources"), metadata.get("optimizer_state_sources"))
    changes = changed_inputs(existing["fingerprints"], metadata["fingerprints"], sources, states)
    if changes:
        raise ValueError(
            f"{os.fspath(path)} holds gradients exported from other inputs: "
            + "; ".join(changes)
            + ". Rows from both cannot be mixed"
            + _advice(path, ": ")
        )
    settings = [
        _setting_change(key, existing[key], metadata[key])
        for key in _SETTINGS
        if key in existing and key in metadata and existing[key] != metadata[key]
    ]
    stored = [float(w) for w in store.weights]
    if weights is not None and stored != [float(w) for w in weights]:
        settings.append(
            f"the learning rates {stored} there vs {[float(w) for w in weights]} here "
            "(the checkpoints' lr, repeated per layer in a factored store)"
        )
    if settings:
        raise ValueError(
            f"{os.fspath(path)} holds gradients exported with other settings: "
            + "; ".join(settings)
            + ". Rows from both cannot be mixed"
            + _advice(path, ": ")
        )


def _setting_change(key: str, there: Any, here: Any) -> str:
    """`KEY A there vs B here`, naming only the differing entries of two dict records (a projection's
    seed, not its every segment)."""
    if isinstance(there, dict) and isinstance(here, dict):
        diff = [
            f"{k} {there.get(k)!r} there vs {here.get(k)!r} here"
            for k in sorted(set(there) | set(here), key=str)
            if there.get(k) != here.get(k)
        ]
        return f"{key}: " + ", ".join(diff)
    return f"{key} {there!r} there vs {here!r} here"


def _kind(preconditioner: Any) -> Any:
    """The kind of a metadata["preconditioner"] record ({"kind": "adam", ...}), None for none."""
    return preconditioner.get("kind") if isinstance(preconditioner, dict) else preconditioner


def refuse_unrecorded_static(path: str | os.PathLike, metadata: dict, array_digest: Callable[[int], str]) -> None:
    """ValueError when `path` holds a store recording, for an in-memory checkpoint, the digest of its
    arrays alone (`array_digest(c)`, as tracin made it before it fingerprinted the non-array leaves and
    static fields of params) while this export's digest of it covers those too: whether they changed
    cannot be told."""
    existing = _existing_metadata(path)
    if existing is None or "checkpoint_sources" not in existing:
        return
    stored, digests = existing["fingerprints"].get("checkpoints"), metadata["fingerprints"]["checkpoints"]
    if not isinstance(stored, list) or len(stored) != len(digests):
        return
    unknown = [
        c
        for c, source in enumerate(metadata["checkpoint_sources"])
        if source == "state" and stored[c] != digests[c] and array_digest(c) == stored[c]
    ]
    if unknown:
        raise ValueError(
            f"{os.fspath(path)} records checkpoints {unknown} by their arrays alone, as tracin did before it "
            "fingerprinted the non-array leaves and static fields of in-memory params (an Equinox float or "
            "static field, an int in a dict); whether those changed cannot be told, so the store cannot be "
            "resumed: finish it with the tracin version that started it" + _advice(path, ", ")
        )


def static_digest_note(framework: Any, sources: Sequence[Any]) -> str:
    """For two sides found exported at different checkpoints: why that may be false when they are
    tracin.jax in-memory checkpoints (source "state"), else "": a side exported by a tracin version
    that digested params by their arrays alone, before non-array leaves and static fields counted."""
    if framework != "jax" or "state" not in sources:
        return ""
    return (
        ". If one side was exported by a tracin version that digested in-memory JAX params by their "
        "arrays alone (before non-array leaves and static fields, such as an Equinox module's, were "
        "fingerprinted), the same params digest differently now: export that side again, or, when "
        "they are the same params, drop the record as above"
    )
