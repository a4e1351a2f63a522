"""Per-example gradient export of Hugging Face transformers (examples/s), CPU: tracin.torch against a
per-example autograd loop and torch.func vmap(grad) where vmap can run the model.

Models are built from small configs (random weights, no download): a GPT-2 language model (loss: the
summed next-token cross-entropy of each sequence) and a BERT sequence classifier (cross-entropy),
on right-padded sequences with attention masks, all parameters chosen; vmap cannot run either. A
plain-PyTorch causal transformer of the same size (Embedding, Linear, LayerNorm, scaled dot-product
attention), which vmap can run, puts the hook path beside vmap. Every contender produces the
same float32 (n, d) matrix for the same weights and data, one checkpoint; the rows of tracin and of
vmap are checked against the loop's before timing (above AGREEMENT_TOL: exit 1, nothing timed or
written). Timed interleaved, median of repeats, at each sequence length of --tokens.

The ceiling: "batched_pass" is one forward and backward pass of the whole batch's summed losses down
to the input embeddings, with no parameter gradient at all, the least any batched method computes
("batched_pass_by_16": the same in passes of 16 sequences, smaller activations nearer the caches; tracin's
hook path splits a batch on the CPU in passes of at most ~128 MiB of captured tensors); the faster of
the two over the loop ("ceiling_vs_loop") bounds what batching can gain.
FLOPs (matmul, bmm, attention; torch.utils.flop_counter) of each contender, and a large sgemm's rate,
give the achieved GFLOP/s: the loop and tracin do the same FLOPs (forward, input gradients, one
outer-product sum per layer and example), so the speedup comes only from running them at a higher rate.

    python -m benchmarks.transformer_export [--n 64 256] [--tokens 128 32] [--width 64] [--repeats 9] [--threads 1 2]
                                            [--out DIR]
    python -m benchmarks.transformer_export --quick    # a smoke run (JSON in a new temporary folder)
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable

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

GOAL_SPEEDUP = 5.0  # the goal: tracin >= 5x the per-example loop for GPT-2, 64 sequences of 128 tokens
AGREEMENT_TOL = 1e-5  # largest |rows - loop's| / max |loop's| of tracin's (and vmap's) rows, checked before timing


# --quick: a smoke run in seconds (one tiny size, one repeat)
QUICK = {"n": [4], "tokens": [16], "width": 32, "layers": 1, "vocab": 64, "threads": [1], "repeats": 1}
# the recorded run (results/transformer_export.json)
FULL = {"n": [64, 256], "tokens": [128, 32], "width": 64, "layers": 2, "vocab": 512, "threads": [1, 2], "repeats": 5}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transformer_export", description=description(__doc__))
    helps = {
        "n": "sequences exported per call",
        "tokens": "sequence lengths (before padding)",
        "width": "hidden size",
        "layers": "transformer blocks",
        "vocab": "vocabulary size",
        "threads": "torch intra-op threads",
        "repeats": "timed rounds",
    }
    add_size_options(parser, FULL, QUICK, helps)
    add_output_options(parser, "small sizes, to check the script runs (a size given as a flag wins)")
    args = parser.parse_args(argv)
    require_modules(parser.prog, ("torch", "transformers"), "bench")
    quick_or_given(args, QUICK, FULL)
    out = output_dir(args.out, args.quick, "transformer-export")

    import torch
    import transformers

    malloc_kept = _keep_freed_memory()
    load_at_start = os.getloadavg()
    runs, sgemm = [], {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        sgemm[threads] = _sgemm_gflops()
        for n in args.n:
            for tokens in args.tokens:
                results = {}
                for name, (model, loss_fn, inputs, targets, embedding) in _cases(args, n, tokens).items():
                    where = f"{parser.prog}: error: {name} (n={n}, tokens={tokens}, threads={threads})"
                    results[name] = _run_case(model, loss_fn, inputs, targets, embedding, args.repeats, where)
                    summary = {k: v for k, v in results[name].items() if k != "timings"}
                    print(threads, n, tokens, name, summary, flush=True)
                runs.append({"threads": threads, "n": n, "tokens": tokens, "cases": results})
    payload = {
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "malloc_keeps_freed_memory": malloc_kept,
        "sgemm_gflops_by_threads": sgemm,
        "goal_speedup_vs_loop": GOAL_SPEEDUP,
        "runs": runs,
    }
    # other sizes or threads than the recorded run's: a record of their own (transformer_export_n64, ...)
    name = record_name("transformer_export", args.quick, size_options(args, QUICK, FULL))
    print(f"wrote {write_json(name, payload, out)}")


def _cases(args, n: int, tokens: int) -> dict:
    """name -> (model, loss_fn, inputs, targets, input embedding module): n sequences of one length."""
    import torch
    import transformers

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, args.vocab, (n, tokens), generator=g)
    lengths = torch.randint(tokens // 2, tokens + 1, (n,), generator=g)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    inputs = {"input_ids": ids, "attention_mask": mask}

    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=args.vocab,
            n_positions=tokens,
            n_embd=args.width,
            n_layer=args.layers,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).eval()
    bert = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=args.vocab,
            hidden_size=args.width,
            num_hidden_layers=args.layers,
            num_attention_heads=4,
            intermediate_size=4 * args.width,
            max_position_embeddings=tokens,
            num_labels=4,
        )
    ).eval()

    def token_loss(outputs, labels):
        losses = torch.nn.functional.cross_entropy(
            outputs.logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
        )
        return losses.sum(1)

    def class_loss(outputs, labels):
        return torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="none")

    labels = ids.masked_fill(mask == 0, -100)
    native = _native_transformer(args.vocab, tokens, args.width, args.layers).eval()
    return {
        "gpt2": (gpt2, token_loss, inputs, labels, gpt2.transformer.wte),
        "torch_native": (native, token_loss, inputs, labels, native.wte),
        "bert": (
            bert,
            class_loss,
            inputs,
            torch.randint(0, 4, (n,), generator=g),
            bert.bert.embeddings.word_embeddings,
        ),
    }


def _keep_freed_memory() -> bool:
    """glibc malloc keeps freed memory for reuse (no mmap per large block, no trim), for every contender
    alike: on a virtual machine the first touch of memory the guest has not used yet can cost ~1 ms/MB,
    at random, which made single timings of the (n, d) outputs vary 0.2-0.8 s. False where unavailable."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 2**30)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def _sgemm_gflops() -> float:
    """GFLOP/s of a 1024^3 float32 matmul on the threads set: the machine's practical matmul rate."""
    import time

    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best / 1e9


