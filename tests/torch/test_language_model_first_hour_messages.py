"""Messages a language-model user meets in a first hour: a projection given as its dim, and test / train
sides exported over other layers= with the same per-layer Kronecker projection (the same dim, so the rows'
widths agree and only the recorded parameters and segment layouts differ)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tracin
from tracin.torch import export_gradients

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH = 32, 8


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config).eval()


def token_loss(outputs, labels):
    logits = outputs.logits[:, :-1].transpose(1, 2)
    return nn.functional.cross_entropy(logits, labels[:, 1:], reduction="none").sum(1)


def passages(n: int):
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids


def test_a_projection_given_as_its_dim_is_told_to_wrap_it_in_a_projection():
    model = gpt2()
    with pytest.raises(TypeError, match=r"got the int 4096: pass projection=tracin\.Projection\(4096\)") as e:
        export_gradients(model, [(model.state_dict(), 1.0)], passages(2), token_loss, projection=4096, progress=False)
    assert "bfloat16" not in str(e.value)  # the advice for other projections' rows is not this user's


def test_sides_exported_over_other_layers_are_told_so_not_other_tracin_versions():
    model = gpt2()
    projection = tracin.Projection(1024, seed=0, per_layer=True, kronecker=True)
    checkpoints = [(model.state_dict(), 1.0)]
    train = export_gradients(
        model, checkpoints, passages(4), token_loss, layers=["transformer.h.*.mlp.*"], projection=projection
    )
    test = export_gradients(
        model, checkpoints, passages(2), token_loss, layers=["transformer.h.0.mlp.*"], projection=projection
    )
    assert test.dims == train.dims  # the dim is split over the layers: the widths agree
    with pytest.raises(ValueError, match="gradients of different parameters") as e:
        tracin.top_k(test, train, k=2)
    assert "tracin versions" not in str(e.value)


def test_a_list_of_single_tokenized_examples_is_told_it_was_read_as_batches():
    model = gpt2()
    inputs, labels = passages(4)
    examples = [({k: v[i] for k, v in inputs.items()}, labels[i]) for i in range(4)]  # one dict per example
    with pytest.raises(IndexError, match=r"read as 4 batches.*default_collate\(data\)"):  # HF's own IndexError
        export_gradients(model, [(model.state_dict(), 1.0)], examples, token_loss, progress=False)
    loader = torch.utils.data.DataLoader(examples, batch_size=64)  # the advice, followed
    rows = export_gradients(model, [(model.state_dict(), 1.0)], loader, token_loss, progress=False)
    whole = export_gradients(model, [(model.state_dict(), 1.0)], (inputs, labels), token_loss, progress=False)
    np.testing.assert_array_equal(rows.matrices[0], whole.matrices[0])


def test_the_model_inputs_alone_as_data_are_told_to_pair_them_with_targets():
    model = gpt2()
    inputs, _ = passages(2)
    with pytest.raises(TypeError, match=r"data is a dict of 'input_ids', 'attention_mask', the model's inputs alone"):
        export_gradients(model, [(model.state_dict(), 1.0)], inputs, token_loss, progress=False)


@pytest.mark.parametrize("dim", [0, -5])
def test_a_projection_dim_below_1_is_not_told_to_wrap_it(dim):
    """tracin.Projection(0) fails too ('dim must be >= 1'): the advice says what dim is wanted instead."""
    model = gpt2()
    with pytest.raises(TypeError, match=rf"got the int {dim}: pass projection=tracin\.Projection\(dim\) with the") as e:
        export_gradients(model, [(model.state_dict(), 1.0)], passages(2), token_loss, projection=dim, progress=False)
    assert f"Projection({dim})" not in str(e.value)


def test_a_factored_export_given_a_projection_dim_is_not_told_of_per_token_kronecker_maps():
    """per_layer=True, kronecker=True needs mode='full': factored rows are not told of it."""
    model = nn.Linear(4, 3)
    data = (torch.randn(5, 4), torch.randint(0, 3, (5,)))
    loss = nn.CrossEntropyLoss(reduction="none")
    with pytest.raises(
        TypeError, match=r"pass projection=tracin\.Projection\(64\) \(a seed= to choose its random map\)$"
    ):
        export_gradients(model, [(model.state_dict(), 1.0)], data, loss, mode="factored", projection=64, progress=False)


def test_batches_of_rows_get_no_single_examples_note():
    """The list-of-pairs note is for one example per item (0-d / 1-d arrays); a list of real batches whose loss
    is refused for another reason (a mean, one number per batch) gets that refusal alone."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
    with pytest.raises(Exception) as e:
        export_gradients(
            model, [(model.state_dict(), 0.1)], data, lambda out, y: out.logsumexp(1).mean(), progress=False
        )
    said = str(e.value) + "".join(getattr(e.value, "__notes__", []))
    assert "reduction='none'" in said and "single examples" not in said and "default_collate" not in said, said
