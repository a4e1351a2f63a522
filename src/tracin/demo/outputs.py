"""What the demo wrote in its output folder, so that a rerun replaces its own files and refuses to
touch anything else there (a user's own store at OUT/grads/train, their report.md with -o .)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..store._files import open_file, read_all, read_manifest, read_manifest_bytes
from ..store._format import IDS_FILE, MANIFEST

try:
    import fcntl
except ImportError:  # Windows: no flock, so two demo runs into one folder are not kept apart there
    fcntl = None  # type: ignore[assignment]

LEDGER = ".tracin-demo.json"
WHERE = "output folder (-o / DemoConfig.output)"
OUTPUTS = {  # the files the demo writes in its output folder, besides checkpoints and stores
    "held-out accuracy": "held_out_accuracy.png",
    "checkpoint diagnostics": "checkpoint_diagnostics.png",
    "detection": "mislabel_detection.png",
    "influence": "proponents_opponents.png",
    "ranking": "self_influence_ranking.csv",
    "report": "report.md",
}
STORES = {"train": "train", "test": "test", "train, all checkpoints": "train_all_checkpoints"}  # in OUT/grads
_PARTIAL = ".tracin-demo-partial-"  # in the name of a folder being written or removed, with a random token
_TEMPORARY = ".tracin-demo-tmp"  # in the name a file is written under, then renamed
# The only keys a record may have (relative paths in OUT, never through other folders than OUT/grads and
# OUT/checkpoints): the demo's files (framework.checkpoint_path's names and OUTPUTS, as (folder, stem,
# suffix) patterns) and stores, with digests; their names while being written or removed, null.
_FILES = [
    ("checkpoints/", r"checkpoint_\d+", r"\.(?:npz|pt)"),
    *(("", re.escape(Path(name).stem), re.escape(Path(name).suffix)) for name in OUTPUTS.values()),
]
_NAMES = "|".join(STORES.values())
_FILE_KEY = re.compile("|".join(folder + stem + suffix for folder, stem, suffix in _FILES))
_STORE_KEY = re.compile(rf"grads/(?:{_NAMES})")
_LEFTOVER_KEY = re.compile(
    "|".join(
        [
            rf"grads/\.(?:{_NAMES}){re.escape(_PARTIAL)}[0-9a-f]{{16}}",
            *(rf"{folder}\.{stem}{re.escape(_TEMPORARY)}{suffix}" for folder, stem, suffix in _FILES),
        ]
    )
)
_SHA256 = re.compile("[0-9a-f]{64}")
_MAX_RECORD_BYTES = 1 << 20  # a record names a few dozen paths (~100 bytes each): a bigger file is not one
# flock errors that mean "no locks on this file system" (some network ones): the demo then runs unlocked
_NO_LOCKS = {errno.ENOLCK, errno.EBADF, errno.EINVAL, getattr(errno, "EOPNOTSUPP", errno.EINVAL)}


class DemoFiles:
    """The record OUT/.tracin-demo.json: each file and gradient store folder the demo wrote (by path
    relative to OUT) with the SHA-256 of the file or of the store's manifest, recorded before the
    file or store appears at its path (each is written under a temporary name, then renamed). null
    marks a file or folder the demo is writing or removing under a temporary name (an interrupted
    run's leftover, removed by the next run); nothing else is replaced or removed without its digest.
    A record naming any other path is refused. OUT/grads and OUT/checkpoints may be symbolic links to folders
    (e.g. on a faster disk): the demo writes there, and replaces its own files there by their digests.

    `out` must be a folder. From creation to close() (a with block) this holds an exclusive flock on
    it, so that a second demo run into the same folder meanwhile is refused (ValueError); where the
    OS (Windows) or the file system has no flock, runs are not kept apart."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / LEDGER
        self._lock = _lock(self.out)
        try:
            self.found = os.path.lexists(self.path)  # False: no record, e.g. an older tracin's demo output
            self.entries = self._load() if self.found else {}
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> DemoFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Leaves the folder to another demo run."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _load(self) -> dict[str, str | None]:
        try:  # a regular file (never a link or FIFO, which could hang the read), read to a bound
            fd = open_file(self.path)
            try:
                data = read_all(fd, _MAX_RECORD_BYTES, self.path)
            finally:
                os.close(fd)
            entries = json.loads(data)["files"]
            if not isinstance(entries, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError, RecursionError):  # RecursionError: deeply nested
            raise ValueError(self._not_a_record("")) from None
        for key, digest in entries.items():
            if digest is None:
                valid = _LEFTOVER_KEY.fullmatch(key)
            else:
                final = _FILE_KEY.fullmatch(key) or _STORE_KEY.fullmatch(key)
                valid = final and isinstance(digest, str) and _SHA256.fullmatch(digest)
            if not valid:
                why = f": it names {key!r} (with {digest!r}), not a file the demo writes"
                raise ValueError(self._not_a_record(why))
        return entries

    def _not_a_record(self, why: str) -> str:
        return f"{self.path} is not the record tracin demo keeps of its files{why}; choose another {WHERE} or remove it"

    def clear(self, paths: Iterable[Path]) -> None:
        """Before a run that writes `paths`: ValueError, before anything is removed, if a folder they
        go in is not a folder, or one of them exists and is not the demo's (or is the demo's store
        with other files in it); then removes them, the other files an earlier run recorded (unless
        changed since: those are left alone and forgotten) and the leftovers of an interrupted run."""
        paths = list(paths)
        for folder in sorted({p.parent for p in paths} - {self.out}):  # OUT/grads, OUT/checkpoints
            if os.path.lexists(folder) and not folder.is_dir():
                link = f"a symbolic link to {os.readlink(folder)}, which is" if folder.is_symlink() else "a file,"
                raise ValueError(
                    f"{folder} is {link} not a folder; the demo writes its {folder.name} there: "
                    f"move it away or choose another {WHERE}"
                )
        temporaries = [_temporary(p) for p in paths if _FILE_KEY.fullmatch(self._key(p))]
        for p in [*paths, *temporaries]:
            doubt = self._doubt(p) if os.path.lexists(p) else None
            if doubt:
                raise ValueError(doubt)
        recorded = [self.out / key for key in sorted(self.entries)]
        for p in [*paths, *(p for p in recorded if p not in paths)]:
            if os.path.lexists(p) and self._owns(p):
                self._remove(p)
            elif self._key(p) in self.entries:
                self._forget(p)

    def put(self, path: Path, write: Callable[[Path], Any]) -> Path:
        """Writes a file at `path` by write(temporary path) and renames it there: the temporary name is
        recorded (null) before it is made, the file's digest before the rename."""
        temporary = _temporary(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.entries[self._key(temporary)] = None
        self._save()
        try:
            _create_new(temporary)
        except FileExistsError:  # not the demo's: clear() removed those
            self._forget(temporary)
            raise ValueError(self._doubt(temporary)) from None
        try:
            write(temporary)
            self.entries[self._key(path)] = _digest(temporary)
            self._save()
            os.replace(temporary, path)
        finally:
            if os.path.lexists(temporary):
                temporary.unlink()
            self._forget(temporary)
        return path

    def store(self, path: Path, write: Callable[[Path], Any]) -> Path:
        """Writes a gradient store at `path` by write(folder) into a new folder, then renames it there.
        If write raises an Exception (a full disk), the new folder and its record go before it propagates;
        an interrupted or killed run's (null in the record) are the next run's to remove."""
        partial = self._partial(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(partial)
        except Exception:
            shutil.rmtree(partial, ignore_errors=True)
            if not os.path.lexists(partial):  # else its null record keeps it the next run's to remove
                self._forget(partial)
            raise
        self.entries[self._key(path)] = _digest(partial)
        self._save()
        os.rename(partial, path)
        self._forget(partial)
        return path

    def _partial(self, path: Path) -> Path:
        """A new folder name next to `path`, recorded as being written before anything is put there."""
        partial = path.with_name(f".{path.name}{_PARTIAL}{secrets.token_hex(8)}")
        self.entries[self._key(partial)] = None
        self._save()
        return partial

    def _remove(self, path: Path) -> None:
        if path.is_dir() and not path.is_symlink() and self.entries.get(self._key(path)) is not None:
            trash = self._partial(path)  # renamed first: a store half removed is never left at `path`
            os.rename(path, trash)
            self._forget(path)
            path = trash
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        self._forget(path)

    def _forget(self, path: Path) -> None:
        del self.entries[self._key(path)]
        self._save()

    def _owns(self, path: Path) -> bool:
        return self._doubt(path) is None

    def _doubt(self, path: Path) -> str | None:
        """None if `path` (which exists) is the demo's to replace or remove, else the error saying why not."""
        key = self._key(path)
        if key in self.entries and not path.is_symlink() and self.entries[key] in (None, _digest(path)):
            strays = _strays(path) if self.entries[key] and path.is_dir() else []
            if not strays:  # null: a temporary name the demo chose and recorded (_LEFTOVER_KEY)
                return None
            return (
                f"{path} holds files tracin demo did not write ({', '.join(strays)}), so the demo will not "
                f"replace it; move them away or choose another {WHERE}"
            )
        if path.is_symlink():
            why = "it is a symbolic link"
        elif not self.found:
            why = (
                f"the folder has no {LEDGER}, the record the demo keeps of its files; if the folder holds "
                "only the output of tracin demo from an older tracin version, remove the folder"
            )
        else:
            why = f"it is not recorded in {self.path}, or it changed since"
        return (
            f"{path} was not written by tracin demo ({why}), so the demo will not replace it; "
            f"choose another {WHERE} or move it away"
        )

    def _key(self, path: Path) -> str:
        return Path(path).relative_to(self.out).as_posix()

    def _save(self) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        if os.path.lexists(temporary):  # a killed run's
            temporary.unlink()
        _create_new(temporary, json.dumps({"files": self.entries}, indent=1, sort_keys=True).encode())
        os.replace(temporary, self.path)


def _lock(out: Path) -> int | None:
    """A descriptor of the folder `out` holding an exclusive flock on it (None without flock);
    ValueError if another demo run holds it."""
    if fcntl is None:
        return None
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(
            f"another tracin demo is writing to {out}; wait for it to end or choose another {WHERE}"
        ) from None
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            os.close(fd)
            raise
    return fd


def _temporary(path: Path) -> Path:
    """The name the file `path` is written under (its suffix kept, for np.savez)."""
    return path.with_name(f".{path.stem}{_TEMPORARY}{path.suffix}")


def _create_new(path: Path, data: bytes = b"") -> None:
    """Writes `data` to a new regular file at `path`; FileExistsError if something is there (never
    writes through a symbolic link)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _strays(store: Path) -> list[str]:
    """The names in a store folder other than its manifest and the files it lists (a user's own)."""
    listed = {MANIFEST}
    try:
        manifest = read_manifest(store)
    except (OSError, ValueError):
        manifest = None
    if manifest is not None:
        listed.update(name for names in manifest.files for name in names)
        if manifest.has_ids:
            listed.add(IDS_FILE)
    return sorted(set(os.listdir(store)) - listed)


def _digest(path: Path) -> str | None:
    """SHA-256 of a store's manifest (a folder) or of a file; None if there is neither, or it is not a
    regular file (a link, FIFO or device is never opened: a FIFO would hang the read, /dev/zero fill the
    memory) or a manifest beyond the store's bound. A file is hashed a piece at a time."""
    try:
        if path.is_dir():
            return hashlib.sha256(read_manifest_bytes(path)).hexdigest()
        fd = open_file(path)
        try:
            h = hashlib.sha256()
            while piece := os.read(fd, 1 << 20):
                h.update(piece)
            return h.hexdigest()
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return None
