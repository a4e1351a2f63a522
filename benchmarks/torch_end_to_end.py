"""End-to-end TracIn on a real small task: sklearn digits, an MLP, three checkpoints.

The job: per-example gradients of train and test examples at every checkpoint, self-influence of
every training example, and the top-10 proponents and opponents of every test example.
Contenders, measured in the same run:
  tracin        tracin.torch.export_gradients + tracin.self_influence + tracin.top_k(side="both"),
                gradients in memory
  tracin_store  the same with store=: gradients written to a GradientStore (temporary directory)
                and scored from it in memory-mapped row chunks
  tracin_factored  the same with mode="factored": each Linear layer's per-example gradient kept as
                its two factors (exact; the MLP has only Linear parameters)
  plain   a plain torch.func (vmap(grad)) + NumPy script doing the same job
  captum  captum.influence.TracInCP (self_influence, influence(k=10) for both sides), on both of its
          gradient paths (a loop per example, and sample_wise_grads_per_batch=True); ratios use the faster
Reports median time, peak RSS (fresh process each) and agreement of the results (JSON), the time of
each stage of the full-mode job, and the floor no full-gradient method can beat: the m x n x C*d
product at the measured peak sgemm.

    PYTHONPATH=src:. python benchmarks/torch_end_to_end.py [--repeats 3] [--captum-train N] [--out DIR]
    PYTHONPATH=src:. python benchmarks/torch_end_to_end.py --quick   # a smoke run (JSON in a new temporary folder)

--quick keeps the first QUICK_TRAIN / QUICK_TEST examples of each split and times every contender
once, without warm-up or pauses.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    SETTLE_S,
    add_output_options,
    at_least,
    description,
    output_dir,
    peak_rss_of,
    peer_versions,
    record_name,
    require_modules,
    time_interleaved,
    write_json,
)

EXTRA_MODULES = ("torch", "sklearn", "captum")  # of pip install 'tracin[bench]'
if __name__ == "__main__":  # run as a script: a missing module is one line (before the imports below), no traceback
    require_modules("python -m benchmarks.torch_end_to_end", EXTRA_MODULES, "bench")

import torch  # noqa: E402
from torch import nn  # noqa: E402

LRS = (0.2, 0.05, 0.01)
QUICK_TRAIN, QUICK_TEST = 100, 20  # --quick: examples kept of each split
K = 10
HIDDEN = 128


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


def prepare(workdir: Path, n_train: int | None = None, n_test: int | None = None) -> None:
    """Digits split 80/20, standardised, the first `n_train` / `n_test` examples of each kept (None:
    all); the MLP trained with three learning rates, a checkpoint saved after each phase; everything
    written to workdir."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x.astype(np.float32), y, test_size=0.2, random_state=0)
    x_tr, y_tr, x_te, y_te = x_tr[:n_train], y_tr[:n_train], x_te[:n_test], y_te[:n_test]
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-3
    data = {
        "x_train": torch.from_numpy((x_tr - mean) / std),
        "y_train": torch.from_numpy(y_tr),
        "x_test": torch.from_numpy((x_te - mean) / std),
        "y_test": torch.from_numpy(y_te),
    }
    torch.save(data, workdir / "data.pt")
    model = make_model()
    loss = nn.CrossEntropyLoss()
    for c, lr in enumerate(LRS):
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        for _ in range(3):  # epochs per phase
            for idx in torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(c)).split(64):
                opt.zero_grad()
                loss(model(data["x_train"][idx]), data["y_train"][idx]).backward()
                opt.step()
        torch.save(model.state_dict(), workdir / f"ckpt{c}.pt")


def _load(workdir: Path):
    data = torch.load(workdir / "data.pt", weights_only=True)
    return data, [(str(workdir / f"ckpt{c}.pt"), lr) for c, lr in enumerate(LRS)]


