"""preconditioner="adam" on a CNN trained with AdamW whose Conv2d has a bias followed by BatchNorm2d: the bias
gets almost no gradient in training mode (BatchNorm takes out the batch mean, so v is rounding noise) and a
real one in the export's eval mode, which g / (sqrt(v) + eps) blows up into nearly all of each row. That is
warned about, naming the parameter and the way out; the way out (layers= without it) is not warned about,
nor is the same network without BatchNorm. Several such layers, none over half of the rows alone, are warned about
together; a model trained to near-zero loss, whose every parameter's v is outgrown alike, is not."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from _models import tiny_gpt2

import tracin.torch

LOSS = nn.CrossEntropyLoss(reduction="none")


def _trained(batch_norm: bool) -> tuple[nn.Module, list, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 3, (64,))
    norm = nn.BatchNorm2d(2) if batch_norm else nn.Identity()
    model = nn.Sequential(nn.Conv2d(1, 2, 3), norm, nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    adam = torch.optim.AdamW(model.named_parameters(), lr=1e-2)
    for i in range(0, 64 * 5, 16):
        model.train()
        adam.zero_grad()
        LOSS(model(x[i % 64 : i % 64 + 16]), y[i % 64 : i % 64 + 16]).mean().backward()
        adam.step()
    checkpoint = ({k: v.clone() for k, v in model.state_dict().items()}, 1e-2, copy.deepcopy(adam.state_dict()))
    return model.eval(), [checkpoint], (x[:8], y[:8])


def _outsized(model: nn.Module, checkpoints: list, data, **options) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracin.torch.export_gradients(model, checkpoints, data, LOSS, preconditioner="adam", progress=False, **options)
    return [str(w.message) for w in caught if "far larger than" in str(w.message) and w.filename == __file__]


def test_a_conv_bias_before_batch_norm_is_warned_about() -> None:
    model, checkpoints, data = _trained(batch_norm=True)
    (message,) = _outsized(model, checkpoints, data)
    assert "'0.bias'" in message and "'0.weight'" not in message
    assert "layers=" in message and "bias=False" in message


@pytest.mark.parametrize("batch_norm", [True, False])
def test_no_warning_without_the_bias_or_without_batch_norm(batch_norm: bool) -> None:
    model, checkpoints, data = _trained(batch_norm)
    layers = ["0.weight", "1", "4"] if batch_norm else None
    assert _outsized(model, checkpoints, data, layers=layers) == []


def _cnn_of_several_batch_norms() -> tuple[nn.Module, list, tuple[torch.Tensor, torch.Tensor]]:
    """Three Conv2d (with bias) + BatchNorm2d blocks: the three biases split the rows' norm^2 (none over half)."""
    torch.manual_seed(1)
    x, y = torch.randn(64, 3, 6, 6), torch.randint(0, 5, (64,))
    blocks = [m for c in (3, 8, 8) for m in (nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())]
    model = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    adam = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(0, 16 * 30, 16):
        model.train()
        adam.zero_grad()
        LOSS(model(x[i % 64 : i % 64 + 16]), y[i % 64 : i % 64 + 16]).mean().backward()
        adam.step()
    checkpoint = ({k: v.clone() for k, v in model.state_dict().items()}, 1e-2, copy.deepcopy(adam.state_dict()))
    return model.eval(), [checkpoint], (x[:16], y[:16])


