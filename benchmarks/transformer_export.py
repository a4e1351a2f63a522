"""Per-example gradient export of Hugging Face transformers (examples/s), CPU: tracin.torch against a
per-example autograd loop and torch.func vmap(grad) where vmap can run the model.

Models are built from small configs (random weights, no download): a GPT-2 language model (loss: the
summed next-token cross-entropy of each sequence) and a BERT sequence classifier (cross-entropy),
on right-padded sequences with attention masks, all parameters chosen; vmap cannot run either. A
plain-PyTorch causal transformer of the same size (Embedding, Linear, LayerNorm, scaled dot-product
attention), which vmap can run, puts the hook path beside vmap. Every contender produces the
same float32 (n, d) matrix for the same weights and data, one checkpoint; the rows of tracin and of
vmap are checked against the loop's before timing. Timed interleaved, median of repeats.

    python -m benchmarks.transformer_export [--n 64] [--tokens 128] [--width 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import time_interleaved, write_json  # noqa: E402

GOAL_SPEEDUP = 5.0  # issue 20: tracin >= 5x the per-example loop for GPT-2, 64 sequences of 128 tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="sequences exported per call")
    parser.add_argument("--tokens", type=int, default=128, help="sequence length (before padding)")
    parser.add_argument("--width", type=int, default=64, help="hidden size")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    import transformers

    from tracin.torch import export_gradients

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, args.vocab, (args.n, args.tokens), generator=g)
    lengths = torch.randint(args.tokens // 2, args.tokens + 1, (args.n,), generator=g)
    mask = (torch.arange(args.tokens)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    inputs = {"input_ids": ids, "attention_mask": mask}

    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=args.vocab,
            n_positions=args.tokens,
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
            max_position_embeddings=args.tokens,
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
    native = _native_transformer(args.vocab, args.tokens, args.width, args.layers).eval()
    cases = {
        "gpt2": (gpt2, token_loss, labels),
        "torch_native": (native, token_loss, labels),
        "bert": (bert, class_loss, torch.randint(0, 4, (args.n,), generator=g)),
    }
    results = {}
    for name, (model, loss_fn, targets) in cases.items():
        results[name] = _run_case(model, loss_fn, inputs, targets, args.repeats, export_gradients)
        print(name, {k: v for k, v in results[name].items() if k != "timings"}, flush=True)
    payload = {
        "args": vars(args),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "goal_speedup_vs_loop": GOAL_SPEEDUP,
        "cases": results,
    }
    print(write_json("transformer_export", payload))


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


def _run_case(model, loss_fn, inputs, targets, repeats: int, export_gradients) -> dict:
    import torch
    from torch.func import functional_call, grad, vmap

    n = len(targets)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())  # a tied weight (GPT-2's lm_head) once, under its first name
    names = list(params)
    width = sum(p.numel() for p in params.values())

    def run_tracin() -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any fallback would make this a different contender
            return export_gradients(model, [(state, 1.0)], (inputs, targets), loss_fn, progress=False).matrices[0]

    def run_loop() -> np.ndarray:
        out = np.empty((n, width), dtype=np.float32)
        leaves = [params[k] for k in names]
        for i in range(n):
            one = {k: v[i : i + 1] for k, v in inputs.items()}
            with torch.enable_grad():
                loss = loss_fn(model(**one), targets[i : i + 1]).sum()
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            out[i] = torch.cat(
                [(torch.zeros_like(p) if gr is None else gr).reshape(-1) for p, gr in zip(leaves, grads, strict=True)]
            ).numpy()
        return out

    def loss_of_one(chosen, x, y):
        one = {k: v.unsqueeze(0) for k, v in x.items()}
        return loss_fn(functional_call(model, chosen, (), one), y.unsqueeze(0)).sum()

    per_example = vmap(grad(loss_of_one), in_dims=(None, 0, 0))

    def run_vmap() -> np.ndarray:
        grads = per_example({k: state[k] for k in names}, inputs, targets)
        return torch.cat([grads[k].reshape(n, -1) for k in names], dim=1).numpy()

    reference = run_loop()
    scale = np.abs(reference).max()
    contenders = {"tracin": run_tracin, "loop": run_loop}
    errors = {}
    for label, fn in (("tracin", run_tracin), ("vmap", run_vmap)):
        try:
            errors[label] = float(np.abs(fn() - reference).max() / scale)
        except (RuntimeError, NotImplementedError) as e:
            errors[label] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            continue
        contenders[label] = fn
    timings = time_interleaved(contenders, repeats=repeats, warmup=0)
    rates = {k: n / t["median_s"] for k, t in timings.items()}
    return {
        "params": width,
        "examples": n,
        "examples_per_s": rates,
        "speedup_vs_loop": {k: r / rates["loop"] for k, r in rates.items() if k != "loop"},
        "max_relative_error_vs_loop": errors,
        "timings": timings,
    }


if __name__ == "__main__":
    main()
