"""The on-disk format of a gradient store (docs/format.md): manifest schema, validation, file I/O.

A store is a directory holding `manifest.json`, one .npy file per checkpoint (two, left and right,
in factored mode) and optionally `ids.npy`. Everything here is plain NumPy + JSON.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "tracin-gradient-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IDS_FILE = "ids.npy"
# NumPy dtype each store dtype is kept as on disk (NumPy has no bfloat16: its raw uint16 bits).
DISK_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
# Names a store may write into its directory (used to recognise leftovers of an interrupted create).
_OWN_FILE = re.compile(r"(checkpoint_\d+(_left|_right)?\.npy|ids\.npy|manifest\.json(\.tmp)?)")

Ranges = list[list[int]]  # sorted, disjoint [start, stop) row ranges


class StoreFormatError(ValueError):
    """A gradient store's manifest or files do not match the format (corrupt, truncated, newer)."""


def data_files(checkpoint: int, factored: bool) -> list[str]:
    """File names of one checkpoint: [full] or [left, right]."""
    stem = f"checkpoint_{checkpoint:03d}"
    return [f"{stem}_left.npy", f"{stem}_right.npy"] if factored else [f"{stem}.npy"]


def is_own_file(name: str) -> bool:
    return _OWN_FILE.fullmatch(name) is not None


@dataclass
class Manifest:
    """Everything manifest.json records. `dims` per checkpoint: (d,) full or (p, q) factored."""

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
        gaps, pos = [], 0
        for a, b in self.written[checkpoint]:
            if a > pos:
                gaps.append([pos, a])
            pos = b
        if pos < self.n_rows:
            gaps.append([pos, self.n_rows])
        return gaps

    def mark_written(self, checkpoint: int, start: int, stop: int) -> None:
        merged: Ranges = []
        for a, b in sorted(self.written[checkpoint] + [[start, stop]]):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.written[checkpoint] = merged

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
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "mode": "factored" if self.factored else "full",
            "dtype": self.dtype,
            "n_rows": self.n_rows,
            "weights_given": self.weights_given,
            "checkpoints": checkpoints,
            "ids": IDS_FILE if self.has_ids else None,
            "metadata": self.metadata,
            "complete": self.complete,
        }

    @classmethod
    def from_json(cls, doc: Any, where: str) -> "Manifest":
        """Parses and checks a manifest document; StoreFormatError says what is wrong."""
        def fail(msg: str) -> StoreFormatError:
            return StoreFormatError(f"{where}: {msg}")

        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise fail(f"not a tracin gradient store manifest (no \"format\": \"{FORMAT_NAME}\")")
        version = doc.get("version")
        if not _is_int(version) or version < 1:
            raise fail(f"format version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise fail(f"written in format version {version}, but this tracin reads versions up to "
                       f"{FORMAT_VERSION}; upgrade tracin to read it")
        try:
            mode, dtype, n_rows = doc["mode"], doc["dtype"], doc["n_rows"]
            entries, complete = doc["checkpoints"], doc["complete"]
            weights_given, metadata, ids = doc["weights_given"], doc["metadata"], doc["ids"]
        except KeyError as e:
            raise fail(f"missing key {e.args[0]!r}") from None
        if mode not in ("full", "factored"):
            raise fail(f"mode must be 'full' or 'factored', got {mode!r}")
        if dtype not in DISK_DTYPES:
            raise fail(f"dtype must be one of {sorted(DISK_DTYPES)}, got {dtype!r}")
        if not _is_int(n_rows) or n_rows < 1:
            raise fail(f"n_rows must be a positive integer, got {n_rows!r}")
        if not isinstance(entries, list) or not entries:
            raise fail("checkpoints must be a non-empty list")
        if not isinstance(metadata, dict) or ids not in (None, IDS_FILE):
            raise fail(f"metadata must be an object and ids null or {IDS_FILE!r}")
        factored = mode == "factored"
        dims, weights, written, files = [], [], [], []
        for c, entry in enumerate(entries):
            try:
                d = tuple(entry["dims"]) if factored else (entry["dim"],)
                names = [entry["left"], entry["right"]] if factored else [entry["file"]]
                weight, ranges = entry["weight"], entry["written"]
            except (KeyError, TypeError) as e:
                raise fail(f"checkpoints[{c}] is malformed ({e!r})") from None
            if len(d) != (2 if factored else 1) or not all(_is_int(x) and x >= 1 for x in d):
                raise fail(f"checkpoints[{c}] dims must be positive integers, got {list(d)}")
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
                raise fail(f"checkpoints[{c}] weight must be a finite number, got {weight!r}")
            if not all(isinstance(n, str) and is_own_file(n) and not n.startswith(("ids", "manifest"))
                       for n in names):
                raise fail(f"checkpoints[{c}] names unexpected data files {names}")
            _check_ranges(ranges, n_rows, fail, f"checkpoints[{c}].written")
            dims.append(d)
            weights.append(float(weight))
            written.append([list(r) for r in ranges])
            files.append(names)
        manifest = cls(n_rows=n_rows, dtype=dtype, factored=factored, dims=dims, weights=weights,
                       weights_given=bool(weights_given), metadata=metadata, has_ids=ids is not None,
                       written=written, complete=bool(complete), files=files)
        if manifest.complete and any(manifest.missing(c) for c in range(len(dims))):
            raise fail("marked complete but some rows are not recorded as written")
        return manifest


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_ranges(ranges: Any, n_rows: int, fail, name: str) -> None:
    pos = 0
    ok = isinstance(ranges, list)
    for r in ranges if ok else []:
        if not (isinstance(r, list) and len(r) == 2 and _is_int(r[0]) and _is_int(r[1])
                and pos <= r[0] < r[1] <= n_rows):
            ok = False
            break
        pos = r[1]
    if not ok:
        raise fail(f"{name} must be sorted, disjoint [start, stop) ranges within [0, {n_rows}], "
                   f"got {ranges!r}")


