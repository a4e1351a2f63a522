"""A writer SIGKILLed mid-run resumes from its last complete block; the data files are byte-identical
and the manifest differs only in the store's random id, which the resume keeps."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import tracin
from store_files import assert_same_store_files

N_ROWS, BLOCK, DIMS = 1000, 50, [64, 32]

# Writes every block (checkpoint by checkpoint, as the adapters do), skipping rows already done;
# reports each write on stdout. Data depend only on (checkpoint, start): reruns write the same bytes.
WRITER = textwrap.dedent(f"""
    import sys
    import numpy as np
    import tracin

    w = tracin.GradientStore.create(sys.argv[1], {N_ROWS}, {DIMS}, [0.5, 0.25], "bfloat16",
                                    metadata={{"run": "resume-test"}}, ids=np.arange({N_ROWS}) * 3)
    for c, d in enumerate({DIMS}):
        for start in range(w.rows_done(c), {N_ROWS}, {BLOCK}):
            rng = np.random.default_rng([c, start])
            w.write(c, start, rng.standard_normal(({BLOCK}, d)).astype(np.float32))
            print("wrote", c, start, flush=True)
    w.finalize()
    print("done", flush=True)
""")


def _run(path: Path) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", WRITER, str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=True,
    )
    return out.stdout.splitlines()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_killed_writer_resumes_and_the_store_is_byte_identical(tmp_path):
    reference = _run(tmp_path / "uninterrupted")
    assert len(reference) == 2 * N_ROWS // BLOCK + 1

    victim = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path / "killed")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    for _ in range(N_ROWS // BLOCK + 5):  # into checkpoint 1, then kill while it keeps writing
        assert victim.stdout.readline().startswith("wrote")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    victim.stdout.close()

    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    killed_id = manifest["id"]
    assert not manifest["complete"]
    assert manifest["checkpoints"][0]["written"] == [[0, N_ROWS]]
    done = manifest["checkpoints"][1]["written"][0][1]
    assert done % BLOCK == 0 and 5 * BLOCK <= done < N_ROWS
    with pytest.raises(ValueError, match="unfinished"):
        tracin.self_influence(tracin.GradientStore.open(tmp_path / "killed"))

    # A write cut short leaves garbage after the recorded rows: simulate the worst case.
    f = tmp_path / "killed" / "checkpoint_001.npy"
    header = len(f.read_bytes()) - N_ROWS * DIMS[1] * 2
    with open(f, "r+b") as fh:
        fh.seek(header + done * DIMS[1] * 2)
        fh.write(os.urandom(BLOCK * DIMS[1] * 2 + 7))

    resumed = _run(tmp_path / "killed")
    assert resumed[0] == f"wrote 1 {done}"  # nothing before the last complete block is redone
    assert len(resumed) == (N_ROWS - done) // BLOCK + 1
    killed, _ = assert_same_store_files(tmp_path / "killed", tmp_path / "uninterrupted")
    assert killed["id"] == killed_id
    store = tracin.GradientStore.open(tmp_path / "killed")
    assert store.complete and np.array_equal(store.ids, np.arange(N_ROWS) * 3)
