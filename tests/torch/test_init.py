"""Importing tracin.torch where torch is not installed names the extra to install."""

import subprocess
import sys


def test_a_missing_torch_names_the_extra_to_install():
    hide = "import sys; sys.modules['torch'] = None; import tracin.torch"  # what an uninstalled package raises
    run = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: tracin.torch needs "), last
    assert "pip install 'tracin[torch]'" in last