def run_tracin(workdir: Path, n_train: int | None = None, mode: str = "full") -> dict:
    import tracin
    from tracin.torch import export_gradients

    data, checkpoints = _load(workdir)
    model, loss = make_model(), nn.CrossEntropyLoss(reduction="none")
    train = (data["x_train"][:n_train], data["y_train"][:n_train])
    g_train = export_gradients(model, checkpoints, train, loss, mode=mode, progress=False)
    g_test = export_gradients(model, checkpoints, (data["x_test"], data["y_test"]), loss, mode=mode, progress=False)
    both = tracin.top_k(g_test, g_train, k=K, side="both")
    return {
        "self": tracin.self_influence(g_train),
        "pro": (both.proponents.indices, both.proponents.values),
        "opp": (both.opponents.indices, both.opponents.values),
    }


def run_tracin_factored(workdir: Path, n_train: int | None = None) -> dict:
    """The same scores from mode="factored": each Linear layer's gradient as its two factors."""
    return run_tracin(workdir, n_train, mode="factored")


def run_tracin_store(workdir: Path, n_train: int | None = None) -> dict:
    import tracin
    from tracin.torch import export_gradients

    data, checkpoints = _load(workdir)
    model, loss = make_model(), nn.CrossEntropyLoss(reduction="none")
    train = (data["x_train"][:n_train], data["y_train"][:n_train])
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        g_train = export_gradients(model, checkpoints, train, loss, progress=False, store=Path(tmp) / "train")
        g_test = export_gradients(
            model, checkpoints, (data["x_test"], data["y_test"]), loss, progress=False, store=Path(tmp) / "test"
        )
        both = tracin.top_k(g_test, g_train, k=K, side="both")
        return {
            "self": tracin.self_influence(g_train),
            "pro": (both.proponents.indices, both.proponents.values),
            "opp": (both.opponents.indices, both.opponents.values),
        }


def tracin_stages(workdir: Path, repeats: int = 3, pause_s: float = SETTLE_S) -> dict:
    """Median seconds of each stage of the full-mode tracin job (export train, export test,
    top-10 both sides, self-influence): where the time goes."""
    import tracin
    from tracin.torch import export_gradients

    data, checkpoints = _load(workdir)
    model, loss = make_model(), nn.CrossEntropyLoss(reduction="none")
    stages: dict[str, list[float]] = {"export_train": [], "export_test": [], "top_k_both": [], "self_influence": []}
    for _ in range(repeats):
        marks = [time.perf_counter()]
        g_train = export_gradients(model, checkpoints, (data["x_train"], data["y_train"]), loss, progress=False)
        marks.append(time.perf_counter())
        g_test = export_gradients(model, checkpoints, (data["x_test"], data["y_test"]), loss, progress=False)
        marks.append(time.perf_counter())
        tracin.top_k(g_test, g_train, k=K, side="both")
        marks.append(time.perf_counter())
        tracin.self_influence(g_train)
        marks.append(time.perf_counter())
        for name, a, b in zip(stages, marks[:-1], marks[1:], strict=True):
            stages[name].append(b - a)
        del g_train, g_test
        time.sleep(pause_s)
    return {name: float(np.median(t)) for name, t in stages.items()}


def full_mode_floor(n_train: int, n_test: int, dims: int, captum_s: float, plain_s: float) -> dict:
    """The product every full-gradient method must compute (m x n dot products of C * d terms)
    at the machine's measured peak sgemm: no full-mode tracin can beat a peer by more than the
    peer's time over this floor."""
    from benchmarks.roofline import peak_sgemm_gflops

    flops = 2.0 * n_test * n_train * dims * len(LRS)
    threads = torch.get_num_threads()
    peak = peak_sgemm_gflops([threads])[threads]
    floor = flops / (peak * 1e9)
    return {
        "gflop": flops / 1e9,
        "peak_sgemm_gflops": peak,
        "floor_s": floor,
        "max_speedup_vs_captum": captum_s / floor,
        "max_speedup_vs_plain": plain_s / floor,
    }


