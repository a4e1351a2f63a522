"""The `tracin` command line: info, score, self-influence, bench, demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """examples:
  tracin demo                                   # the mislabelled-digits demo (pip install 'tracin[demo]')
  tracin info grads/train                       # what a gradient store holds
  tracin self-influence grads/train -o ranking.csv --top 100
  tracin score --test grads/test --train grads/train -k 10 --side both -o top10.npz
  tracin bench --quick                          # kernel benchmark (from a source checkout)
"""


class CommandError(Exception):
    """A problem the user can fix; printed without a traceback, exit code 1."""


def _open_store(path: str):
    from .store import GradientStore

    if not Path(path).exists():
        raise CommandError(f"no gradient store at {path}")
    return GradientStore.open(path)


def cmd_info(args: argparse.Namespace) -> None:
    from .store import GradientStore

    if not Path(args.path).exists():
        raise CommandError(f"no gradient store at {args.path}")
    print(GradientStore.open(args.path, allow_partial=True).describe())


def cmd_score(args: argparse.Namespace) -> None:
    import numpy as np

    import tracin

    out = Path(args.output)
    if out.suffix not in (".npz", ".csv"):
        raise CommandError(f"--output must end in .npz or .csv, got {out.name}")
    test, train = _open_store(args.test), _open_store(args.train)
    result = tracin.top_k(test, train, k=args.k, side=args.side, num_threads=args.threads,
                          progress=False if args.no_progress else None)
    sides = {"proponents": result} if args.side == "proponents" else \
        {"opponents": result} if args.side == "opponents" else result._asdict()
    if out.suffix == ".npz":
        arrays = {}
        for name, r in sides.items():
            arrays[f"{name}_values"], arrays[f"{name}_indices"] = r.values, r.indices
        np.savez(out, **arrays)
    else:
        _write_pairs_csv(out, sides, test_ids=_ids(test), train_ids=_ids(train))
    print(f"top-{args.k} {args.side} of {test.n_rows} test rows over {train.n_rows} train rows -> {out}")


def _ids(store):
    ids = getattr(store, "ids", None)
    return None if ids is None else list(ids)


def _write_pairs_csv(path: Path, sides: dict, test_ids, train_ids) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["test_row", "test_id", "side", "rank", "train_row", "train_id", "influence"])
        for name, r in sides.items():
            for t in range(r.indices.shape[0]):
                for rank, (i, v) in enumerate(zip(r.indices[t], r.values[t]), 1):
                    w.writerow([t, test_ids[t] if test_ids else t, name, rank, int(i),
                                train_ids[i] if train_ids else int(i), f"{v:.8g}"])


def cmd_self_influence(args: argparse.Namespace) -> None:
    import csv

    import numpy as np

    import tracin

    store = _open_store(args.path)
    scores = tracin.self_influence(store, num_threads=args.threads, progress=False if args.no_progress else None)
    order = np.argsort(-scores, kind="stable")[: args.top]
    ids = _ids(store)
    with open(args.output, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "train_row", "id", "self_influence"])
        for rank, i in enumerate(order, 1):
            w.writerow([rank, int(i), ids[i] if ids else int(i), f"{scores[i]:.8g}"])
    print(f"self-influence of {store.n_rows} rows, {len(order)} ranked -> {args.output}")


def cmd_bench(args: argparse.Namespace) -> None:
    if Path("benchmarks", "kernel.py").is_file() and "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        from benchmarks.kernel import main as bench_main
    except ImportError as e:
        raise CommandError(
            "the benchmark harness lives in the source checkout's benchmarks/ folder: run "
            "`tracin bench` from the repository root (with the bench extra installed)"
        ) from e
    bench_main(args.bench_args)


def cmd_demo(args: argparse.Namespace) -> None:
    try:
        from .demo import DemoConfig, run_demo
        from .demo.training import TrainingConfig
    except ImportError as e:
        raise CommandError(f"the demo needs the demo extra: pip install 'tracin[demo]' ({e})") from e
    training = TrainingConfig(epochs=args.epochs, checkpoints=args.checkpoints, seed=args.seed)
    config = DemoConfig(noise=args.noise, seed=args.seed, output=Path(args.output), training=training)
    run_demo(config, progress=not args.no_progress)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tracin", description="TracIn training-data influence: proponents, opponents, self-influence.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="describe a gradient store", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="gradient store directory")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("score", help="top-k proponents/opponents of test rows among train rows")
    p.add_argument("--test", required=True, help="test gradient store")
    p.add_argument("--train", required=True, help="train gradient store")
    p.add_argument("-k", type=positive_int, default=10, help="examples per test row (default 10)")
    p.add_argument("--side", choices=["proponents", "opponents", "both"], default="both")
    p.add_argument("-o", "--output", default="influence.npz", help="result file, .npz or .csv")
    p.add_argument("--threads", type=positive_int, default=None, help="kernel threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: one for long runs)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("self-influence", help="rank training rows by self-influence (mislabel search)")
    p.add_argument("path", help="train gradient store")
    p.add_argument("-o", "--output", default="self_influence.csv", help="CSV ranking, highest first")
    p.add_argument("--top", type=positive_int, default=None, help="keep only the first N rows of the ranking")
    p.add_argument("--threads", type=positive_int, default=None, help="kernel threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: one for long runs)")
    p.set_defaults(func=cmd_self_influence)

    p = sub.add_parser("bench", help="kernel benchmark against faiss / numpy / torch "
                       "(its own options follow: tracin bench --help)", add_help=False)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="find mislabelled digits with TracIn (needs tracin[demo])")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=0.2, help="fraction of training labels flipped")
    p.add_argument("--checkpoints", type=positive_int, default=5, help="checkpoints saved during training")
    p.add_argument("--epochs", type=positive_int, default=150)
    p.add_argument("-o", "--output", default="tracin-demo-output", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra  # benchmarks.kernel parses (and documents) its own options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except CommandError as e:
        print(f"tracin: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError) as e:
        print(f"tracin {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tracin: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
