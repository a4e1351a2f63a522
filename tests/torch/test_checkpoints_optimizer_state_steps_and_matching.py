"""Optimizer states given with checkpoints (killers of m404's hand mutants of tracin.torch.checkpoints):
the step count checked against a Trainer folder's global_step is the state's largest; general checkpoint
dicts give the state under each key, a Lightning checkpoint of several states is refused; eps=0, a
parameter frozen after training, entries keyed by ids as strings are taken; a position whose second
moment alone misfits is named. Rows are compared with float64 autograd and Adam's formula in NumPy."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def _loss(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


def _trained(steps: int = 2):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, generator=g), torch.randint(0, 2, (6,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model(x), y).mean().backward()
        opt.step()
    return model, copy.deepcopy(opt.state_dict()), (x, y)


def _trainer_folder(tmp_path, model, state, global_step: int):
    from safetensors.torch import save_file

    folder = tmp_path / f"checkpoint-{global_step}"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    torch.save(state, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(f'{{"global_step": {global_step}}}')
    return str(folder)


def test_a_state_partly_ahead_of_the_folders_global_step_is_refused_by_its_largest_step(tmp_path):
    """Steps 5 (weight) and 2 (bias) against global_step 3: refused naming 5, not warned about 2 (killed
    m404 M09: min of the steps instead of max)."""
    pytest.importorskip("safetensors")
    from tracin.torch import export_gradients

    model, state, data = _trained()
    state["state"][0]["step"] = torch.tensor(5.0)
    state["state"][1]["step"] = torch.tensor(2.0)
    folder = _trainer_folder(tmp_path, model, state, 3)
    with pytest.raises(
        ValueError,
        match=r"has taken 5 steps, while its checkpoint's trainer_state\.json records "
        r"global_step 3: a state saved after those weights",
    ):
        export_gradients(model, [(folder, 0.1, folder)], data, _loss, preconditioner="adam", progress=False)


def _adam_rows(model, state, data) -> np.ndarray:
    """float64 reference: per-example gradients by float64 autograd, one example at a time, in
    named_parameters order, divided by sqrt(v / (1 - b2^t)) + eps of the state's single group."""
    ref = copy.deepcopy(model).double().requires_grad_(True)
    params = list(ref.parameters())
    group = state["param_groups"][0]
    b2, eps = float(group["betas"][1]), float(group["eps"])
    denom = []
    for key in group["params"]:
        entry = state["state"][key]
        v, t = entry["exp_avg_sq"].double().numpy().reshape(-1), float(entry["step"])
        denom.append(np.sqrt(v / (1 - b2**t)) + eps)
    denom = np.concatenate(denom)
    x, y = data
    rows = []
    for i in range(len(x)):
        loss = _loss(ref(x[i : i + 1].double()), y[i : i + 1]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).numpy() / denom)
    return np.stack(rows)


@pytest.mark.parametrize("key", ["optimizer", "optimizer_state_dict", "optim"])
def test_a_general_checkpoint_dict_gives_the_state_it_holds_under_each_key(key):
    """{"model": ..., key: optimizer.state_dict()} as the optimizer state: its state is read (killed m404
    M10: "optim" dropped from the keys looked under, the dict then refused as not an optimizer state)."""
    from tracin.torch import export_gradients

    model, state, data = _trained()
    general = {"model": copy.deepcopy(model.state_dict()), key: state, "epoch": 1}
    g = export_gradients(
        model, [(model.state_dict(), 0.1, general)], data, _loss, preconditioner="adam", progress=False
    )
    expected = _adam_rows(model, state, data)
    np.testing.assert_allclose(np.asarray(g.matrices[0], np.float64), expected, rtol=1e-5, atol=1e-6)