def run_plain(workdir: Path, n_train: int | None = None, batch: int = 256) -> dict:
    """What one writes by hand: vmap(grad) per checkpoint, NumPy for the scores."""
    from torch.func import functional_call, grad, vmap

    data, checkpoints = _load(workdir)
    model, loss = make_model().eval(), nn.CrossEntropyLoss(reduction="none")

    def loss_one(params, x, y):
        return loss(functional_call(model, params, (x[None],)), y[None]).sum()

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def grads(params, x, y):
        out = []
        for i in range(0, len(x), batch):
            g = per_example(params, x[i : i + batch], y[i : i + batch])
            out.append(torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], 1))
        return torch.cat(out).numpy()

    x_tr, y_tr = data["x_train"][:n_train], data["y_train"][:n_train]
    scores = np.zeros((len(data["y_test"]), len(y_tr)), np.float32)
    self_inf = np.zeros(len(y_tr), np.float32)
    for path, lr in checkpoints:
        params = torch.load(path, weights_only=True)
        g_tr = grads(params, x_tr, y_tr)
        g_te = grads(params, data["x_test"], data["y_test"])
        scores += lr * (g_te @ g_tr.T)
        self_inf += lr * np.einsum("ij,ij->i", g_tr, g_tr)
    rows = np.arange(len(scores))[:, None]
    pro = np.argpartition(-scores, K, axis=1)[:, :K]
    pro = pro[rows, np.argsort(-scores[rows, pro], axis=1, kind="stable")]
    opp = np.argpartition(scores, K, axis=1)[:, :K]
    opp = opp[rows, np.argsort(scores[rows, opp], axis=1, kind="stable")]
    return {"self": self_inf, "pro": (pro, scores[rows, pro]), "opp": (opp, scores[rows, opp])}


def run_captum(workdir: Path, n_train: int | None = None, sample_wise: bool = False) -> dict:
    """Captum TracInCP; sample_wise=True: its batched per-example gradients (sample_wise_grads_per_batch,
    which needs a summed loss; the MLP has only Linear layers, which it supports), else its loop per example."""
    from captum.influence import TracInCP
    from torch.utils.data import DataLoader, TensorDataset

    data, checkpoints = _load(workdir)
    model = make_model().eval()
    rates = dict(checkpoints)

    def load(m: nn.Module, path: str) -> float:
        m.load_state_dict(torch.load(path, weights_only=True))
        return rates[path]

    train = TensorDataset(data["x_train"][:n_train], data["y_train"][:n_train])
    tracin_cp = TracInCP(
        model,
        DataLoader(train, batch_size=256),
        [p for p, _ in checkpoints],
        checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="sum" if sample_wise else "none"),
        batch_size=256,
        sample_wise_grads_per_batch=sample_wise,
    )
    test = (data["x_test"], data["y_test"])
    pro = tracin_cp.influence(test, k=K, proponents=True)
    opp = tracin_cp.influence(test, k=K, proponents=False)
    return {
        "self": tracin_cp.self_influence().numpy(),
        "pro": (pro[0].numpy(), pro[1].numpy()),
        "opp": (opp[0].numpy(), opp[1].numpy()),
    }


def run_captum_batched(workdir: Path, n_train: int | None = None) -> dict:
    """Captum TracInCP on its faster path (sample_wise_grads_per_batch=True)."""
    return run_captum(workdir, n_train, sample_wise=True)


AGREEMENT_TOL = 1e-5  # largest value / self-influence difference, relative to the reference's largest


def require_agreement(prog: str, name: str, found: dict) -> None:
    """Ends the program (exit 1, nothing written) unless an agreement() record shows the same top-k sets on
    every row of both sides and values and self-influence within AGREEMENT_TOL: a wrong result is never
    recorded beside its time."""
    sides = [found[s] for s in ("pro", "opp")]
    ok = all(s["same_sets_fraction"] == 1.0 and s["max_abs_value_diff_over_scale"] <= AGREEMENT_TOL for s in sides)
    if not (ok and found["self_max_abs_diff_over_scale"] <= AGREEMENT_TOL):
        print(f"{prog}: error: {name} disagree: {found}; nothing written", file=sys.stderr)
        raise SystemExit(1)


