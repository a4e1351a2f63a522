"""Every Python block of README.md runs as written, from an empty folder, as a reader would copy it (and
again in that folder if it wrote files there)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[tuple[int, str]]:
    """(line number, source) of each ```python block of README.md, except those right after a
    `<!-- not-run: reason -->` line (code for machines this one is not, such as a SLURM cluster)."""
    text = README.read_text()
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(2))
        for m in re.finditer(r"^(<!-- not-run: [^>]+ -->\n)?```python\n(.*?)^```", text, re.S | re.M)
        if not m.group(1)
    ]


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 4


@pytest.mark.parametrize("line, source", python_blocks(), ids=lambda x: f"line{x}" if isinstance(x, int) else "")
def test_readme_block_runs(tmp_path, line, source):
    """A block that leaves files behind (a store, checkpoints) runs a second time in the same folder,
    as a reader reruns a script: the Dask example's finished store refused a second write."""
    script = tmp_path / "block.py"
    script.write_text(source)
    for attempt in ("", " when run a second time in the same folder"):
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"README.md block at line {line} failed{attempt}:\n{done.stderr[-3000:]}"
        if [p.name for p in tmp_path.iterdir()] == ["block.py"]:
            break  # wrote nothing there: a second run would start as the first did


def test_readme_names_every_package_the_demo_needs():
    # it said the demo "needs only NumPy, scikit-learn and matplotlib", while `tracin demo` refuses to
    # start without threadpoolctl (and tqdm, unless --no-progress)
    from importlib.metadata import requires

    demo = [r for r in requires("tracin") or [] if re.search(r"""extra\s*==\s*["']demo["']""", r)]
    names = {re.match(r"[A-Za-z0-9._-]+", r).group(0).lower() for r in demo}
    assert {"scikit-learn", "matplotlib", "threadpoolctl", "tqdm"} <= names
    setup = " ".join(README.read_text().split("## What it computes")[0].split())
    needs = setup[setup.index("It needs") :].split(". ")[0]
    assert all(name in needs for name in names), (needs, names)
    assert "--no-progress` runs without tqdm" in needs
