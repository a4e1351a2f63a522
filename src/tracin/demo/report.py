"""The demo's report.md: what was done, what the numbers and figures mean, what to try next."""

from __future__ import annotations

import shlex
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from .recipe import RULE

if TYPE_CHECKING:
    from .run import DemoConfig, DemoResult

HOW_TO_READ = (
    "**How to read influence scores.** The influence of a training example on a test example is the sum, "
    "over the traced checkpoints, of the learning rate times the dot product of their loss gradients, the "
    "test example's loss taken at its true label. Positive (a *proponent*): training on that example "
    "lowered that loss, it pushed the model towards the test example's true label; negative (an "
    "*opponent*): it raised the loss, it pushed the model away from the true label (towards another "
    "digit, such as a wrong prediction). Larger magnitude means a stronger push; compare the scores of "
    "one test example with each other, as their scale varies from one test example to the next. "
    "*Self-influence* is an example's influence on itself (the learning-rate-weighted squared gradient "
    "norms): high when the model kept having to change to fit it, as for a wrong label."
)


NOTHING_FLIPPED = "No training labels were flipped: there are no wrong labels for the methods to find."


def counted(n: int, noun: str) -> str:
    """'1 epoch', '3 epochs' (nouns with a plain plural)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def all_checkpoints(n: int) -> str:
    """'all 3 checkpoints', or 'the one checkpoint'."""
    return "the one checkpoint" if n == 1 else f"all {n} checkpoints"


def summary_rows(result: DemoResult) -> list[str]:
    """The found-at-x%-inspected table of result.found, as Markdown rows."""
    fractions = list(next(iter(result.found.values())))
    header = "| method | " + " | ".join(f"found at {f:.0%} inspected" for f in fractions) + " |"
    rows = [header, "|---" * (len(fractions) + 1) + "|"]
    for name, by_fraction in result.found.items():
        rows.append(f"| {name} | " + " | ".join(f"{v:.1%}" for v in by_fraction.values()) + " |")
    return rows


def write_report(path: Path, result: DemoResult, config: DemoConfig) -> Path:
    """Writes report.md (Markdown, figures linked by relative path) and returns its path."""
    from .run import DIAGNOSED

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    epochs, checkpoints = config.training.epochs, config.training.checkpoints
    traced = result.checkpoint_epochs[: result.traced]
    which = (
        f"the first checkpoint (epoch {traced[0]}) was"
        if len(traced) == 1
        else f"the first {len(traced)} checkpoints (epochs {traced[0]} to {traced[-1]}) were"
    )
    fitted = (
        f" (it predicts the given wrong label for {result.flipped_fitted:.0%} of the flipped examples)"
        if result.n_flipped
        else ""
    )
    lines = [
        "# tracin demo: finding mislabelled digits",
        "",
        f"{result.n_flipped} of the {result.n_train} training labels ({result.flip_rate:.1%}) were flipped "
        f"to a wrong class. A two-layer MLP trained with {result.framework} for {counted(epochs, 'epoch')} on these "
        f"labels reached {result.train_accuracy_noisy:.1%} accuracy on them{fitted} and "
        f"{result.test_accuracy:.1%} on the correctly labelled test set.",
        "",
        "## Which checkpoints are traced",
        "",
        f"The recipe: {RULE}. It was chosen from the measurements of `benchmarks/quality` (the README's "
        "attribution quality table) and needs nothing but the training run: no labels known to be wrong.",
        "",
        f"Here {counted(checkpoints, 'checkpoint')} {'was' if checkpoints == 1 else 'were'} saved, after "
        f"{'epoch' if checkpoints == 1 else 'epochs'} {', '.join(map(str, result.checkpoint_epochs))}; "
        f"held-out accuracy was best after epoch {result.best_epoch}, so {which} traced. The reason "
        "(`tracin.demo.recipe`): once a model starts memorising the flipped labels, held-out accuracy falls, "
        "and the flipped examples, now fitted, no longer stand out in the later checkpoints' gradients.",
        "",
        "![held-out accuracy](held_out_accuracy.png)",
        "",
        f"The diagnostic below (`tracin.report.checkpoint_diagnostics`, which you can run on your own gradient "
        f"store) uses {all_checkpoints(checkpoints)}. Left: each checkpoint's share of the summed self-influence, "
        f"over the {DIAGNOSED:.0%} of the rows ranked highest and over all rows: checkpoints with a larger share "
        "among the top rows than among all rows are the ones that put those rows on top. Right: the fraction "
        "of the top rows that tracing only checkpoints 1..c shares with tracing all of them; where it is low, "
        "the later checkpoints reorder the ranking.",
        "",
        "![per-checkpoint diagnostics](checkpoint_diagnostics.png)",
        "",
        "## Finding the flipped labels",
        "",
        *(_detection(result, checkpoints) if result.n_flipped else [NOTHING_FLIPPED]),
        "",
        "## Proponents and opponents",
        "",
        HOW_TO_READ,
        "",
        f"Each row of the figure is a test digit: its true label, the prediction of the model at epoch "
        f"{traced[-1]} (the last checkpoint traced: the scores sum over the traced checkpoints up to it) "
        "and whether it was right, "
        f"and, where the final model (epoch {epochs}) predicts another label, that label. The rows are the "
        "first test digits, the last replaced by the first one that model gets wrong if it gets them all "
        "right. After each digit come its "
        "top proponents (green) and opponents (red) in the training set, each titled with "
        "its score and its given label, and, when that label was flipped, the true one. A digit whose "
        "given label differs from what it shows is often among the opponents: it taught the model "
        "another class for this shape.",
        "",
        "![proponents and opponents](proponents_opponents.png)",
        "",
        "## Files",
        "",
        "- `self_influence_ranking.csv`: every training example, highest self-influence first, with its "
        "given and true label (`digits_row` is its row in `sklearn.datasets.load_digits()`).",
        "- `grads/train`, `grads/test`: the per-example gradients at the traced checkpoints, as tracin gradient "
        "stores (`tracin.GradientStore.open(path)` in Python); `grads/train_all_checkpoints`: the training "
        "examples' gradients at every checkpoint, for the diagnostics.",
        "- `checkpoints/`: the model at each checkpoint.",
        "- `.tracin-demo.json`: the demo's record of the files and stores it wrote, so that a rerun "
        "into this folder replaces them and refuses to overwrite any others.",
        "",
        "## Next: the command line on these stores",
        "",
        "From any folder (the `cd` goes to the folder of this report):",
        "",
        "```",
        *report_commands(Path(config.output)),
        "```",
        "",
        f"Settings: `{settings}`; run time {result.seconds:.1f} s.",
        "",
    ]
    # the output folder's name as its bytes (surrogateescape): one undecodable in the file system's
    # encoding is written, and the commands quoted in the report name it exactly
    path.write_text("\n".join(lines), errors="surrogateescape")
    return path


def report_commands(out: Path) -> list[str]:
    """report.md's next commands: a `cd` to the output folder `out` (made absolute), then the commands
    on the stores by their paths inside it, so that they run from any folder, also from `out` itself
    (the console's lines, result.next_commands, name the stores as seen from where the demo ran)."""
    from .run import _next_commands

    return [f"cd {shlex.quote(str(out.resolve()))}", *_next_commands(Path())]


def _detection(result: DemoResult, checkpoints: int) -> list[str]:
    """The detection table, what it says and its figure, when some labels were flipped."""
    from .run import LOSS, PERFECT, RANDOM, TRACIN, TRACIN_ALL

    first = min(result.found[TRACIN])
    found = {name: result.found[name][first] for name in (TRACIN, TRACIN_ALL, LOSS, RANDOM, PERFECT)}

    return [
        "Every training example was scored by TracIn self-influence over the traced checkpoints "
        "and inspected from the highest score down. The table gives the fraction of the flipped labels found "
        "after inspecting a fraction of the training set:",
        "",
        *summary_rows(result),
        "",
        f"With {result.flip_rate:.1%} of the labels flipped, inspecting {first:.0%} of the training set can "
        f"find at most {found[PERFECT]:.1%} of them (the perfect detector: the flipped examples ranked first). "
        f"TracIn self-influence with the recipe found {found[TRACIN]:.1%} (over {all_checkpoints(checkpoints)} "
        f"{found[TRACIN_ALL]:.1%}), ranking by the final model's loss {found[LOSS]:.1%}, and inspecting at random "
        f"finds {found[RANDOM]:.1%} on average.",
        "",
        "![mislabel detection](mislabel_detection.png)",
    ]
