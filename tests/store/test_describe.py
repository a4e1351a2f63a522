"""describe() / `tracin info`: checkpoints of a factored store counted as checkpoints x layers, ids
explained, range writers' files shown."""

from __future__ import annotations

import numpy as np
import pytest

import tracin
from tracin.cli import main
from tracin.store import describe

from .helpers import random_blocks, write_store


def _line(text: str, key: str) -> str:
    (found,) = [line for line in text.splitlines() if line.startswith(key + " ")]
    return found


def test_a_torch_factored_store_shows_checkpoints_times_layers(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from tracin.torch import export_gradients

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    later = {k: v + 0.1 for k, v in model.state_dict().items()}
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    store = export_gradients(
        model,
        [(model.state_dict(), 0.1), (later, 0.05)],
        (x, y),
        torch.nn.CrossEntropyLoss(reduction="none"),
        mode="factored",
        store=tmp_path / "s",
        progress=False,
    )
    assert store.n_checkpoints == 4 and len(store.metadata["fingerprints"]["checkpoints"]) == 2
    text = describe(tmp_path / "s")
    assert _line(text, "checkpoints") == "checkpoints     2 x 2 layers  (4 factor pairs; weights 0.1, 0.05)"
    # layer 0: left dL/d(output) (5), right input + 1 (5); layer 1: 3 and 6
    assert _line(text, "dims") == "dims            [5, 5], [3, 6] (each checkpoint's layers)"
    assert _line(text, "ids") == "ids             no (rows are named by their index 0..6)"
    assert main(["info", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.strip() == text


def _factored_store(path, dims, weights, digests):
    """A finished factored store with metadata["fingerprints"]["checkpoints"] = `digests`."""
    blocks = random_blocks(3, dims, "float32", True)
    return write_store(path, blocks, weights, factored=True, metadata={"fingerprints": {"checkpoints": digests}})


@pytest.mark.parametrize(
    "dims, weights, digests, checkpoints, dims_line",
    [
        # layers sharing their checkpoint's weight, dims repeating: one of each per checkpoint
        (
            [(2, 3), (4, 1)] * 3,
            [0.5, 0.5, 0.2, 0.2, 0.1, 0.1],
            ["a", "b", "c"],
            "3 x 2 layers  (6 factor pairs; weights 0.5, 0.2, 0.1)",
            "[2, 3], [4, 1] (each checkpoint's layers)",
        ),
        # weights differing within a checkpoint, dims changing: every slot
        (
            [(2, 3), (4, 1), (2, 3), (4, 2)],
            [0.5, 0.4, 0.2, 0.2],
            ["a", "b"],
            "2 x 2 layers  (4 factor pairs; weights 0.5, 0.4, 0.2, 0.2)",
            "[2, 3], [4, 1], [2, 3], [4, 2]",
        ),
        # only the first checkpoint's layers share a weight: every slot's weight, not one per checkpoint
        (
            [(2, 3), (4, 1)] * 2,
            [0.5, 0.5, 0.2, 0.1],
            ["a", "b"],
            "2 x 2 layers  (4 factor pairs; weights 0.5, 0.5, 0.2, 0.1)",
            "[2, 3], [4, 1] (each checkpoint's layers)",
        ),
        # fingerprints that do not divide the slots, or none: plain checkpoints
        ([(2, 3)] * 3, [1.0, 2.0, 3.0], ["a", "b"], "3  (weights 1, 2, 3)", "[2, 3], [2, 3], [2, 3]"),
        ([(2, 3)] * 2, [1.0, 2.0], "not a list", "2  (weights 1, 2)", "[2, 3], [2, 3]"),
    ],
)
def test_checkpoints_and_dims_lines(tmp_path, dims, weights, digests, checkpoints, dims_line):
    _factored_store(tmp_path / "s", dims, weights, digests)
    text = describe(tmp_path / "s")
    assert _line(text, "checkpoints") == "checkpoints     " + checkpoints
    assert _line(text, "dims") == "dims            " + dims_line


def test_a_full_store_with_one_fingerprint_per_slot_stays_plain(tmp_path):
    write_store(
        tmp_path / "s",
        random_blocks(4, [3, 3], "float32", False),
        [1.0, 1.0],
        metadata={"fingerprints": {"checkpoints": ["a"]}},
    )
    assert _line(describe(tmp_path / "s"), "checkpoints") == "checkpoints     2  (weights 1, 1)"


def test_ids_are_explained(tmp_path):
    write_store(tmp_path / "with", random_blocks(4, [3], "float32", False), ids=["a", "b", "c", "d"])
    write_store(tmp_path / "without", random_blocks(4, [3], "float32", False))
    assert _line(describe(tmp_path / "with"), "ids") == "ids             yes (ids.npy)"
    assert _line(describe(tmp_path / "without"), "ids") == "ids             no (rows are named by their index 0..3)"


def test_range_writers_files_are_shown_until_merged(tmp_path):
    tracin.GradientStore.create(tmp_path / "s", 10, [2]).close()
    with tracin.GradientStore.create(tmp_path / "s", 10, [2], rows=(4, 10)) as w:
        w.write(0, 4, np.ones((6, 2), np.float32))
        text = describe(tmp_path / "s")  # a reader while the range writer works
    assert "complete        no (rows recorded per checkpoint: 0)" in text
    assert _line(text, "range writers").startswith("range writers   1 with files (rows [4, 10)); their progress")
    tracin.GradientStore.create(tmp_path / "s", 10, [2]).close()  # merged
    text = describe(tmp_path / "s")
    assert "range writers" not in text
    assert _line(text, "complete") == "complete        no (rows recorded per checkpoint: 6)"  # rows [4, 10)


def test_an_unfinished_factored_stores_counts_are_said_per_factor_pair(tmp_path):
    # review1 F6: 1 checkpoint x 2 layers said "rows recorded per checkpoint: 60, 30", two counts for one checkpoint
    meta = {"framework": "numpy", "mode": "factored", "fingerprints": {"checkpoints": ["a" * 32]}}
    w = tracin.GradientStore.create(
        tmp_path / "s", n_rows=100, dims=[(4, 3), (2, 5)], weights=[0.1, 0.1], factored=True, metadata=meta
    )
    for slot, (rows, dims) in enumerate(((60, (4, 3)), (30, (2, 5)))):
        w.write(slot, 0, tuple(np.ones((rows, d), np.float32) for d in dims))
    w.close()
    text = describe(tmp_path / "s")
    said = "no (rows recorded per factor pair (2 layers per checkpoint): 60, 30)"
    assert _line(text, "complete") == f"complete        {said}"
    assert _line(text, "checkpoints").startswith("checkpoints     1 x 2 layers")


HOSTILE = ["\x1b[31mred\x1b[0m\x1b]0;title\x07", "line\nbreak", "bidi\u202eflipped", "tab\there"]


def test_metadata_keys_and_the_path_are_shown_with_control_characters_escaped(tmp_path, capsys):
    path = tmp_path / "s\x1b[2J"  # a folder unpacked from elsewhere may be named so too
    w = tracin.GradientStore.create(path, 2, [2], metadata={**dict.fromkeys(HOSTILE, 1), "layers": 1, "é中": 2})
    w.write(0, 0, np.ones((2, 2), np.float32))
    w.finalize()
    for text in (describe(path), main(["info", str(path)]) == 0 and capsys.readouterr().out):
        lines = text.splitlines()
        assert all(line.isprintable() for line in lines), lines  # no ESC, BEL, newline in a line, bidi override
        assert len(lines) == 10  # the newline in a key makes no line of its own
        assert _line(text, "metadata") == (
            r"metadata        '\x1b[31mred\x1b[0m\x1b]0;title\x07', 'bidi\u202eflipped', layers, 'line\nbreak', "
            r"'tab\there', é中"
        )
        assert _line(text, "gradient store").startswith(f"gradient store  {tmp_path}/s\\x1b[2J  (format v")


def test_printable_text_of_any_script_is_shown_as_it_is(tmp_path):
    """Only what could drive or garble a terminal is escaped: an ideographic space, a zero-width joiner
    inside an emoji, a soft hyphen and private-use characters are text (Python calls them unprintable)."""
    keys = ["日本語\u3000全角", "👨\u200d👩\u200d👧", "soft\u00adhyphen", "\ue000private", "C1\x9bcsi", "sep\u2028line"]
    w = tracin.GradientStore.create(tmp_path / "s", 2, [2], metadata=dict.fromkeys(keys, 1))
    w.write(0, 0, np.ones((2, 2), np.float32))
    w.finalize()
    shown = _line(describe(tmp_path / "s"), "metadata").removeprefix("metadata        ")
    assert shown.split(", ") == [k if k in keys[:4] else repr(k) for k in sorted(keys)]


def test_many_or_huge_metadata_keys_and_many_range_files_are_listed_cut(tmp_path):
    """review150 F3: a 20 MB key, 300000 keys or 50000 stale range files printed lines of megabytes."""
    path = tmp_path / "s"
    long_key, unsafe_key = "a" * 100_000, "b\x1b" + "c" * 200
    keys = [long_key, unsafe_key] + [f"key{i:02d}" for i in range(30)]
    tracin.GradientStore.create(path, 100, [2], metadata=dict.fromkeys(keys, 1)).close()
    for i in range(25):  # what 25 range writers killed before their first block leave
        (path / f"rows-{2 * i}-{2 * i + 1}.lock").touch()
    text = describe(path)
    shown = ["a" * 80 + "...", r"'b\x1bccc" + "c" * 71 + "...", *(f"key{i:02d}" for i in range(18))]
    assert _line(text, "metadata") == f"metadata        {', '.join(shown)}, ... and 12 more"
    spans = ", ".join(f"[{2 * i}, {2 * i + 1})" for i in range(20))
    assert _line(text, "range writers").startswith(
        f"range writers   25 with files (rows {spans}, ... and 5 more); their"
    )
    assert len(text) < 3000


def test_the_weights_dims_and_counts_of_many_checkpoints_are_listed_cut(tmp_path):
    weights = [(c + 1) / 4 for c in range(25)]
    w = tracin.GradientStore.create(tmp_path / "s", 3, [c + 1 for c in range(25)], weights)
    w.write(0, 0, np.ones((2, 1), np.float32))
    w.close()
    text = describe(tmp_path / "s")
    assert _line(text, "checkpoints") == (
        f"checkpoints     25  (weights {', '.join(str(x).removesuffix('.0') for x in weights[:20])}, ... and 5 more)"
    )
    assert _line(text, "dims") == f"dims            {', '.join(str(c + 1) for c in range(20))}, ... and 5 more"
    assert (
        _line(text, "complete") == f"complete        no (rows recorded per checkpoint: 2{', 0' * 19}, ... and 5 more)"
    )