# -- files ------------------------------------------------------------------------------------------

def write_json_atomic(path: Path, doc: dict) -> None:
    """Replaces `path` by `doc` atomically: write a temporary, fsync it, rename it over `path`.

    Readers and a crashed writer see the old or the new document, never a mix. (The rename itself
    becomes durable against power loss with fsync_dir; until then a crash can only lose progress.)
    """
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(doc, indent=2, allow_nan=False).encode() + b"\n"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Makes renames and new files in a directory durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    if not root.is_dir():
        raise FileNotFoundError(f"no gradient store at {root} (not a directory)")
    if not path.is_file():
        raise FileNotFoundError(f"no gradient store at {root} (no {MANIFEST})")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreFormatError(f"{path}: corrupt manifest, not valid JSON ({e})") from None
    return Manifest.from_json(doc, str(path))


def create_npy(path: Path, dtype: np.dtype, shape: tuple[int, int]) -> None:
    """An .npy file of the given shape whose data is all zero bytes (sparse where the OS allows)."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.truncate(f.tell() + shape[0] * shape[1] * dtype.itemsize)
        f.flush()
        os.fsync(f.fileno())


def npy_data_offset(path: Path, dtype: np.dtype, shape: tuple[int, int]) -> int:
    """Byte offset of the data in an .npy file, after checking its header and size against
    the expected dtype and shape (StoreFormatError otherwise)."""
    if not path.is_file():
        raise StoreFormatError(f"{path}: data file is missing")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read is None:
                raise ValueError(f"unsupported .npy version {version}")
            found_shape, fortran, found_dtype = read(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as e:
        raise StoreFormatError(f"{path}: corrupt .npy header ({e})") from None
    if found_dtype != dtype:
        raise StoreFormatError(f"{path}: dtype {found_dtype} on disk, but the manifest implies {dtype}")
    if tuple(found_shape) != shape:
        raise StoreFormatError(f"{path}: shape {tuple(found_shape)} on disk, but the manifest "
                               f"implies {shape}")
    if fortran:
        raise StoreFormatError(f"{path}: stored in Fortran order; the format requires C order")
    expected = offset + shape[0] * shape[1] * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        raise StoreFormatError(f"{path}: truncated, {size} bytes on disk but {expected} expected "
                               f"for shape {shape} {dtype}")
    if size > expected:
        raise StoreFormatError(f"{path}: {size - expected} unexpected bytes after the data "
                               f"({size} bytes on disk, {expected} expected)")
    return offset
