"""A small GPT-2 (transformers, random init, no download) trained on the corpus with torch AdamW, with
checkpoints (weights, optimizer state, learning rate) saved along the way for TracIn."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .corpus import PAD, Corpus

IGNORE = -100  # label of a position without a loss


@dataclass(frozen=True)
class TrainSpec:
    """AdamW with linear warm-up over `warmup` steps then cosine decay to `final_fraction` of the rate;
    `checkpoints` saved evenly over the epochs, the last at the end."""

    epochs: int
    checkpoints: int = 3
    width: int = 64
    layers: int = 2
    heads: int = 4
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 100
    final_fraction: float = 0.1

    def rate_at(self, step: int, total: int) -> float:
        if step < self.warmup:
            return self.learning_rate * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, total - self.warmup)
        return self.learning_rate * (
            self.final_fraction + (1 - self.final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
        )


@dataclass
class Checkpoint:
    epoch: int
    learning_rate: float
    state: dict
    optimizer_state: dict
    fact_accuracy: float


def token_loss(outputs, labels):
    """Per-sequence loss (batch,): the summed next-token cross-entropy over positions labelled != IGNORE.
    The logits go in as contiguous (batch x positions, vocabulary) rows: with the softmax over the vocabulary
    axis of transposed logits a training step ran 1.3x slower."""
    import torch

    logits = outputs.logits[:, :-1]
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="none"
    )
    return losses.view(len(labels), -1).sum(1)


def batch_loss(model, inputs: dict, labels):
    """The training loss of a batch: mean next-token cross-entropy over the labelled positions, their logits
    alone computed (without the padding positions' logits a step ran 1.6x faster)."""
    import torch

    hidden = model.transformer(**inputs).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    return torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]), targets[keep])


def passage_batches(corpus: Corpus) -> tuple[dict, object]:
    """Training passages as ({input_ids, attention_mask}, labels) tensors; labels: the ids, IGNORE on padding."""
    import torch

    ids = torch.from_numpy(corpus.passages)
    mask = (ids != PAD).long()
    return {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, IGNORE)


def query_batches(corpus: Corpus, prompts: np.ndarray, targets: np.ndarray) -> tuple[dict, object]:
    """Prompts with their target appended; the loss is on the target token only."""
    import torch

    ids = torch.from_numpy(np.concatenate([prompts, targets[:, None]], axis=1))
    labels = torch.full_like(ids, IGNORE)
    labels[:, -1] = ids[:, -1]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def build_model(corpus: Corpus, spec: TrainSpec, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=corpus.vocab_size,
        n_positions=max(corpus.passages.shape[1], corpus.queries.shape[1] + 1),
        n_embd=spec.width,
        n_layer=spec.layers,
        n_head=spec.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return transformers.GPT2LMHeadModel(config)


def predict(model, prompts: np.ndarray) -> np.ndarray:
    """The most likely next token after each prompt (n,)."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(prompts)).logits[:, -1].argmax(-1).numpy()


def train(
    corpus: Corpus, spec: TrainSpec, seed: int, log: Callable[[str], None]
) -> tuple[object, list[Checkpoint], dict]:
    """The trained model, its checkpoints and a training record (losses, accuracies, seconds)."""
    import torch

    model = build_model(corpus, spec, seed)
    inputs, labels = passage_batches(corpus)
    n = len(labels)
    steps_per_epoch = math.ceil(n / spec.batch_size)
    total = spec.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay)
    save_at = {int(e) for e in np.linspace(0, spec.epochs, spec.checkpoints + 1).round()[1:]}
    prompts, targets = corpus.prompts(np.arange(len(corpus.facts))), corpus.facts[:, 2]
    generator = torch.Generator().manual_seed(seed)
    checkpoints, record, step, t0 = [], {"epoch_loss": [], "fact_accuracy": []}, 0, time.perf_counter()
    for epoch in range(1, spec.epochs + 1):
        model.train()
        order, total_loss = torch.randperm(n, generator=generator), 0.0
        for start in range(0, n, spec.batch_size):
            rows = order[start : start + spec.batch_size]
            lr = spec.rate_at(step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = {k: v[rows] for k, v in inputs.items()}
            loss = batch_loss(model, batch, labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(rows)
            step += 1
        model.eval()
        acc = float((predict(model, prompts) == targets).mean())
        record["epoch_loss"].append(total_loss / n)
        record["fact_accuracy"].append(acc)
        log(f"  epoch {epoch}: loss {total_loss / n:.3f}, facts answered {acc:.3f} ({time.perf_counter() - t0:.0f} s)")
        if epoch in save_at:
            checkpoints.append(
                Checkpoint(
                    epoch,
                    lr,
                    {k: v.detach().clone() for k, v in model.state_dict().items()},
                    copy.deepcopy(optimizer.state_dict()),
                    acc,
                )
            )
    record["seconds"] = time.perf_counter() - t0
    record["steps"] = step
    return model, checkpoints, record