def agreement(ours: dict, theirs: dict) -> dict:
    """How closely two results agree: top-k index sets and values, self-influence."""
    out = {}
    for side in ("pro", "opp"):
        (ia, va), (ib, vb) = ours[side], theirs[side]
        scale = float(np.abs(vb).max())
        out[side] = {
            "same_indices_fraction": float(np.mean(ia == ib)),
            "same_sets_fraction": float(np.mean([set(a) == set(b) for a, b in zip(ia, ib, strict=True)])),
            "max_abs_value_diff_over_scale": float(np.abs(va - vb).max() / scale),
        }
    sa, sb = ours["self"], theirs["self"]
    out["self_max_abs_diff_over_scale"] = float(np.abs(sa - sb).max() / np.abs(sb).max())
    return out


def _child(fn: str, workdir: Path, n_train: int | None) -> str:
    return (
        f"import sys; sys.path[:0] = [{str(ROOT / 'src')!r}, {str(ROOT)!r}]\n"
        f"from pathlib import Path\nfrom benchmarks.torch_end_to_end import {fn}\n"
        f"{fn}(Path({str(workdir)!r}), {n_train!r})"
    )


def _keeping(last: dict[str, dict], contenders: dict[str, Callable[[], dict]]) -> dict[str, Callable[[], None]]:
    """The contenders, each keeping its latest result in last[name]."""

    def keep(name: str, fn: Callable[[], dict]) -> Callable[[], None]:
        def run() -> None:
            last[name] = fn()

        return run

    return {name: keep(name, fn) for name, fn in contenders.items()}


