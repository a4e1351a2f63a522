"""How fast can any batched per-example export of GPT-2 be on this CPU, even with torch.compile? The goal
is >= 5x the per-example loop at 64 sequences of 128 tokens; this puts the loop beside the least
work a batched method does (one forward and backward pass of the batch's summed losses down to the
input embeddings, no parameter gradient at all), run eagerly and compiled with torch.compile (fused
elementwise kernels). A bare pass is an upper bound on the speed of an export that must also form the
per-example gradients, so "compiled_pass_vs_loop" below 5 means no batched export, compiled or not,
reaches the goal here.

Same model, data and loss as benchmarks/transformer_export.py (GPT-2 from a config, right-padded
sequences); timed interleaved, median of repeats; the compile time is reported apart. Before timing, each
pass's input gradient, and the sum of the loop's rows, are checked once against float64 eager autograd
(above AGREEMENT_TOL: exit 1, nothing timed or written).

    python -m benchmarks.compiled_ceiling [--n 64] [--tokens 128] [--threads 2] [--repeats 7] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    add_output_options,
    add_size_options,
    check_agreement,
    description,
    output_dir,
    quick_or_given,
    record_name,
    require_modules,
    size_options,
    time_interleaved,
    write_json,
)
from benchmarks.transformer_export import GOAL_SPEEDUP, _cases, per_example_loop  # noqa: E402

PROG = "python -m benchmarks.compiled_ceiling"
AGREEMENT_TOL = 1e-4  # largest |result - float64 eager's| / max |float64 eager's| of a contender, before timing
# the recorded run (results/compiled_ceiling.json): 2 torch threads
FULL = {"n": 64, "tokens": 128, "width": 64, "layers": 2, "vocab": 512, "threads": 2, "repeats": 7}
QUICK = {"n": 4, "tokens": 16, "width": 32, "layers": 1, "vocab": 64, "threads": 1, "repeats": 1}  # --quick


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=description(__doc__))
    helps = {
        "n": "sequences",
        "tokens": "sequence length (before padding)",
        "width": "hidden size",
        "layers": "transformer blocks",
        "vocab": "vocabulary size",
        "threads": "torch intra-op threads",
        "repeats": "timed rounds",
    }
    add_size_options(parser, FULL, QUICK, helps)
    add_output_options(parser, "toy sizes, one timed round (a size given as a flag wins)")
    args = parser.parse_args(argv)
    require_modules(parser.prog, ("torch", "transformers"), "bench")
    quick_or_given(args, QUICK, FULL)  # with --quick torch.compile still compiles: most of the run's time

    import torch

    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()
    model, loss_fn, inputs, targets, embedding = _cases(args, args.n, args.tokens)["gpt2"]
    loop = per_example_loop(copy.deepcopy(model), loss_fn, inputs, targets)  # parameter gradients
    for p in model.parameters():  # the passes take none (a compiled backward would form them all)
        p.requires_grad_(False)
    compiled = torch.compile(model)

    def bare_pass(run_model, embed=embedding):
        def run() -> torch.Tensor:
            embeds = embed(inputs["input_ids"]).detach().requires_grad_(True)
            with torch.enable_grad():
                out = run_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
                return torch.autograd.grad(loss_fn(out, targets).sum(), embeds)[0]

        return run

    # The references, eager in float64: the batch's summed loss's gradient in the input embeddings (the
    # passes') and in the parameters (the sum of the loop's per-example rows).
    model64 = copy.deepcopy(model).double()
    embeds_ref = bare_pass(model64, lambda ids: model64.get_input_embeddings()(ids))()
    for p in model64.parameters():
        p.requires_grad_(True)
    with torch.enable_grad():
        loss64 = loss_fn(model64(**inputs), targets).sum()
        params_ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss64, list(model64.parameters()))])

    start = time.perf_counter()
    compiled_grad = bare_pass(compiled)()  # its first call compiles
    compile_s = time.perf_counter() - start
    contenders = {"loop": loop, "eager_pass": bare_pass(model), "compiled_pass": bare_pass(compiled)}
    results = {"loop": loop().sum(axis=0), "eager_pass": contenders["eager_pass"](), "compiled_pass": compiled_grad}
    gaps = {
        name: check_agreement(
            PROG, name, got, (params_ref if name == "loop" else embeds_ref).numpy(), AGREEMENT_TOL, "float64 eager"
        )
        for name, got in results.items()
    }
    timings = time_interleaved(contenders, repeats=args.repeats, warmup=1)
    rates = {k: args.n / t["median_s"] for k, t in timings.items()}
    payload = {
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__,
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "compile_s": compile_s,
        "examples_per_s": rates,
        "eager_pass_vs_loop": rates["eager_pass"] / rates["loop"],
        "compiled_pass_vs_loop": rates["compiled_pass"] / rates["loop"],
        "goal_speedup_vs_loop": GOAL_SPEEDUP,
        "agreement": {"tol": AGREEMENT_TOL, "rel_gap": gaps},
        "timings": timings,
    }
    print({k: v for k, v in payload.items() if k != "timings"})
    # other sizes or threads than the recorded run's: a record of their own (compiled_ceiling_n16, ...)
    name = record_name("compiled_ceiling", args.quick, size_options(args, QUICK, FULL))
    print(write_json(name, payload, output_dir(args.out, args.quick, "compiled-ceiling")))


if __name__ == "__main__":
    main()
