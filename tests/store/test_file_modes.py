"""Store files (data, ids, manifest, a range writer's lock and progress files) get the umask's mode, as
open() gives new files: a group-shared folder's umask 002 lets the group resume a store (review258 F1)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

# in a process of its own: setting the umask here would race with other threads' files
MODES = r"""
import os, stat, sys
from pathlib import Path
os.umask(int(sys.argv[2], 8))
sys.path.insert(0, sys.argv[3])
import tracin
from store.ranges_task import N_ROWS, SPEC, write_missing
path = Path(sys.argv[1])
tracin.GradientStore.create(path, **SPEC).close()
modes = {}
with tracin.GradientStore.create(path, **SPEC, rows=(0, N_ROWS // 2)) as w:
    write_missing(w, 0, N_ROWS // 2)
    modes.update((p.name, stat.S_IMODE(p.stat().st_mode)) for p in path.iterdir())
w = tracin.GradientStore.create(path, **SPEC)
write_missing(w, N_ROWS // 2, N_ROWS)
w.finalize()
modes.update((p.name, stat.S_IMODE(p.stat().st_mode)) for p in path.iterdir())
print(repr(modes))
"""


def _modes(path: Path, umask: int) -> dict[str, int]:
    tests = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", MODES, str(path), oct(umask), str(tests)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout)  # the dict of names and modes MODES printed


def test_store_files_get_the_umask_mode(tmp_path):
    for umask in (0o002, 0o077):
        modes = _modes(tmp_path / f"store-{umask:o}", umask)
        files = {name for name in modes if name.endswith((".npy", ".json", ".lock"))}
        assert {"manifest.json", "checkpoint_000.npy", "checkpoint_001.npy", "ids.npy"} <= files
        assert any(name not in {"manifest.json", "ids.npy"} and not name.startswith("checkpoint_") for name in files)
        assert {name: modes[name] for name in files} == {name: 0o666 & ~umask for name in files}
