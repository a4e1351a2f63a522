"""export_gradients on checkpoints saved before a model's buffers became non-persistent (review201 F3):
the rows equal those of the same weights saved without them; another model's keys are still refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _models import old_pretrained_folder, tiny_bert, tiny_gpt2
from torch import nn

from tracin.torch import export_gradients

transformers = pytest.importorskip("transformers")


def _cls_loss(outputs, labels):
    return nn.functional.cross_entropy(outputs.logits, labels, reduction="none")


def _lm_loss(outputs, ids):
    return nn.functional.cross_entropy(outputs.logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").sum(1)


def test_an_old_bert_checkpoint_exports_as_the_current_one(tmp_path):
    """Was refused: 'unexpected keys ['bert.embeddings.position_ids']' (folder and state dict alike)."""
    model = tiny_bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    old = {**state, "bert.embeddings.position_ids": torch.arange(12).expand((1, -1))}
    ids = torch.randint(1, 97, (4, 12), generator=torch.Generator().manual_seed(2))
    data = ({"input_ids": ids}, torch.tensor([0, 1, 2, 0]))
    want = export_gradients(model, [(state, 1.0)], data, _cls_loss, layers=["classifier"], progress=False)
    for source in (old, old_pretrained_folder(tmp_path, model, old)):
        got = export_gradients(model, [(source, 1.0)], data, _cls_loss, layers=["classifier"], progress=False)
        np.testing.assert_array_equal(np.concatenate(got.matrices, axis=1), np.concatenate(want.matrices, axis=1))
    stray = {**old, "classifier.extra": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected keys \['classifier.extra'\]"):
        export_gradients(model, [(stray, 1.0)], data, _cls_loss, layers=["classifier"], progress=False)


def test_an_old_gpt2_folder_exports_as_the_current_one(tmp_path):
    model = tiny_gpt2(n_positions=8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mask = torch.tril(torch.ones(8, 8, dtype=torch.bool)).view(1, 1, 8, 8)
    old = {**state, **{f"transformer.h.{i}.attn.bias": mask for i in range(2)}}
    old.update({f"transformer.h.{i}.attn.masked_bias": torch.tensor(-1e4) for i in range(2)})  # older still
    ids = torch.randint(1, 50, (4, 8), generator=torch.Generator().manual_seed(1))
    data = ({"input_ids": ids}, ids)
    want = export_gradients(model, [(state, 1.0)], data, _lm_loss, layers=["*mlp*"], progress=False)
    got = export_gradients(
        model, [(old_pretrained_folder(tmp_path, model, old), 1.0)], data, _lm_loss, layers=["*mlp*"], progress=False
    )
    np.testing.assert_array_equal(np.concatenate(got.matrices, axis=1), np.concatenate(want.matrices, axis=1))
