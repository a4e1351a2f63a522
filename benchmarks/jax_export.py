"""Export throughput (examples/s) of tracin.jax.export_gradients against PyTorch on the same MLP, CPU.

Peers, timed interleaved in the same run (median of repeats): a plain torch.func loop
(functional_call + vmap(grad), rows concatenated into NumPy) and, when installed, tracin.torch's
export_gradients. Every contender exports full float32 per-example gradients of all parameters for the
same weights and data, one checkpoint, same batch size; the JAX export is compiled during warm-up
(a later export with the same loss and batch size reuses the compilation).

    PYTHONPATH=src python benchmarks/jax_export.py [--n 4096] [--hidden 256] [--batch 256] [--repeats 5] [--out DIR]
    PYTHONPATH=src python benchmarks/jax_export.py --quick    # a smoke run (JSON in a new temporary folder)
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    add_output_options,
    add_size_options,
    description,
    output_dir,
    quick_or_given,
    record_name,
    require_modules,
    size_options,
    time_interleaved,
    write_json,
)

FULL = {"n": 4096, "features": 64, "hidden": 256, "classes": 10, "batch": 256, "repeats": 5}
AGREEMENT_TOL = 1e-5  # relative difference of tracin.jax's and torch.func's Gram matrices, checked before timing
QUICK = {**FULL, "n": 256, "hidden": 32, "batch": 64, "repeats": 1}  # --quick: a smoke run in seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.jax_export", description=description(__doc__))
    helps = {"n": "examples exported per call", "repeats": "timed rounds"}
    add_size_options(parser, FULL, QUICK, helps)
    add_output_options(parser, "small sizes, to check the script runs (a size given as a flag wins)")
    args = parser.parse_args(argv)
    require_modules(parser.prog, ("jax", "torch"), "bench,jax")
    quick_or_given(args, QUICK, FULL)
    out = output_dir(args.out, args.quick, "jax-export")

    import jax
    import jax.numpy as jnp
    import torch
    from torch.func import functional_call, grad, vmap

    import tracin.jax

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.n, args.features)).astype(np.float32)
    y = rng.integers(0, args.classes, args.n)
    model = torch.nn.Sequential(
        torch.nn.Linear(args.features, args.hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(args.hidden, args.hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(args.hidden, args.classes),
    )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = {
        f"l{i}": {
            "kernel": jnp.asarray(state[f"{2 * i}.weight"].numpy().T),
            "bias": jnp.asarray(state[f"{2 * i}.bias"].numpy()),
        }
        for i in range(3)
    }

    def jax_loss(p, inputs, targets):
        h = inputs
        for i in range(3):
            h = h @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"]
            h = jnp.tanh(h) if i < 2 else h
        return -jnp.take_along_axis(jax.nn.log_softmax(h), targets[:, None], axis=1)[:, 0]

    def run_jax():
        return tracin.jax.export_gradients(jax_loss, [(params, 1.0)], (x, y), batch_size=args.batch, progress=False)

    xt, yt = torch.as_tensor(x), torch.as_tensor(y)

    def torch_one(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_example = vmap(grad(torch_one), in_dims=(None, 0, 0))

    def run_torch_func():
        rows = []
        for s in range(0, args.n, args.batch):
            g = per_example(state, xt[s : s + args.batch], yt[s : s + args.batch])
            rows.append(torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], dim=1).numpy())
        return np.concatenate(rows)

    contenders = {"tracin.jax": run_jax, "torch.func loop": run_torch_func}
    try:
        import tracin.torch

        ce = torch.nn.CrossEntropyLoss(reduction="none")
        contenders["tracin.torch"] = lambda: tracin.torch.export_gradients(
            model, [(state, 1.0)], (xt, yt), ce, batch_size=args.batch, progress=False
        )
    except ImportError:
        pass

    # Same influence from both before timing (parameter order differs, inner products do not).
    ref = run_torch_func()[:64].astype(np.float64)
    gram_ref = ref @ ref.T
    gram_diffs = {}
    for name in (c for c in contenders if c != "torch.func loop"):  # every tracin contender, not only JAX
        ours = np.asarray(contenders[name]().matrices[0][:64], np.float64)
        gram_diffs[name] = float(np.abs(ours @ ours.T - gram_ref).max() / np.abs(gram_ref).max())
        if not gram_diffs[name] < AGREEMENT_TOL:  # a check that python -O keeps: never timed or recorded
            print(
                f"{parser.prog}: error: {name}'s gradients disagree with torch.func's: Gram matrices of the "
                f"first 64 rows differ by {gram_diffs[name]:.3g} (relative, max), above {AGREEMENT_TOL:g}; "
                "nothing timed",
                file=sys.stderr,
            )
            raise SystemExit(1)
    gram_diff = gram_diffs["tracin.jax"]
    timings = time_interleaved(contenders, repeats=args.repeats, warmup=1)
    results = {name: {**t, "examples_per_s": args.n / t["median_s"]} for name, t in timings.items()}
    base = results["tracin.jax"]["examples_per_s"]
    for name, r in results.items():
        r["jax_speedup"] = base / r["examples_per_s"]
        print(
            f"{name:16s} {r['median_s']:.3f} s  {r['examples_per_s']:10.0f} ex/s  (tracin.jax is "
            f"{r['jax_speedup']:.2f}x)"
        )
    d = sum(v.numel() for v in state.values())
    # other sizes than the recorded run's: a record of their own (jax_export_n64, ...), never jax_export.json
    path = write_json(
        record_name("jax_export", args.quick, size_options(args, QUICK, FULL)),
        {
            "config": {
                **{k: v for k, v in vars(args).items() if k != "out"},
                "params": d,
                "dtype": "float32",
                "jax": jax.__version__,
                "torch": torch.__version__,
            },
            "results": results,
            "influence_rel_diff_vs_torch_func": gram_diff,
        },
        out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
