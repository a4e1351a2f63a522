"""Range writers' progress files (docs/format.md, "Several writers"): rows-<start>-<stop>.json.

A range writer of rows [start, stop) records the rows it has written here, replacing the file
atomically after each write as a writer of the whole store does with manifest.json. The next writer
of the whole store merges every such file into manifest.json and removes the range files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._files import MAX_MANIFEST_BYTES, fsync_dir, open_file, read_all, remove_if_present, write_json_atomic
from ._format import (
    MANIFEST,
    Manifest,
    OverCapError,
    Ranges,
    StoreFormatError,
    check_ranges,
    is_int,
    range_file,
    short,
    strict_json,
)
from ._locks import range_files

PROGRESS_FORMAT = "tracin-gradient-store-range"
PROGRESS_VERSION = 1


@dataclass
class RangeProgress:
    """What rows-<start>-<stop>.json records: the store's id and, per checkpoint, the rows of
    [start, stop) written (sorted, disjoint [a, b) ranges)."""

    store_id: str | None
    start: int
    stop: int
    written: list[Ranges]

    def to_json(self) -> dict:
        return {
            "format": PROGRESS_FORMAT,
            "version": PROGRESS_VERSION,
            "id": self.store_id,
            "rows": [self.start, self.stop],
            "written": self.written,
        }

    @classmethod
    def from_json(cls, doc: Any, where: str, manifest: Manifest, start: int, stop: int) -> RangeProgress:
        """Parses and checks a progress document against the store's manifest and the range its file
        name gives; StoreFormatError says what is wrong."""

        def fail(msg: str) -> StoreFormatError:
            return StoreFormatError(f"{where}: {msg}")

        if not isinstance(doc, dict) or doc.get("format") != PROGRESS_FORMAT:
            raise fail(f'not a range writer\'s progress file (no "format": "{PROGRESS_FORMAT}")')
        version = doc.get("version")
        if not is_int(version) or not 1 <= version <= PROGRESS_VERSION:
            raise fail(f"version must be an integer from 1 to {PROGRESS_VERSION}, got {short(version)}")
        if doc.get("id") != manifest.store_id:
            raise fail(
                f"written for another store (id {short(doc.get('id'))}, but the store's id is {manifest.store_id})"
            )
        if not 0 <= start < stop <= manifest.n_rows:
            raise fail(f"rows [{start}, {stop}) are not a non-empty range within the store's {manifest.n_rows} rows")
        if doc.get("rows") != [start, stop]:
            raise fail(f"rows must be [{start}, {stop}] as the file's name says, got {short(doc.get('rows'))}")
        written = doc.get("written")
        if not isinstance(written, list) or len(written) != len(manifest.dims):
            raise fail(
                f"written must be a list of {len(manifest.dims)} range lists (one per checkpoint), got {short(written)}"
            )
        for c, ranges in enumerate(written):
            check_ranges(ranges, start, stop, fail, f"written[{c}]")
        return cls(manifest.store_id, start, stop, written)  # checked: lists of lists of two ints


def read_progress(root: Path, manifest: Manifest, start: int, stop: int) -> RangeProgress | None:
    """The checked progress file of rows [start, stop) in `root`, or None if there is none. A link,
    non-regular or malformed file is a StoreFormatError saying that removing it redoes the range."""
    path = root / range_file(start, stop, "json")
    try:
        try:
            fd = open_file(path)
        except FileNotFoundError:
            return None
        try:
            data = read_all(fd, MAX_MANIFEST_BYTES, path)
        finally:
            os.close(fd)
        return RangeProgress.from_json(strict_json(data, str(path), "progress file"), str(path), manifest, start, stop)
    except StoreFormatError as e:
        raise StoreFormatError(f"{e}; remove it to write rows [{start}, {stop}) again") from None


def write_progress(root: Path, progress: RangeProgress) -> None:
    """Replaces the progress file of the range atomically (as manifest.json is replaced)."""
    write_json_atomic(root / range_file(progress.start, progress.stop, "json"), progress.to_json())


def merge_progress(root: Path, manifest: Manifest) -> None:
    """Merges every range writer's progress in `root` into `manifest` and manifest.json (durably),
    then removes the range files. Call it holding the exclusive directory lock (no range writer runs)."""
    files = range_files(root)
    if not files:
        return
    if not manifest.complete:  # (a finished store's range files are leftovers of a finalize cut short)
        found = [read_progress(root, manifest, start, stop) for _, start, stop, kind in files if kind == "json"]
        for progress in found:
            for c, ranges in enumerate(progress.written if progress is not None else []):
                manifest.mark_all_written(c, ranges)
        try:
            write_json_atomic(root / MANIFEST, manifest.to_json())
        except OverCapError as e:
            raise ValueError(
                f"{e}: merging the {len(files)} range files (rows-*) of unfinished range writers would "
                f"record {sum(map(len, manifest.written))} disjoint written row ranges over all checkpoints. Finish "
                "those ranges first (GradientStore.create(path, <the same spec>, rows=(start, stop)) for each: rows "
                "written in order merge into one range), then merge"
            ) from None
        fsync_dir(root)
    for name, *_ in files:
        remove_if_present(root / name)
    fsync_dir(root)