def record_of(args: argparse.Namespace) -> str:
    """The record's name: torch_end_to_end (_quick with --quick), and _captum-trainN for a Captum comparison
    on other train examples than the recorded run's (all of them), so that it never overwrites the record."""
    return record_name("torch_end_to_end", args.quick, [(args.captum_train, None, f"captum-train{args.captum_train}")])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torch_end_to_end", description=description(__doc__))
    parser.add_argument("--repeats", type=at_least(1), default=3, help="timed rounds of tracin and plain")
    parser.add_argument(
        "--captum-train",
        type=at_least(1),
        default=None,
        help="train examples for the Captum comparison (default: all 1437; Captum is slow)",
    )
    add_output_options(parser, f"the first {QUICK_TRAIN} / {QUICK_TEST} examples, one timed call each: a smoke run")
    args = parser.parse_args(argv)
    require_modules(parser.prog, EXTRA_MODULES, "bench")  # before the tracin phase, not after it
    out = output_dir(args.out, args.quick, "torch-end-to-end")
    repeats, warmup, pause_s = (1, 0, 0.0) if args.quick else (args.repeats, 1, 0.25)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        prepare(workdir, *((QUICK_TRAIN, QUICK_TEST) if args.quick else (None, None)))
        data, _ = _load(workdir)
        n_train, n_test = len(data["y_train"]), len(data["y_test"])
        dims = sum(p.numel() for p in make_model().parameters())

        # The full task: tracin against the plain script.
        # The results of each contender's last timed call are compared (the runs are deterministic).
        last: dict[str, dict] = {}
        timing = time_interleaved(
            _keeping(
                last,
                {
                    "tracin": lambda: run_tracin(workdir),
                    "plain": lambda: run_plain(workdir),
                    "tracin_store": lambda: run_tracin_store(workdir),
                    "tracin_factored": lambda: run_tracin_factored(workdir),
                },
            ),
            repeats=repeats,
            warmup=warmup,
            pause_s=pause_s,
        )
        vs_plain = agreement(last["tracin"], last["plain"])
        store_vs_plain = agreement(last["tracin_store"], last["plain"])
        factored_vs_plain = agreement(last["tracin_factored"], last["plain"])
        memory = {
            name: peak_rss_of(_child(fn, workdir, None))[0]
            for name, fn in (
                ("tracin", "run_tracin"),
                ("plain", "run_plain"),
                ("tracin_store", "run_tracin_store"),
                ("tracin_factored", "run_tracin_factored"),
            )
        }

        # Captum on the same task (or the first --captum-train examples), timed once beside tracin.
        nc = args.captum_train
        last = {}
        captum_timing = time_interleaved(
            _keeping(
                last,
                {
                    "tracin": lambda: run_tracin(workdir, nc),
                    "tracin_factored": lambda: run_tracin_factored(workdir, nc),
                    "captum": lambda: run_captum(workdir, nc),
                    "captum_batched": lambda: run_captum_batched(workdir, nc),
                },
            ),
            repeats=1 if args.quick else 3,
            warmup=0,
            pause_s=pause_s,
        )
        vs_captum = agreement(last["tracin"], last["captum"])
        factored_vs_captum = agreement(last["tracin_factored"], last["captum"])
        batched_vs_captum = agreement(last["captum_batched"], last["captum"])
        for label, found in (
            ("tracin and the plain script", vs_plain),
            ("tracin_store and the plain script", store_vs_plain),
            ("tracin_factored and the plain script", factored_vs_plain),
            ("tracin and Captum", vs_captum),
            ("tracin_factored and Captum", factored_vs_captum),
            ("Captum's two paths", batched_vs_captum),
        ):
            require_agreement(parser.prog, label, found)
        # Captum's faster path is the peer (as faiss's faster path is in the kernel benchmark)
        captum_best = min(("captum", "captum_batched"), key=lambda k: captum_timing[k]["median_s"])
        captum_memory = peak_rss_of(_child(f"run_{captum_best}", workdir, nc))[0]
        stages = tracin_stages(workdir, *((1, 0.0) if args.quick else (3, SETTLE_S)))
        floor = full_mode_floor(
            nc or n_train, n_test, dims, captum_timing[captum_best]["median_s"], timing["plain"]["median_s"]
        )

    payload = {
        "quick": args.quick,
        "versions": peer_versions(("torch", "captum", "scikit-learn")),
        "task": {
            "dataset": "sklearn digits",
            "n_train": n_train,
            "n_test": n_test,
            "k": K,
            "model": f"MLP 64-{HIDDEN}-{HIDDEN}-10",
            "parameters": dims,
            "checkpoints": len(LRS),
            "learning_rates": list(LRS),
            "torch_threads": torch.get_num_threads(),
            "captum_n_train": nc or n_train,
        },
        "time_s": {
            "tracin": timing["tracin"],
            "plain": timing["plain"],
            "tracin_store": timing["tracin_store"],
            "tracin_factored": timing["tracin_factored"],
            "tracin_captum_task": captum_timing["tracin"],
            "tracin_factored_captum_task": captum_timing["tracin_factored"],
            "captum": captum_timing["captum"],
            "captum_batched": captum_timing["captum_batched"],
        },
        "captum_path_compared": captum_best,
        "peak_rss_mib": {**memory, "captum": captum_memory},
        "speedup": {
            "vs_plain": timing["plain"]["median_s"] / timing["tracin"]["median_s"],
            "store_vs_plain": timing["plain"]["median_s"] / timing["tracin_store"]["median_s"],
            "factored_vs_plain": timing["plain"]["median_s"] / timing["tracin_factored"]["median_s"],
            "vs_captum": captum_timing[captum_best]["median_s"] / captum_timing["tracin"]["median_s"],
            "factored_vs_captum": captum_timing[captum_best]["median_s"] / captum_timing["tracin_factored"]["median_s"],
        },
        "tracin_full_stages_s": stages,
        "full_mode_floor": floor,
        "agreement": {
            "vs_plain": vs_plain,
            "store_vs_plain": store_vs_plain,
            "factored_vs_plain": factored_vs_plain,
            "vs_captum": vs_captum,
            "factored_vs_captum": factored_vs_captum,
            "captum_batched_vs_captum": batched_vs_captum,
        },
    }
    path = write_json(record_of(args), payload, out)
    print(f"wrote {path}")
    for key in ("time_s", "peak_rss_mib", "speedup", "tracin_full_stages_s", "full_mode_floor"):
        print(key, {k: (v["median_s"] if isinstance(v, dict) else v) for k, v in payload[key].items()})
    print("agreement", payload["agreement"])


if __name__ == "__main__":
    main()
