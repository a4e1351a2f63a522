"""What the demo wrote in its output folder, so that a rerun replaces its own gradient stores and
checkpoints and refuses to touch anything else there (a user's own store at OUT/grads/train)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..store._format import MANIFEST

LEDGER = ".tracin-demo.json"
_CHECKPOINT_SUFFIXES = (".npz", ".pt")


class DemoFiles:
    """The ledger OUT/.tracin-demo.json: each gradient store folder and checkpoint file the demo
    wrote (by path relative to OUT) with the SHA-256 of the store's manifest or of the file, or null
    while it is being written (an interrupted run's leftovers are the demo's too)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / LEDGER
        self.entries = self._load()

    def _load(self) -> dict[str, str | None]:
        if not self.path.exists():
            return {}
        try:
            entries = json.loads(self.path.read_text())["files"]
            if not isinstance(entries, dict) or not all(v is None or isinstance(v, str) for v in entries.values()):
                raise TypeError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise ValueError(
                f"{self.path} is not the record tracin demo keeps of its files; choose another output "
                "folder (-o / --output) or remove it"
            ) from None
        return entries

    def clear(self, stores: Iterable[Path], checkpoints: Path) -> None:
        """Removes the stores at `stores` and the checkpoint_* files in `checkpoints` that an earlier
        demo run wrote; ValueError, before removing anything, if one of them is not the demo's."""
        found = [p for p in stores if os.path.lexists(p)]
        if checkpoints.is_dir():
            found += sorted(
                p for p in checkpoints.glob("checkpoint_*") if p.suffix in _CHECKPOINT_SUFFIXES or p.is_symlink()
            )
        foreign = [p for p in found if not self._owns(p)]
        if foreign:
            raise ValueError(
                f"{foreign[0]} was not written by tracin demo (it is not recorded in {self.path}, or it "
                "changed since), so the demo will not replace it; choose another output folder "
                "(-o / --output) or move it away"
            )
        for p in found:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
            self.entries.pop(self._key(p), None)
        self._save()

    def writing(self, paths: Iterable[Path]) -> None:
        """Records `paths` as the demo's before it writes them."""
        self.entries.update({self._key(p): None for p in paths})
        self._save()

    def written(self, path: Path) -> None:
        """Records the digest of the finished store or file at `path`."""
        self.entries[self._key(path)] = _digest(path)
        self._save()

    def _owns(self, path: Path) -> bool:
        key = self._key(path)
        if key not in self.entries or path.is_symlink():
            return False
        return self.entries[key] is None or self.entries[key] == _digest(path)

    def _key(self, path: Path) -> str:
        return Path(path).relative_to(self.out).as_posix()

    def _save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps({"files": self.entries}, indent=1, sort_keys=True))
        os.replace(temporary, self.path)


def _digest(path: Path) -> str | None:
    """SHA-256 of a store's manifest (a folder) or of a file; None if there is neither."""
    source = path / MANIFEST if path.is_dir() else path
    try:
        return hashlib.sha256(source.read_bytes()).hexdigest()
    except OSError:
        return None