def test_a_lightning_checkpoint_of_two_optimizer_states_is_refused_not_read_as_its_first():
    """Of several 'optimizer_states' (a Lightning checkpoint of two optimizers) none is guessed: the
    message says to pass one (killed m404 M11: the first one taken silently)."""
    from tracin.torch import export_gradients

    model, state, data = _trained()
    other = copy.deepcopy(state)
    lightning = {"state_dict": copy.deepcopy(model.state_dict()), "optimizer_states": [state, other]}
    with pytest.raises(
        ValueError,
        match=r"'optimizer_states' \(a Lightning checkpoint's\) lists 2 optimizer states: "
        r"pass the Adam one",
    ):
        export_gradients(
            model, [(model.state_dict(), 0.1, lightning)], data, _loss, preconditioner="adam", progress=False
        )


def test_a_state_of_eps_zero_is_taken_as_torch_takes_it():
    """torch.optim.Adam(eps=0) is torch's own setting: its rows are g / sqrt(v_hat) (killed m404 M14: eps
    required > 0, the state refused)."""
    from tracin.torch import export_gradients

    model, _, data = _trained(steps=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05, eps=0.0)
    for _ in range(2):
        opt.zero_grad()
        _loss(model(data[0]), data[1]).mean().backward()
        opt.step()
    state = copy.deepcopy(opt.state_dict())
    g = export_gradients(model, [(model.state_dict(), 0.1, state)], data, _loss, preconditioner="adam", progress=False)
    expected = _adam_rows(model, state, data)
    np.testing.assert_allclose(np.asarray(g.matrices[0], np.float64), expected, rtol=1e-5, atol=1e-6)


def test_an_unnamed_position_whose_second_moment_alone_misfits_is_named():
    """One group matched by position: exp_avg of the bias's shape but exp_avg_sq of another is refused
    naming the position and exp_avg_sq (killed m404 M24: only exp_avg's shape compared)."""
    from tracin.torch import export_gradients

    model, state, data = _trained()
    state["state"][1]["exp_avg_sq"] = torch.ones(3, 2)
    with pytest.raises(
        ValueError,
        match=r"position 1 does not fit: the model's parameter there is 0\.bias of shape "
        r"\(2,\), while the optimizer's exp_avg_sq there has shape \(3, 2\)",
    ):
        export_gradients(model, [(model.state_dict(), 0.1, state)], data, _loss, preconditioner="adam", progress=False)


def test_a_parameter_frozen_after_training_with_its_adam_state_is_taken():
    """A parameter frozen after the optimizer stepped it (its state holds exp_avg, exp_avg_sq) and named in
    layers= is preconditioned by its own moments, not refused as frozen (killed m404 M16: every frozen
    parameter refused, whatever the state holds)."""
    from tracin.torch import export_gradients

    model, state, data = _trained()
    model[0].bias.requires_grad_(False)
    g = export_gradients(
        model,
        [(model.state_dict(), 0.1, state)],
        data,
        _loss,
        layers=["0.weight", "0.bias"],
        preconditioner="adam",
        progress=False,
    )
    expected = _adam_rows(model, state, data)
    np.testing.assert_allclose(np.asarray(g.matrices[0], np.float64), expected, rtol=1e-5, atol=1e-6)


def test_state_entries_keyed_by_the_ids_as_strings_are_matched_to_their_params():
    """A state whose entries are keyed "0", "1" while its group lists params 0, 1 (a state converted through
    JSON-like keys) gives each parameter its own entry (killed m404 M17: the str(id) lookup dropped, the
    parameters then said to have no Adam state)."""
    from tracin.torch import export_gradients

    model, state, data = _trained()
    expected = _adam_rows(model, state, data)
    rekeyed = {"state": {str(k): v for k, v in state["state"].items()}, "param_groups": state["param_groups"]}
    g = export_gradients(
        model, [(model.state_dict(), 0.1, rekeyed)], data, _loss, preconditioner="adam", progress=False
    )
    np.testing.assert_allclose(np.asarray(g.matrices[0], np.float64), expected, rtol=1e-5, atol=1e-6)