def _native_transformer(vocab: int, tokens: int, width: int, layers: int):
    """A GPT-style decoder in plain PyTorch, returning an object with .logits like transformers."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.qkv, self.proj = nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width)
            self.ln_2, self.up = nn.LayerNorm(width), nn.Linear(width, 4 * width)
            self.down = nn.Linear(4 * width, width)

        def forward(self, h, keep):
            q, k, v = (t.unflatten(-1, (4, -1)).transpose(1, 2) for t in self.qkv(self.ln_1(h)).chunk(3, dim=-1))
            a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            h = h + self.proj(a.transpose(1, 2).flatten(2))
            return h + self.down(nn.functional.gelu(self.up(self.ln_2(h))))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(tokens, width)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln_f, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

        def forward(self, input_ids, attention_mask):
            t = input_ids.shape[1]
            causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
            keep = (causal & attention_mask[:, None, :].bool())[:, None]
            h = self.wte(input_ids) + self.wpe(torch.arange(t, device=input_ids.device)[None])
            for block in self.blocks:
                h = block(h, keep)
            return type("Output", (), {"logits": self.head(self.ln_f(h))})()

    return Decoder()


def per_example_loop(model, loss_fn, inputs: dict, targets) -> Callable[[], np.ndarray]:
    """The per-example autograd loop: one forward and backward pass per sequence (padded as given), all
    parameters (a tied weight once); returns the (n, parameters) float32 rows."""
    import torch

    params = dict(model.named_parameters())
    leaves = list(params.values())
    width = sum(p.numel() for p in leaves)

    def run() -> np.ndarray:
        out = np.empty((len(targets), width), dtype=np.float32)
        for i in range(len(targets)):
            one = {k: v[i : i + 1] for k, v in inputs.items()}
            with torch.enable_grad():
                loss = loss_fn(model(**one), targets[i : i + 1]).sum()
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            out[i] = torch.cat(
                [(torch.zeros_like(p) if gr is None else gr).reshape(-1) for p, gr in zip(leaves, grads, strict=True)]
            ).numpy()
        return out

    return run


def _run_case(model, loss_fn, inputs, targets, embedding, repeats: int, where: str) -> dict:
    """Times one model's contenders; exits 1 with a line starting with `where` (nothing timed or
    written) when tracin fails or its rows (or vmap's, where vmap runs) differ from the loop's by more
    than AGREEMENT_TOL."""
    import torch
    from torch.func import functional_call, grad, vmap
    from torch.utils.flop_counter import FlopCounterMode

    from tracin.torch import export_gradients

    n = len(targets)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())  # a tied weight (GPT-2's lm_head) once, under its first name
    names = list(params)
    width = sum(p.numel() for p in params.values())

    def run_tracin() -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any fallback would make this a different contender
            return export_gradients(model, [(state, 1.0)], (inputs, targets), loss_fn, progress=False).matrices[0]

    run_loop = per_example_loop(model, loss_fn, inputs, targets)

    def batched_pass(rows: int):
        def run() -> None:
            """Forward and backward down to the input embeddings, `rows` sequences a pass; no parameter
            gradients."""
            flags = [p.requires_grad for p in params.values()]
            for p in params.values():
                p.requires_grad_(False)
            start = []
            handle = embedding.register_forward_hook(
                lambda m, a, y: start.append(y.detach().requires_grad_(True)) or start[-1]
            )
            try:
                for s in range(0, n, rows):
                    with torch.enable_grad():
                        part = {k: v[s : s + rows] for k, v in inputs.items()}
                        loss = loss_fn(model(**part), targets[s : s + rows]).sum()
                        torch.autograd.grad(loss, start[-1])
            finally:
                handle.remove()
                for p, flag in zip(params.values(), flags, strict=True):
                    p.requires_grad_(flag)

        return run

    def loss_of_one(chosen, x, y):
        one = {k: v.unsqueeze(0) for k, v in x.items()}
        return loss_fn(functional_call(model, chosen, (), one), y.unsqueeze(0)).sum()

    per_example = vmap(grad(loss_of_one), in_dims=(None, 0, 0))

    def run_vmap() -> np.ndarray:
        grads = per_example({k: state[k] for k in names}, inputs, targets)
        return torch.cat([grads[k].reshape(n, -1) for k in names], dim=1).numpy()

    reference = run_loop()
    scale = np.abs(reference).max()
    contenders = {
        "tracin": run_tracin,
        "loop": run_loop,
        "batched_pass": batched_pass(n),
        "batched_pass_by_16": batched_pass(16),
    }
    errors = {}
    for label, fn in (("tracin", run_tracin), ("vmap", run_vmap)):
        try:
            errors[label] = float(np.abs(fn() - reference).max() / scale)
        except (RuntimeError, NotImplementedError) as e:
            errors[label] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            continue
        contenders[label] = fn
    for label, error in errors.items():
        # a check that python -O keeps: a wrong export is never timed or recorded
        if isinstance(error, float) and error < AGREEMENT_TOL or (label == "vmap" and isinstance(error, str)):
            continue
        detail = (
            f"{label} {error}"
            if isinstance(error, str)
            else f"{label}'s rows differ from the loop's by {error:.3g} (relative, max), above {AGREEMENT_TOL:g}"
        )
        print(f"{where}: {detail}; nothing timed", file=sys.stderr)
        raise SystemExit(1)
    flops = {}
    for label in ("tracin", "loop", "batched_pass"):
        with FlopCounterMode(display=False) as counter:
            contenders[label]()
        flops[label] = counter.get_total_flops()
    timings = time_interleaved(contenders, repeats=repeats, warmup=1)
    rates = {k: n / t["median_s"] for k, t in timings.items()}
    return {
        "params": width,
        "examples": n,
        "examples_per_s": rates,
        "speedup_vs_loop": {k: r / rates["loop"] for k, r in rates.items() if k != "loop"},
        "ceiling_vs_loop": max(rates[k] for k in ("batched_pass", "batched_pass_by_16")) / rates["loop"],
        # fastest repeat over fastest repeat: less sensitive to other work on a shared machine than medians
        "speedup_vs_loop_best_times": {
            k: min(timings["loop"]["times_s"]) / min(t["times_s"]) for k, t in timings.items() if k != "loop"
        },
        "max_relative_error_vs_loop": errors,
        "gflop": {k: f / 1e9 for k, f in flops.items()},
        "gflop_per_s": {k: f / 1e9 / timings[k]["median_s"] for k, f in flops.items()},
        "timings": timings,
    }


if __name__ == "__main__":
    main()