def test_the_biases_of_several_batch_norm_layers_are_warned_about_together() -> None:
    """Each bias makes under half of the rows' norm^2, together nearly all of it: one warning naming the three."""
    model, checkpoints, data = _cnn_of_several_batch_norms()
    g = tracin.torch.export_gradients(model, checkpoints, data, LOSS, preconditioner="adam", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = tracin.torch.export_gradients(model, checkpoints, data, LOSS, progress=False)
    names = [p["name"] for p in g.metadata["params"]]
    rows = np.asarray(g.matrices[0], np.float64)
    dims = [int(np.prod(p.shape)) for p in dict(model.named_parameters()).values()]
    cuts = np.cumsum([0, *dims])
    biases = [k for k, n in enumerate(names) if n in ("0.bias", "3.bias", "6.bias")]
    shares = [float(np.sum(rows[:, cuts[k] : cuts[k + 1]] ** 2) / np.sum(rows**2)) for k in biases]
    assert max(shares) < 0.5 < sum(shares), shares  # the case: no one bias over half, the three together
    assert np.asarray(plain.matrices[0]).shape == rows.shape
    (message,) = _outsized(model, checkpoints, data)
    assert all(f"'{n}.bias'" in message for n in (0, 3, 6)) and ".weight':" not in message
    assert "use_bias=False" in message  # flax's spelling too (tracin.jax shares the check)


def test_a_model_trained_to_near_zero_loss_scored_on_rows_it_gets_wrong_is_not_warned_about() -> None:
    """An MLP memorises its 64 rows over 5000 full-batch steps, so v decays everywhere; rows it gets wrong have
    gradients thousands of times what v recorded on every parameter alike. That is no parameter to leave out
    (the first layer's weight was named before), so no warning."""
    torch.manual_seed(0)
    x, w = torch.randn(64, 10), torch.randn(10, 3)
    y = (x @ w).argmax(1)
    y[:4] = (y[:4] + 1) % 3  # mislabelled, memorised too
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 3))
    adam = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(5000):
        adam.zero_grad()
        LOSS(model(x), y).mean().backward()
        adam.step()
    with torch.no_grad():
        assert float(LOSS(model(x), y).max()) < 1e-2
    checkpoint = ({k: v.clone() for k, v in model.state_dict().items()}, 1e-2, copy.deepcopy(adam.state_dict()))
    fresh = torch.randn(32, 10)
    wrong = ((fresh @ w).argmax(1) + 1) % 3
    plain = tracin.torch.export_gradients(model.eval(), [checkpoint], (fresh, wrong), LOSS, progress=False)
    assert [p["name"] for p in plain.metadata["params"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    rows, start, rms = np.asarray(plain.matrices[0], np.float64), 0, []
    for k in range(4):  # float64 g / (sqrt(v / (1 - b2^t)) + eps) per parameter, RMS over the entries with gradient
        state = checkpoint[2]["state"][k]
        v = state["exp_avg_sq"].double().numpy().ravel() / (1 - 0.999 ** float(state["step"]))
        g = rows[:, start : start + v.size]
        start += v.size
        rms.append(np.sqrt(np.mean((g / (np.sqrt(v) + 1e-8))[g != 0] ** 2)))
    assert max(rms) > 1e4 and min(rms) > 300, rms  # v outgrown on every parameter, the first weight most
    assert _outsized(model.eval(), [checkpoint], (fresh, wrong)) == []


def test_an_attention_key_bias_under_autocast_is_left_to_the_autocast_warning() -> None:
    """A tiny GPT-2 trained in float32 and exported under torch.autocast(bfloat16): its attention key biases'
    gradients are 0 in exact arithmetic, the 16-bit rounding's under autocast, which g / (sqrt(v) + eps) makes most
    of the rows. The autocast warning says so; this one, which blamed a bias before BatchNorm, stays silent."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(1, 60, (128, 12))

    def lm_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
        logits = outputs.logits[:, :-1].transpose(1, 2).float()
        return nn.functional.cross_entropy(logits, labels[:, 1:], reduction="none").sum(1)

    model = tiny_gpt2(vocab_size=100, n_positions=16, seed=0)
    adam = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(300):
        i = step * 16 % 128
        model.train()
        adam.zero_grad()
        lm_loss(model(ids[i : i + 16]), ids[i : i + 16]).mean().backward()
        adam.step()
    checkpoint = ({k: v.clone() for k, v in model.state_dict().items()}, 3e-3, copy.deepcopy(adam.state_dict()))
    with warnings.catch_warnings(record=True) as caught, torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("always")
        tracin.torch.export_gradients(
            model.eval(), [checkpoint], (ids[:8], ids[:8]), lm_loss, preconditioner="adam", progress=False
        )
    texts = [str(w.message) for w in caught]
    assert any("torch.autocast" in t and "key" in t for t in texts), texts  # the autocast warning names the cause
    assert not any("far larger than" in t for t in texts), texts


def test_a_conv_bias_before_batch_norm_of_a_bfloat16_model_is_warned_about() -> None:
    """Trained and exported in bfloat16, the bias's v is bfloat16 rounding (not float32's), so g / (sqrt(v) + eps)
    is ~3e3 there, ~5 elsewhere: still 100% of the rows, still warned about."""
    torch.manual_seed(0)
    x, y = torch.randn(128, 1, 6, 6).bfloat16(), torch.randint(0, 3, (128,))
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    model = model.bfloat16()
    adam = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(40):
        i = step * 16 % 128
        model.train()
        adam.zero_grad()
        LOSS(model(x[i : i + 16]), y[i : i + 16]).mean().backward()
        adam.step()
    checkpoint = ({k: v.clone() for k, v in model.state_dict().items()}, 1e-2, copy.deepcopy(adam.state_dict()))
    (message,) = _outsized(model.eval(), [checkpoint], (x[:16], y[:16]))
    assert "'0.bias' (" in message and ".weight' (" not in message
