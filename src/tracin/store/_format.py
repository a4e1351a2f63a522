"""The manifest of a gradient store (docs/format.md): schema, validation, JSON parsing. No file I/O.

A store is a directory holding `manifest.json`, one .npy file per checkpoint (two, left and right,
in factored mode) and optionally `ids.npy`.
"""

from __future__ import annotations

import bisect
import codecs
import json
import math
import re
import secrets
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import numpy as np

FORMAT_NAME = "tracin-gradient-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IDS_FILE = "ids.npy"
# Present while create() builds a store: with it, files of ours in a folder without a manifest are
# the leftovers of an interrupted create (replaced); without it, they are someone else's (refused).
CREATING = "create-in-progress"
# NumPy dtype each store dtype is kept as on disk (NumPy has no bfloat16: its raw uint16 bits).
DISK_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
# Names a store may write into its directory (besides the range files below). ASCII digits only.
# writer.info: the record (pid, host, start) of the live writer of the whole store (_locks.INFO_FILE).
_OWN_FILE = re.compile(
    r"(checkpoint_[0-9]+(_left|_right)?\.npy|ids\.npy|manifest\.json(\.tmp)?|create-in-progress|writer\.info)"
)
# Files of a range writer of rows [start, stop): rows-<start>-<stop>.json (its progress), .json.tmp,
# .lock (held by the live writer). Numbers in decimal without leading zeros.
RANGE_FILE = re.compile(r"rows-(0|[1-9][0-9]*)-([1-9][0-9]*)\.(json|json\.tmp|lock)")
# A data file the manifest may name: at most MAX_NAME_DIGITS digits, far below any file system's name limit.
MAX_NAME_DIGITS = 12
_DATA_FILE = re.compile(rf"checkpoint_[0-9]{{1,{MAX_NAME_DIGITS}}}(_left|_right)?\.npy")
_STORE_ID = re.compile(r"[0-9a-f]{32}")
_MAX_COUNT = 2**63 - 1  # rows and columns must fit a signed 64-bit integer
# Deepest nesting of arrays and objects in a manifest, progress file or saved Whitening spec: a
# manifest needs 5 levels, the adapters' metadata a few more; the bound is independent of the stack.
MAX_JSON_DEPTH = 64
# Most arrays and objects in a manifest or progress file, counted before parsing: bounds the memory
# and time a reader spends on one (~150 bytes each once parsed). Each written [a, b) range is one;
# writers coalesce adjacent ranges (one range per checkpoint and range writer when rows are written in
# order), and refuse to record more (OverCapError). A hostile 64 MiB manifest could otherwise hold 10M.
MAX_JSON_CONTAINERS = 2**20
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_PIECE = 1 << 20  # bytes json_shape looks at a time
_BRACKET_STEP = np.zeros(256, dtype=np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1

Ranges = list[list[int]]  # sorted, disjoint [start, stop) row ranges


class StoreFormatError(ValueError):
    """A gradient store's manifest or files do not match the format (corrupt, truncated, newer, hostile)."""


class StoreChangedError(StoreFormatError):
    """The store was re-created, replaced or truncated after this reader opened it; open it again."""


class OverCapError(ValueError):
    """A store document a writer was about to write holds more JSON arrays and objects (`count`) than
    readers accept (`cap`, MAX_JSON_CONTAINERS); nothing was written."""

    def __init__(self, where: str, count: int, cap: int):
        super().__init__(
            f"{where} would hold {count} JSON arrays and objects, more than the {cap} a reader accepts "
            "(each written [start, stop) row range is one); it was not written"
        )
        self.where, self.count, self.cap = where, count, cap


def data_files(checkpoint: int, factored: bool) -> list[str]:
    """File names of one checkpoint: [full] or [left, right]."""
    stem = f"checkpoint_{checkpoint:03d}"
    return [f"{stem}_left.npy", f"{stem}_right.npy"] if factored else [f"{stem}.npy"]


def is_own_file(name: str) -> bool:
    """Whether a store may have written a file of this name."""
    return _OWN_FILE.fullmatch(name) is not None or RANGE_FILE.fullmatch(name) is not None


def range_file(start: int, stop: int, kind: str) -> str:
    """Name of a range writer's file: kind "json" (progress) or "lock"."""
    return f"rows-{start}-{stop}.{kind}"


def add_range(ranges: Ranges, start: int, stop: int) -> Ranges:
    """Sorted, disjoint `ranges` with [start, stop) added (a new list; `ranges` is left as it was)."""
    added = list(ranges)
    insert_range(added, start, stop)
    return added


def insert_range(ranges: Ranges, start: int, stop: int) -> Callable[[], None]:
    """Adds [start, stop) to sorted, disjoint `ranges` in place, merged with the ranges it overlaps or
    touches only: two bisections and one splice, no sort. Returns the function that undoes it (undo
    the latest insert first): the [a, b) lists it replaces are taken out whole, never changed. An
    empty range (start >= stop) adds nothing: recorded, [s, s) would make the manifest unreadable."""
    if start >= stop:
        return lambda: None
    lo = bisect.bisect_left(ranges, start, key=itemgetter(1))  # the first range ending at or after start
    hi = bisect.bisect_right(ranges, stop, lo, key=itemgetter(0))  # the first range starting after stop
    replaced = ranges[lo:hi]
    if replaced:
        start, stop = min(start, replaced[0][0]), max(stop, replaced[-1][1])
    ranges[lo:hi] = [[start, stop]]

    def undo() -> None:
        ranges[lo : lo + 1] = replaced

    return undo


def merge_ranges(ranges: Iterable[Sequence[int]]) -> Ranges:
    """[start, stop) `ranges` in any order, merged into sorted, disjoint ranges (a new list): one sort,
    for many ranges at once (a range file's, when merged)."""
    merged: Ranges = []
    for a, b in sorted(list(r) for r in ranges):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def gaps(ranges: Ranges, start: int, stop: int) -> Ranges:
    """The parts of [start, stop) that sorted, disjoint `ranges` do not cover."""
    found, pos = [], start
    for a, b in ranges:
        if b <= pos:
            continue
        if a >= stop:
            break
        if a > pos:
            found.append([pos, a])
        pos = max(pos, b)
    if pos < stop:
        found.append([pos, stop])
    return found


def new_store_id() -> str:
    """A random identity for a new store (32 hex digits): a reader checks it before each chunk."""
    return secrets.token_hex(16)


@dataclass
class Manifest:
    """Everything manifest.json records. `dims` per checkpoint: (d,) full or (p, q) factored;
    `store_id` is None only for stores written before ids were recorded."""

    n_rows: int
    dtype: str
    factored: bool
    dims: list[tuple[int, ...]]
    weights: list[float]
    weights_given: bool
    metadata: dict
    has_ids: bool
    written: list[Ranges]
    complete: bool = False
    files: list[list[str]] = field(default_factory=list)
    store_id: str | None = None

    def __post_init__(self) -> None:
        if not self.files:
            self.files = [data_files(c, self.factored) for c in range(len(self.dims))]

    # -- progress -------------------------------------------------------------------------------
    def rows_done(self, checkpoint: int) -> int:
        """r such that rows [0, r) of the checkpoint are written."""
        ranges = self.written[checkpoint]
        return ranges[0][1] if ranges and ranges[0][0] == 0 else 0

    def missing(self, checkpoint: int) -> Ranges:
        """Row ranges of the checkpoint not written yet."""
        return gaps(self.written[checkpoint], 0, self.n_rows)

    def mark_all_written(self, checkpoint: int, ranges: Iterable[Sequence[int]]) -> None:
        """Adds every [start, stop) of `ranges` to the checkpoint's written rows at once (one sort)."""
        self.written[checkpoint] = merge_ranges([*self.written[checkpoint], *ranges])

    # -- JSON -----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        checkpoints = []
        for c, dims in enumerate(self.dims):
            entry: dict[str, Any] = {"weight": self.weights[c]}
            if self.factored:
                entry.update(dims=list(dims), left=self.files[c][0], right=self.files[c][1])
            else:
                entry.update(dim=dims[0], file=self.files[c][0])
            entry["written"] = self.written[c]
            checkpoints.append(entry)
        doc: dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
        if self.store_id is not None:
            doc["id"] = self.store_id
        doc.update(
            {
                "mode": "factored" if self.factored else "full",
                "dtype": self.dtype,
                "n_rows": self.n_rows,
                "weights_given": self.weights_given,
                "checkpoints": checkpoints,
                "ids": IDS_FILE if self.has_ids else None,
                "metadata": self.metadata,
                "complete": self.complete,
            }
        )
        return doc

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Manifest:
        """Parses and checks a manifest document; StoreFormatError says what is wrong."""

        def fail(msg: str) -> StoreFormatError:
            return StoreFormatError(f"{where}: {msg}")

        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise fail(f'not a tracin gradient store manifest (no "format": "{FORMAT_NAME}")')
        version = doc.get("version")
        if not is_int(version) or version < 1:
            raise fail(f"format version must be a positive integer, got {short(version)}")
        if version > FORMAT_VERSION:
            raise fail(
                f"written in format version {short(version)}, but this tracin reads versions up to "
                f"{FORMAT_VERSION}; upgrade tracin to read it"
            )
        try:
            mode, dtype, n_rows = doc["mode"], doc["dtype"], doc["n_rows"]
            entries, complete = doc["checkpoints"], doc["complete"]
            weights_given, metadata, ids = doc["weights_given"], doc["metadata"], doc["ids"]
        except KeyError as e:
            raise fail(f"missing key {e.args[0]!r}") from None
        store_id = doc.get("id")
        if store_id is not None and not (isinstance(store_id, str) and _STORE_ID.fullmatch(store_id)):
            raise fail(f"id must be 32 lowercase hex digits, got {short(store_id)}")
        if mode not in ("full", "factored"):
            raise fail(f"mode must be 'full' or 'factored', got {short(mode)}")
        if not isinstance(dtype, str) or dtype not in DISK_DTYPES:
            raise fail(f"dtype must be one of {sorted(DISK_DTYPES)}, got {short(dtype)}")
        if not _is_count(n_rows):
            raise fail(f"n_rows must be a positive integer below 2**63, got {short(n_rows)}")
        if not isinstance(complete, bool) or not isinstance(weights_given, bool):
            raise fail(
                f"complete and weights_given must be true or false, got {short(complete)} and {short(weights_given)}"
            )
        if not isinstance(entries, list) or not entries:
            raise fail("checkpoints must be a non-empty list")
        if not isinstance(metadata, dict):
            raise fail(f"metadata must be an object, got {short(metadata)}")
        if ids is not None and ids != IDS_FILE:
            raise fail(f"ids must be null or {IDS_FILE!r}, got {short(ids)}")
        problem = metadata_problem(metadata)
        if problem is not None:
            raise fail(problem)
        factored = mode == "factored"
        dims, weights, written, files = [], [], [], []
        used: set[str] = set()
        for c, entry in enumerate(entries):
            try:
                d = tuple(entry["dims"]) if factored else (entry["dim"],)
                names = [entry["left"], entry["right"]] if factored else [entry["file"]]
                weight, ranges = entry["weight"], entry["written"]
            except KeyError as e:
                keys = "dims, left, right" if factored else "dim, file"
                raise fail(
                    f"checkpoints[{c}] lacks the key {short(e.args[0])} (a {mode} store's entries need {keys}, "
                    "weight and written)"
                ) from None
            except (TypeError, IndexError) as e:
                raise fail(f"checkpoints[{c}] is malformed ({short(e)})") from None
            if len(d) != (2 if factored else 1) or not all(_is_count(x) for x in d):
                raise fail(f"checkpoints[{c}] dims must be positive integers below 2**63, got {short(list(d))}")
            finite = _finite_float(weight)
            if finite is None:
                raise fail(f"checkpoints[{c}] weight must be a finite number, got {short(weight)}")
            if not weights_given and finite != 1.0:
                raise fail(
                    f"checkpoints[{c}] weight is {short(weight)} but weights_given is false, which means the "
                    "default weights (1 each)"
                )
            if not all(isinstance(n, str) and _DATA_FILE.fullmatch(n) for n in names):
                raise fail(
                    f"checkpoints[{c}] names unexpected data files {short(names)} (expected "
                    f"checkpoint_<1 to {MAX_NAME_DIGITS} digits>[_left|_right].npy)"
                )
            if used.intersection(names) or len(set(names)) < len(names):
                raise fail(f"checkpoints[{c}] names a data file already used: {names}")
            used.update(names)
            check_ranges(ranges, 0, n_rows, fail, f"checkpoints[{c}].written")
            dims.append(d)
            weights.append(finite)
            written.append(ranges)  # checked: lists of two ints, the document's own (no copy)
            files.append(names)
        manifest = cls(
            n_rows=n_rows,
            dtype=dtype,
            factored=factored,
            dims=dims,
            weights=weights,
            weights_given=weights_given,
            metadata=metadata,
            has_ids=ids is not None,
            written=written,
            complete=complete,
            files=files,
            store_id=store_id,
        )
        for c in range(len(dims) if manifest.complete else 0):
            if missing := manifest.missing(c):  # n_rows edited, or rows lost: name both
                raise fail(
                    f"marked complete, but checkpoints[{c}].written records rows {short(written[c])} of "
                    f"n_rows={n_rows} (missing {short(missing)})"
                )
        return manifest


def parse_manifest(data: bytes, where: str) -> Manifest:
    """The Manifest in the bytes of a manifest.json (strict JSON: no NaN or infinite numbers);
    any malformed input is a StoreFormatError naming `where`."""
    return Manifest.from_json(strict_json(data, where, "manifest"), where)


def strict_json(data: bytes, where: str, what: str) -> Any:
    """The JSON document in `data`: UTF-8 without a byte-order mark, no NaN or infinite numbers, no
    duplicate keys, nested at most MAX_JSON_DEPTH levels; anything else is a StoreFormatError naming
    `where` and saying it is a corrupt `what`."""

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    underflows: list[_Underflow] = []

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"number {text[:40]} is beyond the float64 range")
        if value == 0 and any(c in "123456789" for c in re.split("[eE]", text)[0]):
            underflows.append(_Underflow(text))  # refused below, naming where it is
            return underflows[-1]
        return value

    if data.startswith(codecs.BOM_UTF8):
        raise StoreFormatError(f"{where}: corrupt {what}, starts with a byte-order mark (expected UTF-8 without one)")
    depth, containers = json_shape(data)  # before decoding: one copy of the text less at a time
    if depth > MAX_JSON_DEPTH:
        raise StoreFormatError(
            f"{where}: corrupt {what}, JSON nested too deeply ({depth} levels; at most {MAX_JSON_DEPTH})"
        )
    if containers > MAX_JSON_CONTAINERS:
        raise StoreFormatError(
            f"{where}: corrupt {what}, {containers} JSON arrays and objects (at most {MAX_JSON_CONTAINERS}, "
            "each written [start, stop) row range one), refused unparsed"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StoreFormatError(f"{where}: corrupt {what}, not UTF-8 ({short(e)})") from None
    try:
        doc = json.loads(text, parse_constant=no_constant, parse_float=finite, object_pairs_hook=unique_keys)
    except ValueError as e:  # bad JSON, NaN / Infinity, duplicate keys, integers beyond Python's digit limit
        raise StoreFormatError(f"{where}: corrupt {what}, not valid JSON ({short(e)})") from None
    if underflows:
        first = underflows[0]
        raise StoreFormatError(
            f"{where}: corrupt {what}, {_json_path(doc, first) or 'the document'} is {first.text[:40]}, which is "
            "not 0 but rounds to 0 in float64 (numbers must be 0 or within the float64 range)"
        )
    return doc


class _Underflow(float):
    """0.0 read from a JSON number that is not 0 but underflows float64 (1e-400), holding its text."""

    text: str

    def __new__(cls, text: str) -> _Underflow:
        self = super().__new__(cls, 0.0)
        self.text = text
        return self


def _json_path(doc: Any, target: object) -> str:
    """Where `target` (found by identity) sits in the parsed JSON `doc`: 'checkpoints[0].weight'."""
    stack: list[tuple[Any, str]] = [(doc, "")]
    while stack:
        x, path = stack.pop()
        if x is target:
            return path
        if isinstance(x, dict):
            for k, v in x.items():
                named = k.isidentifier() and len(k) <= 80  # a longer key is cut (a manifest's keys may be megabytes)
                stack.append((v, (f"{path}.{k}" if path else k) if named else f"{path}[{short(k)}]"))
        elif isinstance(x, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(x))
    raise AssertionError("target not in doc")


def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json.loads's object_pairs_hook refusing (ValueError) an object with a key twice: other
    parsers may keep the first value where Python keeps the last."""
    doc = dict(pairs)
    if len(doc) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {short(key)} appears twice in one object")
            seen.add(key)
    return doc


def shallow_json_loads(text: str) -> Any:
    """json.loads(text) once `text` is checked to nest at most MAX_JSON_DEPTH levels (ValueError
    otherwise: json's recursion limit would end a deeper one in a RecursionError naming nothing)."""
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested {depth} levels deep, at most {MAX_JSON_DEPTH}")
    return json.loads(text)


def json_depth(text: str | bytes) -> int:
    """How deeply arrays and objects nest in JSON `text` (json_shape)."""
    return json_shape(text)[0]


def json_shape(text: str | bytes) -> tuple[int, int]:
    """How deeply arrays and objects nest in JSON `text` (str, or bytes in UTF-8), and how many there
    are (strings skipped), counted without recursion or parsing (exact for valid JSON; for invalid
    text figures the parser then refuses anyway). Memory: a few arrays of one piece (1 MiB) each,
    whatever the text (no copy of it, nor an object per escape)."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    escapes = b"\\" in data
    deepest, level, count, quoted, run = 0, 0, 0, 0, 0
    for a in range(0, len(data), _PIECE):  # in pieces: no array as long as the text
        piece = np.frombuffer(data, np.uint8, min(_PIECE, len(data) - a), a)
        quotes = piece == _QUOTE
        if escapes:  # a quote after an odd run of backslashes is escaped: it neither opens nor closes a string
            run, escaped = _escaped(piece, run)
            quotes &= ~escaped
        parity = np.cumsum(quotes, dtype=np.uint8)  # quotes so far, odd within a string (mod 256)
        parity += quoted
        steps = np.take(_BRACKET_STEP, piece)
        steps = steps[(steps != 0) & (parity & 1 == 0)]
        quoted = int(parity[-1]) & 1
        if steps.size:
            levels = level + np.cumsum(steps, dtype=np.int64)
            deepest, level = max(deepest, int(levels.max())), int(levels[-1])
            count += int(np.count_nonzero(steps > 0))
    return deepest, count


def _escaped(piece: np.ndarray, run: int) -> tuple[int, np.ndarray]:
    """Which bytes of `piece` (uint8) follow an odd run of backslashes, given the `run` of backslashes
    that ended the text before it; and the run that ends `piece` (for the next)."""
    index = np.arange(piece.size, dtype=np.int64)
    # the last byte at or before each that is not a backslash (-1 - run where none is in the piece)
    last = np.maximum.accumulate(np.where(piece == _BACKSLASH, -1 - run, index))
    before = np.empty_like(last)
    before[0], before[1:] = -1 - run, last[:-1]
    return int(piece.size - 1 - last[-1]), (index - 1 - before) & 1 == 1


def check_containers(data: bytes, where: str) -> None:
    """OverCapError naming `where` if the JSON document `data` holds more arrays and objects than
    strict_json accepts (MAX_JSON_CONTAINERS): what a writer checks before writing it."""
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_CONTAINERS:  # brackets in strings only add to these
        return
    count = json_shape(data)[1]
    if count > MAX_JSON_CONTAINERS:
        raise OverCapError(where, count, MAX_JSON_CONTAINERS)


def metadata_problem(metadata: dict) -> str | None:
    """What is wrong with the keys of a gradient set's metadata that scoring compares between test and
    train (as the adapters record them), or None. Checked where scoring reads them: "preconditioner"
    (absent, null or an object with a string "kind") where "mode" is recorded too, "params" (absent or
    a list of objects each with a string "name") where "framework" is; metadata of the user's own
    without those keys is not read, whatever its values."""
    advice = "as the adapters record it, for scoring to compare; keep other values under another key"
    if "preconditioner" in metadata and "mode" in metadata:
        value = metadata["preconditioner"]
        if value is not None and not (isinstance(value, dict) and isinstance(value.get("kind"), str)):
            return (
                "metadata['preconditioner'] must be null or an object with a string 'kind' (e.g. "
                f"{{'kind': 'adam'}}, {advice}), got {short(value)}"
            )
    if "params" in metadata and metadata.get("framework") is not None:
        value = metadata["params"]
        if not isinstance(value, list):
            return f"metadata['params'] must be a list of {{'name': ...}} objects ({advice}), got {short(value)}"
        for i, p in enumerate(value):
            if not (isinstance(p, dict) and isinstance(p.get("name"), str)):
                return f"metadata['params'][{i}] must be an object with a string 'name' ({advice}), got {short(p)}"
    return None


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_count(x: Any) -> bool:
    return is_int(x) and 1 <= x <= _MAX_COUNT


def _finite_float(x: Any) -> float | None:
    """x as a finite float, or None if it is not a number or out of the float64 range."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return None
    try:
        value = float(x)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def short(x: Any, limit: int = 80) -> str:
    """repr(x) cut to `limit` characters (hostile manifests can hold huge values)."""
    if is_int(x) and x.bit_length() > 200:
        return f"an integer of {x.bit_length()} bits"
    text = repr(x) if not isinstance(x, BaseException) else str(x)
    return text if len(text) <= limit else text[:limit] + "..."


# Shown escaped on a terminal: control characters (C0 and C1: ESC, CSI \x9b, BEL, newline), line and
# paragraph separators, lone surrogates, and the bidi controls that reorder what follows. Other
# characters Python calls unprintable (an ideographic space, a zero-width joiner inside an emoji, private
# use, characters newer than Python's Unicode tables) are ordinary text there.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _unsafe(c: str) -> bool:
    return c in _BIDI_CONTROLS or unicodedata.category(c) in _UNSAFE_CATEGORIES


def printable(text: str) -> str:
    """`text` with every character that could drive or garble a terminal written as its Python escape:
    control characters (ESC \\x1b, BEL \\x07, newline \\n), line separators, lone surrogates and bidi
    controls (\\u202e). For strings from a store (metadata keys, ids) shown on a terminal: a store from
    elsewhere cannot send escape sequences to it (set its title, clear or recolour it, hide text)."""
    if text.isprintable() or not any(map(_unsafe, text)):
        return text
    return "".join(repr(c)[1:-1] if _unsafe(c) else c for c in text)


def check_ranges(ranges: Any, start: int, stop: int, fail: Callable[[str], Exception], name: str) -> None:
    """Raises fail(message) unless `ranges` is a list of sorted, disjoint [a, b) lists within [start, stop]."""
    pos = start
    ok = isinstance(ranges, list)
    for r in ranges if ok else []:
        if not (isinstance(r, list) and len(r) == 2 and is_int(r[0]) and is_int(r[1]) and pos <= r[0] < r[1] <= stop):
            ok = False
            break
        pos = r[1]
    if not ok:
        raise fail(
            f"{name} must be sorted, disjoint [start, stop) ranges within [{start}, {stop}], got {short(ranges)}"
        )
