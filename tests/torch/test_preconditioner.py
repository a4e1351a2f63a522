"""Optimizer-aware gradients (preconditioner="adam" | "adam_update") from real torch.optim.Adam / AdamW
states, against float64 references: per-example gradients by float64 autograd one example at a time,
and Adam's formulas evaluated in NumPy from the optimizer.state_dict()."""

from __future__ import annotations

import copy
import zipfile
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from _models import tiny_gpt2
from torch import nn

import tracin
from tracin.torch import export_gradients

N = 12


def _loss(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


_NAMED_GROUPS = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 6)  # param_names recorded
needs_named = pytest.mark.skipif(not _NAMED_GROUPS, reason="optimizers over named parameters need torch >= 2.6")


def _split(model: nn.Module, named: bool) -> list[dict]:
    """A weight-decay / no-decay split (as transformers.Trainer builds it): weights, then biases,
    with their own betas and eps; (name, parameter) pairs when `named`."""
    pairs = list(model.named_parameters())
    weights = [(n, p) if named else p for n, p in pairs if n.endswith("weight")]
    biases = [(n, p) if named else p for n, p in pairs if n.endswith("bias")]
    return [
        {"params": weights, "betas": (0.8, 0.95), "eps": 1e-3},
        {"params": biases, "weight_decay": 0.0},
    ]


def _trained(optimizer: str = "adam", groups: bool = False, steps: int = 3, named: bool = True):
    """A 5 -> 8 -> 3 tanh MLP trained in two phases; returns (model, [(state_dict, lr, optimizer
    state_dict)] after each phase, (x, y)). groups: the decay / no-decay split (of named parameters
    unless `named` is False) instead of one group over model.parameters()."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)
    cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    if groups:  # per-group betas and eps, to check each parameter takes its own group's
        opt = cls(_split(model, named), lr=0.05, betas=(0.85, 0.99), eps=1e-6)
    else:
        opt = cls(model.parameters(), lr=0.05, betas=(0.85, 0.99), eps=1e-6)
    checkpoints = []
    for lr in (0.05, 0.02):
        for group in opt.param_groups:
            group["lr"] = lr
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        checkpoints.append((copy.deepcopy(model.state_dict()), lr, copy.deepcopy(opt.state_dict())))
    return model, checkpoints, (x, y)


def _reference_grads(model: nn.Module, state: dict, x, y) -> np.ndarray:
    """(n, d) float64 per-example gradients in named_parameters order, by float64 autograd per example."""
    ref = copy.deepcopy(model).double()
    ref.load_state_dict({k: v.double() for k, v in state.items()})
    params = list(ref.parameters())
    rows = []
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(ref(x[i : i + 1].double()), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).numpy())
    return np.stack(rows)


def _per_element(opt_state: dict) -> dict[str, np.ndarray]:
    """m, v, step, b1, b2, eps of every row entry (float64), from the optimizer's state_dict, in the
    model's parameter order (_trained's MLP): by the param_names it recorded, else its own order
    (one group over model.parameters())."""
    out: dict[str, list] = {k: [] for k in ("m", "v", "step", "b1", "b2", "eps")}
    groups = opt_state["param_groups"]
    entries = [(i, g) for g in groups for i in g["params"]]
    if "param_names" in groups[0]:
        order = ["0.weight", "0.bias", "2.weight", "2.bias"]
        names = [n for g in groups for n in g["param_names"]]
        entries = [entries[names.index(n)] for n in order]
    for i, group in entries:
        s = opt_state["state"][i]
        m, v = s["exp_avg"].double().numpy().reshape(-1), s["exp_avg_sq"].double().numpy().reshape(-1)
        for key, value in (
            ("m", m),
            ("v", v),
            ("step", float(s["step"])),
            ("b1", group["betas"][0]),
            ("b2", group["betas"][1]),
            ("eps", group["eps"]),
        ):
            out[key].append(np.broadcast_to(np.float64(value), m.shape))
    return {k: np.concatenate(v) for k, v in out.items()}


def _adam(g: np.ndarray, s: dict) -> np.ndarray:
    return g / (np.sqrt(s["v"] / (1 - s["b2"] ** s["step"])) + s["eps"])


def _adam_update(g: np.ndarray, s: dict) -> np.ndarray:
    m = s["b1"] * s["m"] + (1 - s["b1"]) * g
    v = s["b2"] * s["v"] + (1 - s["b2"]) * g**2
    t = s["step"] + 1
    return (m / (1 - s["b1"] ** t)) / (np.sqrt(v / (1 - s["b2"] ** t)) + s["eps"])


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
@pytest.mark.parametrize("groups", [False, pytest.param(True, marks=needs_named)])
@pytest.mark.parametrize("kind, formula", [("adam", _adam), ("adam_update", _adam_update)])
def test_rows_follow_adam_formulas_from_the_optimizer_state(optimizer, groups, kind, formula):
    model, checkpoints, (x, y) = _trained(optimizer, groups)
    g = export_gradients(model, checkpoints, (x, y), _loss, preconditioner=kind, batch_size=5, progress=False)
    for c, (state, _, opt_state) in enumerate(checkpoints):
        expected = formula(_reference_grads(model, state, x, y), _per_element(opt_state))
        got = np.asarray(g.matrices[c], np.float64)
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())
    np.testing.assert_array_equal(g.weights, [0.05, 0.02])
    assert g.metadata["preconditioner"]["kind"] == kind
    assert len(g.metadata["fingerprints"]["optimizer_states"]) == 2


def test_unnamed_param_groups_are_refused_as_matched_by_position():
    """Without param_names, a decay / no-decay split (weights first) would pair 0.bias with the
    moments of 2.weight; groups of equal shapes in another order would pass every shape check."""
    model, checkpoints, data = _trained(groups=True, named=False)
    with pytest.raises(
        ValueError,
        match=r"2 param groups and no parameter names .* matched by position.*"
        r"AdamW\(model.named_parameters\(\)\)",
    ):
        export_gradients(model, checkpoints, data, _loss, preconditioner="adam", progress=False)


@needs_named
@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_parameter_names_of_a_wrapped_or_compiled_model_are_matched_without_the_prefix(prefix):
    """param_names of an optimizer over a torch.compile'd model ('_orig_mod.0.weight') were in none of
    the model's names."""
    model, checkpoints, (x, y) = _trained(groups=True)
    state, lr, opt_state = checkpoints[0]
    renamed = copy.deepcopy(opt_state)
    for group in renamed["param_groups"]:
        group["param_names"] = [prefix + n for n in group["param_names"]]
    g = export_gradients(model, [(state, lr, renamed)], (x, y), _loss, preconditioner="adam", progress=False)
    expected = _adam(_reference_grads(model, state, x, y), _per_element(opt_state))
    np.testing.assert_allclose(g.matrices[0], expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())


@needs_named
def test_a_wrappers_prefix_in_param_names_is_named_and_its_recipe_works():
    """param_names of an optimizer over a module holding the model as .model ('model.0.weight') gave
    'parameter 0.weight is in none of the optimizer's param_groups', the optimizer's names unseen."""
    model, checkpoints, (x, y) = _trained(groups=True)
    state, lr, opt_state = checkpoints[0]
    wrapped = copy.deepcopy(opt_state)
    for group in wrapped["param_groups"]:
        group["param_names"] = ["model." + n for n in group["param_names"]]
    with pytest.raises(
        ValueError,
        match=r"parameter 0.weight is in none of the optimizer's param_groups \(it names its 4 parameters "
        r"'model.0.weight', 'model.2.weight', 'model.0.bias' and 1 more\): its 'model.0.weight' is this parameter "
        r"under the prefix 'model.' .*g\['param_names'\] = \[n.removeprefix\('model.'\) for n in g\['param_names'\]\]",
    ):
        export_gradients(model, [(state, lr, wrapped)], (x, y), _loss, preconditioner="adam", progress=False)
    for g in wrapped["param_groups"]:  # the refusal's recipe
        g["param_names"] = [n.removeprefix("model.") for n in g["param_names"]]
    g = export_gradients(model, [(state, lr, wrapped)], (x, y), _loss, preconditioner="adam", progress=False)
    expected = _adam(_reference_grads(model, state, x, y), _per_element(opt_state))
    np.testing.assert_allclose(g.matrices[0], expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())
    two = copy.deepcopy(opt_state)
    two["param_groups"][0]["param_names"] = ["a.0.weight", "b.0.weight"]
    with pytest.raises(ValueError, match=r"under several prefixes \('a.', 'b.'\), which do not tell"):
        export_gradients(model, [(state, lr, two)], (x, y), _loss, preconditioner="adam", progress=False)


def test_a_trainer_decay_split_is_taken_once_named_as_the_refusal_says():
    """A transformers Trainer's optimizer.pt (two unnamed groups: decay, no decay) was refused with no way
    to name its parameters; the refusal's recipe names them with the Trainer's own rule."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))  # self is not used
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [  # as Trainer.create_optimizer builds them
        {"params": [p for n, p in named if n in decay], "weight_decay": 0.01},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=0.05, betas=(0.85, 0.99), eps=1e-6)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"2 param groups .*trainer.get_decay_parameter_names\(model\)"):
        export_gradients(model, [(state, 0.05, opt_state)], (x, y), _loss, preconditioner="adam", progress=False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the refusal's recipe
    opt_state["param_groups"][0]["param_names"] = [n for n in names if n in decay]
    opt_state["param_groups"][1]["param_names"] = [n for n in names if n not in decay]
    got = export_gradients(model, [(state, 0.05, opt_state)], (x, y), _loss, preconditioner="adam", progress=False)
    owner = {n: i for grp in opt_state["param_groups"] for n, i in zip(grp["param_names"], grp["params"], strict=True)}
    v = np.concatenate([opt_state["state"][owner[n]]["exp_avg_sq"].double().numpy().reshape(-1) for n in names])
    step = float(opt_state["state"][0]["step"])
    expected = _adam(_reference_grads(model, state, x, y), {"v": v, "step": step, "b2": 0.99, "eps": 1e-6})
    np.testing.assert_allclose(got.matrices[0], expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())


def test_one_unnamed_group_in_another_order_is_refused_naming_the_position_match():
    model, checkpoints, data = _trained()
    opt_state = copy.deepcopy(checkpoints[0][2])
    group = opt_state["param_groups"][0]
    group["params"] = group["params"][::-1]  # as Adam(reversed(list(model.parameters())))
    with pytest.raises(
        ValueError,
        match=r"matched by position .*position 0 does not fit: the model's parameter there is 0.weight of shape "
        r"\(8, 5\), while the optimizer's exp_avg there has shape \(3,\) \(the shape of the model's 2.bias\)",
    ):
        export_gradients(model, [(*checkpoints[0][:2], opt_state)], data, _loss, preconditioner="adam", progress=False)


def test_an_unnamed_state_of_another_model_is_not_said_to_be_in_another_order():
    """review135: a state whose moments fit none of the model's parameter shapes (a wider model's, or one saved
    before resize_token_embeddings) was said to come from an optimizer built over another order, with advice
    to name the parameters that could not help."""
    model, checkpoints, data = _trained()
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3))
    opt = torch.optim.Adam(wider.parameters())
    nn.functional.cross_entropy(wider(data[0]), data[1]).backward()
    opt.step()
    with pytest.raises(
        ValueError,
        match=r"position 0 does not fit.*\(the shape of none of the model's parameters\)\. "
        r"The state is not this model's",
    ) as caught:
        export_gradients(
            model, [(*checkpoints[0][:2], opt.state_dict())], data, _loss, preconditioner="adam", progress=False
        )
    assert "another order" not in str(caught.value)


def test_one_unnamed_group_in_another_order_is_refused_at_any_position_not_only_the_chosen():
    """review134 e17_position.py: a GPT-2 trained by AdamW over one group [matrices..., vectors...] gave
    the chosen h.0.mlp.c_proj.bias and h.1.ln_1.weight the exp_avg_sq of the same-shaped
    h.0.attn.c_proj.bias and h.0.ln_2.weight (rows 90% off), silently; every position is now checked. The
    refusal's advice (name the parameters) then gives each its own state."""
    model = tiny_gpt2(50, 8, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(1))

    def loss_fn(out, labels):
        return nn.functional.cross_entropy(out.logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none").sum(1)

    named = list(model.named_parameters())
    order = [(n, p) for n, p in named if p.dim() >= 2] + [(n, p) for n, p in named if p.dim() < 2]
    opt = torch.optim.AdamW([p for _, p in order], lr=1e-2, betas=(0.8, 0.9), eps=1e-6)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model(ids), ids).sum().backward()
        opt.step()
    state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    chosen = ["transformer.h.0.mlp.c_proj.bias", "transformer.h.1.ln_1.weight"]
    at = [[n for n, _ in named].index(c) for c in chosen]
    assert [order[i][0] for i in at] == ["transformer.h.0.attn.c_proj.bias", "transformer.h.0.ln_2.weight"]
    checkpoints = [(state, 1e-2, opt_state)]
    with pytest.raises(
        ValueError,
        match=r"matched by position in model.named_parameters\(\) order \(28 parameters\), and position 2 does not "
        r"fit: the model's parameter there is transformer.h.0.ln_1.weight of shape \(16,\), while the optimizer's "
        r"exp_avg there has shape \(16, 48\) \(the shape of the model's transformer.h.0.attn.c_attn.weight, "
        r"transformer.h.1.attn.c_attn.weight\)\. The optimizer was built over the parameters in another order\. "
        r"Build the optimizer over named parameters",
    ):
        export_gradients(model, checkpoints, (ids, ids), loss_fn, layers=chosen, preconditioner="adam", progress=False)

    opt_state["param_groups"][0]["param_names"] = [n for n, _ in order]
    got = export_gradients(
        model, checkpoints, (ids, ids), loss_fn, layers=chosen, preconditioner="adam", progress=False
    ).matrices[0]
    ref = copy.deepcopy(model).double()
    params = dict(ref.named_parameters())
    own = {n: opt_state["state"][i] for i, (n, _) in enumerate(order)}
    v_hat = np.concatenate([own[n]["exp_avg_sq"].double().numpy().reshape(-1) / (1 - 0.9**2) for n in chosen])
    grads = np.stack(
        [
            np.concatenate(
                [
                    g.numpy().reshape(-1)
                    for g in torch.autograd.grad(
                        loss_fn(ref(ids[i : i + 1]), ids[i : i + 1]).sum(), [params[n] for n in chosen]
                    )
                ]
            )
            for i in range(len(ids))
        ]
    )
    expected = grads / (np.sqrt(v_hat) + 1e-6)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())


def test_plain_export_ignores_optimizer_states_with_a_warning_and_records_no_preconditioner():
    model, checkpoints, (x, y) = _trained()
    with pytest.warns(UserWarning, match=r"checkpoints\[0\]\[2\] is an optimizer state, but preconditioner=None") as w:
        g = export_gradients(model, checkpoints, (x, y), _loss, progress=False)
    assert len(w) == 1 and 'preconditioner="adam"' in str(w[0].message) and "drop the state" in str(w[0].message)
    np.testing.assert_allclose(
        np.asarray(g.matrices[1], np.float64), _reference_grads(model, checkpoints[1][0], x, y), rtol=1e-5, atol=1e-6
    )
    assert g.metadata["preconditioner"] is None and "optimizer_states" not in g.metadata["fingerprints"]


def test_optimizer_state_from_a_file_and_projection_after_preconditioning(tmp_path):
    model, checkpoints, (x, y) = _trained()
    paths = []
    for c, (state, lr, opt_state) in enumerate(checkpoints):
        torch.save(opt_state, tmp_path / f"opt{c}.pt")
        paths.append((state, lr, str(tmp_path / f"opt{c}.pt")))
    projection = tracin.Projection(16, seed=3)
    g = export_gradients(model, paths, (x, y), _loss, preconditioner="adam", projection=projection, progress=False)
    expected = _adam(_reference_grads(model, checkpoints[0][0], x, y), _per_element(checkpoints[0][2]))
    want = projection.apply(expected.astype(np.float32))
    np.testing.assert_allclose(g.matrices[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert g.metadata["projection"] == projection.to_dict()


def test_a_checkpoint_folder_given_as_the_optimizer_state_is_read_from_its_optimizer_pt(tmp_path):
    """A folder was 'cannot be read (...): [Errno 21] Is a directory'; a Trainer's checkpoint-N holds
    the state as optimizer.pt, next to the weights the same folder gives as checkpoints[i][0]."""
    model, checkpoints, (x, y) = _trained()
    entries = []
    for c, (state, lr, opt_state) in enumerate(checkpoints):
        (tmp_path / f"checkpoint-{c}").mkdir()
        torch.save(opt_state, tmp_path / f"checkpoint-{c}" / "optimizer.pt")
        entries.append((state, lr, tmp_path / f"checkpoint-{c}"))
    g = export_gradients(model, entries, (x, y), _loss, preconditioner="adam", progress=False)
    for c, (state, _, opt_state) in enumerate(checkpoints):
        expected = _adam(_reference_grads(model, state, x, y), _per_element(opt_state))
        np.testing.assert_allclose(g.matrices[c], expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())
    as_files = [(s, lr, str(p / "optimizer.pt")) for s, lr, p in entries]
    by_file = export_gradients(model, as_files, (x, y), _loss, preconditioner="adam", progress=False)
    assert g.metadata["fingerprints"] == by_file.metadata["fingerprints"]  # the folder is its file
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ValueError,
        match=r"checkpoints\[1\]\[2\] \(optimizer state\) is a folder \(.*empty\) without optimizer.pt: pass the file",
    ):
        export_gradients(model, [entries[0], (*entries[1][:2], tmp_path / "empty")], (x, y), _loss, progress=False)


def test_an_optimizer_file_cut_short_or_damaged_is_named(tmp_path):
    """A truncated optimizer file was a bare 'OSError: [Errno 22] Invalid argument'."""
    model, checkpoints, data = _trained()
    path = tmp_path / "optimizer.pt"
    torch.save(checkpoints[1][2], path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    entries = [checkpoints[0], (*checkpoints[1][:2], str(path))]
    with pytest.raises(
        ValueError, match=r"checkpoints\[1\]\[2\] \(optimizer state\) cannot be read \(.*optimizer.pt\): .*cut"
    ):
        export_gradients(model, entries, data, _loss, preconditioner="adam", progress=False)
    torch.save(checkpoints[1][2], path)
    with zipfile.ZipFile(path) as z:  # whole, without its data.pkl: found when it is read
        kept = [(i, z.read(i)) for i in z.infolist() if not i.filename.endswith("/data.pkl")]
    with zipfile.ZipFile(path, "w") as z:
        for info, content in kept:
            z.writestr(info, content)
    with pytest.raises(
        ValueError, match=r"checkpoints\[1\]\[2\] \(optimizer state\) cannot be read \(.*\): .*data.pkl"
    ):
        export_gradients(model, entries, data, _loss, preconditioner="adam", progress=False)


def test_layers_pick_their_moments_by_parameter_name():
    model, checkpoints, (x, y) = _trained()
    g = export_gradients(model, checkpoints, (x, y), _loss, layers=["2"], preconditioner="adam", progress=False)
    s = _per_element(checkpoints[0][2])
    last = slice(8 * 5 + 8, None)  # the rows of 2.weight and 2.bias follow 0.weight and 0.bias
    expected = _adam(_reference_grads(model, checkpoints[0][0], x, y)[:, last], {k: v[last] for k, v in s.items()})
    np.testing.assert_allclose(g.matrices[0], expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())


def test_missing_optimizer_state_names_the_checkpoint():
    model, checkpoints, data = _trained()
    entries = [checkpoints[0], checkpoints[1][:2]]
    with pytest.raises(ValueError, match=r"checkpoints\[1\] has no optimizer state, which preconditioner='adam'"):
        export_gradients(model, entries, data, _loss, preconditioner="adam", progress=False)


def test_resume_with_another_optimizer_state_is_refused(tmp_path):
    model, checkpoints, data = _trained()
    store = tmp_path / "store"
    export_gradients(model, checkpoints, data, _loss, preconditioner="adam", store=store, progress=False)
    other = copy.deepcopy(checkpoints[1][2])
    other["state"][0]["exp_avg_sq"] *= 2
    changed = [checkpoints[0], (*checkpoints[1][:2], other)]
    with pytest.raises(ValueError, match="optimizer states saved with the checkpoints differ"):
        export_gradients(model, changed, data, _loss, preconditioner="adam", store=store, progress=False)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_live_optimizer_states_saved_without_deepcopy_are_refused(optimizer):
    """optimizer.state_dict() saved with each checkpoint without copy.deepcopy holds the optimizer's live
    tensors, which later steps update in place: every checkpoint carried the last state, silently."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(N, 5), torch.randint(0, 3, (N,))
    opt = (torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam)(model.parameters(), lr=0.05)
    live, copied = [], []
    for _ in range(2):
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        weights = copy.deepcopy(model.state_dict())
        live.append((weights, 0.05, opt.state_dict()))
        copied.append((weights, 0.05, copy.deepcopy(opt.state_dict())))
    assert live[0][2]["state"][0]["exp_avg_sq"] is live[1][2]["state"][0]["exp_avg_sq"]  # the trap itself
    with pytest.raises(
        ValueError,
        match=r"checkpoints\[0\]\[2\] and checkpoints\[1\]\[2\] \(optimizer states\) hold the very same tensor "
        r"\(exp_avg of the state's entry 0\) while checkpoints\[0\] and checkpoints\[1\] are not one weights "
        r"object or path\. If .*\(both hold step 6 now\), not its own: "
        r"save copy\.deepcopy\(optimizer\.state_dict\(\)\)",
    ):
        export_gradients(model, live, (x, y), _loss, preconditioner="adam", progress=False)
    with pytest.raises(ValueError, match=r"hold the very same tensor"):  # the Kronecker path too
        export_gradients(
            model, live, (x, y), _loss, preconditioner="adam", mode="factored", layers=["0"], progress=False
        )
    with pytest.warns(UserWarning, match="preconditioner=None ignores it"):  # unused: not refused
        export_gradients(model, live, (x, y), _loss, progress=False)
    # deep copies: each checkpoint's own state (step 3, then 6), the float64 Adam rows
    g = export_gradients(model, copied, (x, y), _loss, preconditioner="adam", progress=False)
    assert [float(c[2]["state"][0]["step"]) for c in copied] == [3.0, 6.0]
    for c, (state, _, opt_state) in enumerate(copied):
        expected = _adam(_reference_grads(model, state, x, y), _per_element(opt_state))
        np.testing.assert_allclose(g.matrices[c], expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())
    # the same weights listed twice (other learning rates), and one state object given on purpose to two
    # checkpoints: taken
    twice = [(live[1][0], 0.05, live[0][2]), (live[1][0], 0.01, live[1][2])]
    g = export_gradients(model, twice, (x, y), _loss, preconditioner="adam", progress=False)
    np.testing.assert_array_equal(g.matrices[0], g.matrices[1])
    one = [(copied[0][0], 0.05, copied[1][2]), (copied[1][0], 0.05, copied[1][2])]
    g = export_gradients(model, one, (x, y), _loss, preconditioner="adam", progress=False)
    expected = _adam(_reference_grads(model, copied[0][0], x, y), _per_element(copied[1][2]))
    np.testing.assert_allclose(g.matrices[0], expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())
    # live weights too (model.state_dict() without a copy): said as well
    both = [(model.state_dict(), 0.05, opt.state_dict()), (model.state_dict(), 0.05, opt.state_dict())]
    with pytest.raises(ValueError, match=r"Their weights share tensors too: clone each checkpoint's weights"):
        export_gradients(model, both, (x, y), _loss, preconditioner="adam", progress=False)


def test_bad_preconditioner_arguments_are_clear_errors():
    model, checkpoints, data = _trained()
    with pytest.raises(ValueError, match="preconditioner must be None, 'adam' or 'adam_update', got 'sgd'"):
        export_gradients(model, checkpoints, data, _loss, preconditioner="sgd", progress=False)
    with pytest.raises(ValueError, match="preconditioner='adam_update' needs mode='full'.*mode='factored'"):
        export_gradients(model, checkpoints, data, _loss, mode="factored", preconditioner="adam_update", progress=False)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"checkpoints\[0\]\[2\] \(optimizer state\) is not the state of an Adam"):
        export_gradients(model, [(checkpoints[0][0], 1.0, sgd.state_dict())], data, _loss, progress=False)
    with pytest.raises(TypeError, match=r"checkpoints\[0\]\[2\] \(optimizer state\) must be an optimizer.state_dict"):
        export_gradients(model, [(checkpoints[0][0], 1.0, 3)], data, _loss, progress=False)


def test_an_optimizer_over_other_parameters_is_refused():
    model, checkpoints, data = _trained()
    head_only = torch.optim.Adam(model[2].parameters())
    model(data[0]).sum().backward()
    head_only.step()
    with pytest.raises(ValueError, match=r"holds 2 parameters, the model has 4 \(4 trainable\)"):
        export_gradients(
            model,
            [(checkpoints[0][0], 1.0, head_only.state_dict())],
            data,
            _loss,
            preconditioner="adam",
            progress=False,
        )


def test_a_parameter_without_adam_state_is_named():
    model, checkpoints, data = _trained()
    state = copy.deepcopy(checkpoints[0][2])
    del state["state"][3]
    with pytest.raises(ValueError, match=r"no Adam state \(exp_avg, exp_avg_sq\) for parameter 2.bias"):
        export_gradients(model, [(checkpoints[0][0], 1.0, state)], data, _loss, preconditioner="adam", progress=False)


@pytest.mark.parametrize("value", [-1e-3, float("nan"), float("inf")])
def test_a_second_moment_that_is_negative_or_not_finite_is_refused(value):
    # Adam's exp_avg_sq is a mean of squares: such an entry made rows NaN (or 0) with no error
    model, checkpoints, data = _trained()
    state = copy.deepcopy(checkpoints[0][2])
    state["state"][1]["exp_avg_sq"].view(-1)[2] = value
    with pytest.raises(ValueError, match=r"second moment of 0.bias has 1 negative, NaN or infinite entries of"):
        export_gradients(model, [(checkpoints[0][0], 1.0, state)], data, _loss, preconditioner="adam", progress=False)


@needs_named
def test_parameters_of_groups_with_different_learning_rates_are_refused():
    """Was: a head trained at lr 1e-1 and a body at 1e-3, exported with the checkpoint's 1e-3, had the
    head's influence silently under-weighted 100x (review1 t_group_lr.py). Now refused, naming the
    groups; each group alone (one rate) is exported."""
    model, checkpoints, data = _trained(groups=True)
    opt_state = copy.deepcopy(checkpoints[0][2])
    opt_state["param_groups"][1]["lr"] = 1.0  # the biases
    entry = [(checkpoints[0][0], 0.05, opt_state)]
    with pytest.raises(
        ValueError,
        match=r"param groups of different learning rates \(lr 0.05: 0.weight, 2.weight; lr 1.0: 0.bias, 2.bias\)",
    ):
        export_gradients(model, entry, data, _loss, preconditioner="adam_update", progress=False)
    kronecker = tracin.Projection(8, per_layer=True, kronecker=True)  # 0.weight per token, 2.bias plain
    with pytest.raises(ValueError, match=r"different learning rates \(lr 0.05: 0.weight; lr 1.0: 2.bias\)"):
        export_gradients(
            model,
            entry,
            data,
            _loss,
            layers=["0.weight", "2.bias"],
            projection=kronecker,
            preconditioner="adam",
            progress=False,
        )
    weights = export_gradients(
        model, entry, data, _loss, layers=["0.weight", "2.weight"], preconditioner="adam", progress=False
    )
    assert weights.matrices[0].shape == (N, 8 * 5 + 3 * 8)


@pytest.mark.parametrize(
    "make, named",
    [
        (lambda p: torch.optim.Adam(p, amsgrad=True), r"amsgrad=True"),
        (lambda p: torch.optim.AdamW(p, maximize=True), r"maximize=True"),
        (torch.optim.RAdam, r"RAdam"),
        (torch.optim.NAdam, r"NAdam"),
    ],
)
def test_optimizer_states_that_are_not_adam_are_refused(make, named):
    """Were taken as plain Adam without a word (review1 t_optkinds.py)."""
    model, checkpoints, (x, y) = _trained()
    opt = make(model.parameters())
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    entry = [(model.state_dict(), 0.05, opt.state_dict())]
    with pytest.raises(ValueError, match=rf"parameter 0.weight was trained with {named}.*plain Adam / AdamW"):
        export_gradients(model, entry, (x, y), _loss, preconditioner="adam", progress=False)


@pytest.mark.parametrize("frozen_in_optimizer", [False, True])
def test_a_frozen_parameter_chosen_is_named_as_frozen(frozen_in_optimizer):
    """Was: 'in none of the optimizer's param_groups' or 'an Adam / AdamW optimizer that has taken at
    least one step is needed' (review1 t_frozen.py)."""
    model, _, (x, y) = _trained()
    model.zero_grad(set_to_none=True)
    model[0].weight.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if frozen_in_optimizer or p.requires_grad])
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    entry = [(model.state_dict(), 0.05, opt.state_dict())]
    with pytest.raises(
        ValueError, match=r"parameter 0.weight is frozen \(requires_grad=False\) .* leave it out of layers="
    ):
        # named exactly: a pattern such as "0" matching trainable parameters too leaves the frozen ones out
        export_gradients(
            model, entry, (x, y), _loss, layers=["0.weight", "0.bias"], preconditioner="adam", progress=False
        )


def test_a_frozen_bias_in_factored_mode_is_pointed_to_mode_full():
    """review299 F2: "leave it out of layers=" cannot be followed where a mode takes a layer's weight and bias
    together (factored, last_layer); the refusal points to mode='full' with layers= naming the trainable ones."""
    model, _, (x, y) = _trained()
    model.zero_grad(set_to_none=True)
    model[2].bias.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    entry = [(model.state_dict(), 0.05, opt.state_dict())]
    for mode, layers in (("factored", ["2.weight", "2.bias"]), ("last_layer", None)):  # as factored's refusal says
        with pytest.raises(ValueError, match=r"parameter 2.bias is frozen .*export such a layer with mode='full'"):
            export_gradients(
                model, entry, (x, y), _loss, mode=mode, layers=layers, preconditioner="adam", progress=False
            )
    rows = export_gradients(model, entry, (x, y), _loss, layers=["2.weight"], preconditioner="adam", progress=False)
    assert rows.matrices[0].shape[1] == model[2].weight.numel()


def _layer_matrices(g: np.ndarray) -> list[np.ndarray]:
    """Per linear layer of the MLP, (n, out, in + 1) [weight | bias] gradients from (n, d) rows."""
    n, out = len(g), []
    start = 0
    for o, i in ((8, 5), (3, 8)):
        w = g[:, start : start + o * i].reshape(n, o, i)
        b = g[:, start + o * i : start + o * i + o].reshape(n, o, 1)
        out.append(np.concatenate([w, b], axis=2))
        start += o * i + o
    return out


def _layer_v(opt_state: dict) -> list[np.ndarray]:
    """Per layer the bias-corrected [v_weight | v_bias] (out, in + 1), float64."""
    s = opt_state["state"]
    b2, t = opt_state["param_groups"][0]["betas"][1], float(s[0]["step"])
    return [
        np.hstack([s[k]["exp_avg_sq"].double().numpy(), s[k + 1]["exp_avg_sq"].double().numpy()[:, None]]) / (1 - b2**t)
        for k in (0, 2)
    ]


def _factored_products(g) -> list[np.ndarray]:
    return [
        np.einsum("np,nq->npq", np.asarray(left, np.float64), np.asarray(right, np.float64))
        for left, right in zip(g.left, g.right, strict=True)
    ]


def test_factored_adam_scales_by_the_rank_one_factorisation_of_v():
    model, checkpoints, (x, y) = _trained()
    g = export_gradients(model, checkpoints[:1], (x, y), _loss, mode="factored", preconditioner="adam", progress=False)
    full = _layer_matrices(_reference_grads(model, checkpoints[0][0], x, y))
    for got, grad, v in zip(_factored_products(g), full, _layer_v(checkpoints[0][2]), strict=True):
        r, c = v.sum(1), v.sum(0)
        expected = grad * np.sqrt(r.sum() / r)[:, None] / np.sqrt(c)[None, :]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert g.metadata["preconditioner"]["kind"] == "adam" and "rank-one" in g.metadata["preconditioner"]["factored"]


def test_factored_adam_is_exact_for_a_rank_one_second_moment():
    model, checkpoints, (x, y) = _trained()
    state, lr, opt_state = copy.deepcopy(checkpoints[0])
    rng = np.random.default_rng(5)
    opt_state["param_groups"][0]["eps"] = 0.0
    for k, (o, i) in zip((0, 2), ((8, 5), (3, 8)), strict=True):  # v = r c^T / sum(r), as Adafactor keeps it
        r, c = rng.uniform(0.5, 2, o), rng.uniform(0.5, 2, i + 1)
        v = np.outer(r, c) / r.sum()
        opt_state["state"][k]["exp_avg_sq"] = torch.tensor(v[:, :i], dtype=torch.float32)
        opt_state["state"][k + 1]["exp_avg_sq"] = torch.tensor(v[:, i], dtype=torch.float32)
    g = export_gradients(
        model, [(state, lr, opt_state)], (x, y), _loss, mode="factored", preconditioner="adam", progress=False
    )
    full = _layer_matrices(_reference_grads(model, state, x, y))
    for got, grad, v in zip(_factored_products(g), full, _layer_v(opt_state), strict=True):
        expected = grad / np.sqrt(v)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@needs_named
def test_a_tensor_learning_rate_and_its_float_are_one_rate():
    """Was refused as 'lr 0.001: ...; lr 0.001: ...' (review5 optbattery.py): tensor(1e-3) is
    0.0010000000474974513 as a float, compared exactly and printed with :g. Now equal to 1e-6 relative,
    and rates that differ are printed in full."""
    model, checkpoints, data = _trained(groups=True)
    opt_state = copy.deepcopy(checkpoints[0][2])
    opt_state["param_groups"][0]["lr"] = torch.tensor(0.05)
    g = export_gradients(
        model, [(checkpoints[0][0], 0.05, opt_state)], data, _loss, preconditioner="adam", progress=False
    )
    expected = _adam(_reference_grads(model, checkpoints[0][0], *data), _per_element(opt_state))
    np.testing.assert_allclose(g.matrices[0], expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())
    opt_state["param_groups"][0]["lr"] = torch.tensor(0.0501)
    with pytest.raises(ValueError, match=r"lr 0.0500999\d+: 0.weight, 2.weight; lr 0.05: 0.bias"):
        export_gradients(
            model, [(checkpoints[0][0], 0.05, opt_state)], data, _loss, preconditioner="adam", progress=False
        )


class _Bag(nn.Module):
    """A sparse-gradient embedding bag-of-tokens classifier (the model torch.optim.SparseAdam is for)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e, self.h = nn.Embedding(20, 4, sparse=True), nn.Linear(4, 3)

    def forward(self, ids):
        return self.h(self.e(ids).mean(1))


@needs_named
def test_sparse_adam_is_taken_and_an_old_radam_state_is_refused():
    """Was: SparseAdam (group keys lr, betas, eps, maximize) refused as 'RAdam', and an RAdam state
    saved without maximize (torch < 2.0) taken as Adam (review5 sparseadam.py, optbattery.py).
    SparseAdam's step on a row is Adam's (bias-corrected by the global step); rows without a gradient
    skip it, so each row's exp_avg_sq is what its next step divides by: rows g / (sqrt(v_hat) + eps)."""
    model = _Bag()
    g = torch.Generator().manual_seed(2)
    ids, y = torch.randint(0, 20, (6, 3), generator=g), torch.randint(0, 3, (6,), generator=g)
    opt = torch.optim.SparseAdam(list(model.e.named_parameters(prefix="e")), lr=0.05, betas=(0.8, 0.99), eps=1e-6)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids), y).backward()
        opt.step()
    state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    got = export_gradients(
        model, [(state, 0.05, opt_state)], (ids, y), _loss, layers=["e.weight"], preconditioner="adam", progress=False
    )
    ref = copy.deepcopy(model).double()
    grads = np.stack(
        [
            torch.autograd.grad(nn.functional.cross_entropy(ref(ids[i : i + 1]), y[i : i + 1]), ref.e.weight)[0]
            .to_dense()
            .reshape(-1)
            .numpy()
            for i in range(6)
        ]
    )
    s = opt_state["state"][0]
    v_hat = s["exp_avg_sq"].double().numpy().reshape(-1) / (1 - 0.99 ** float(s["step"]))
    expected = grads / (np.sqrt(v_hat) + 1e-6)
    np.testing.assert_allclose(got.matrices[0], expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())

    model, checkpoints, (x, y) = _trained()
    radam = torch.optim.RAdam(model.parameters())
    nn.functional.cross_entropy(model(x), y).backward()
    radam.step()
    old = copy.deepcopy(radam.state_dict())
    for group in old["param_groups"]:
        for key in ("maximize", "capturable", "decoupled_weight_decay", "differentiable"):
            group.pop(key, None)
    with pytest.raises(ValueError, match=r"parameter 0.weight was trained with RAdam"):
        export_gradients(model, [(model.state_dict(), 0.05, old)], (x, y), _loss, preconditioner="adam", progress=False)


@needs_named
def test_sparse_adam_is_refused_for_the_next_step_direction():
    """Was exported (review9 sparse_adam.py): adam_update moved the embedding rows the example never
    touches by their momentum (0.77 of the largest entry) while SparseAdam's real step leaves them be."""
    model = _Bag()
    ids, y = torch.randint(0, 20, (6, 3), generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2] * 2)
    opt = torch.optim.SparseAdam(list(model.e.named_parameters(prefix="e")), lr=0.05)
    opt.zero_grad()
    nn.functional.cross_entropy(model(ids), y).backward()
    opt.step()
    checkpoints = [(model.state_dict(), 0.05, opt.state_dict())]
    with pytest.raises(ValueError, match=r"'adam_update' cannot follow torch.optim.SparseAdam.*preconditioner='adam'"):
        export_gradients(
            model, checkpoints, (ids, y), _loss, layers=["e.weight"], preconditioner="adam_update", progress=False
        )
    export_gradients(model, checkpoints, (ids, y), _loss, layers=["e.weight"], preconditioner="adam", progress=False)


def test_a_parameter_the_training_never_reached_is_told_so():
    """Was told that 'an Adam / AdamW optimizer that has taken at least one step is needed' although it
    took 3 (review5 unused.py): a trainable module used at export only got no gradient, so no state."""
    model, checkpoints, (x, y) = _trained()
    model.zero_grad(set_to_none=True)
    opt = torch.optim.Adam(model.parameters())
    nn.functional.cross_entropy(model[0](x)[:, :3], y).backward()  # the head (2.*) takes no part
    opt.step()
    with pytest.raises(ValueError, match=r"parameter 2.weight, while the optimizer holds some for other.*never "):
        export_gradients(
            model, [(model.state_dict(), 0.05, opt.state_dict())], (x, y), _loss, preconditioner="adam", progress=False
        )


def test_a_state_keyed_by_parameter_names_is_matched_by_them():
    """torch.distributed.checkpoint.state_dict.get_optimizer_state_dict (DCP, FSDP2) keys the state and each
    group's params by the parameters' names, with no param_names. Was: matched by position, so an optimizer
    over [2.*, 0.*] (equal shapes) gave 0.weight the moments of 2.weight silently (rows up to 5.7x off), and a
    decay / no-decay split was refused as unnamed."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)
    p = dict(model.named_parameters())
    for groups in (
        [{"params": [p[n] for n in ("2.weight", "2.bias", "0.weight", "0.bias", "4.weight", "4.bias")]}],
        [{"params": [p[n] for n in p if n.endswith("weight")]}, {"params": [p[n] for n in p if n.endswith("bias")]}],
    ):
        opt = torch.optim.Adam(groups, lr=0.05, betas=(0.85, 0.99), eps=1e-6)
        for scale in (1.0, 3.0, 9.0):  # the two equal-shaped layers' moments differ
            opt.zero_grad()
            nn.functional.cross_entropy(model(x * scale), y).backward()
            opt.step()
        state = copy.deepcopy(model.state_dict())
        opt_state = copy.deepcopy(get_optimizer_state_dict(model, opt))
        assert all(isinstance(k, str) for k in opt_state["state"])
        got = export_gradients(model, [(state, 0.05, opt_state)], (x, y), _loss, preconditioner="adam", progress=False)
        entries = [opt_state["state"][n] for n in p]
        v = np.concatenate(
            [e["exp_avg_sq"].double().numpy().reshape(-1) / (1 - 0.99 ** float(e["step"])) for e in entries]
        )
        expected = _reference_grads(model, state, x, y) / (np.sqrt(v) + 1e-6)
        np.testing.assert_allclose(
            np.asarray(got.matrices[0], np.float64), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max()
        )


def test_a_state_keyed_by_digit_names_is_matched_by_them_and_a_flattened_one_is_told_apart():
    """A module whose parameters are registered as "0", "1", "2" (a ParameterList's names): its state from
    get_optimizer_state_dict over ["1", "0", "2"] (equal shapes) was matched by position, the digits read as
    torch's ids, so "0" took the moments of "1" silently (rows up to 107% off). A state flattened by
    StateDictOptions(flatten_optimizer_state_dict=True) is refused, saying so."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    class Digits(nn.Module):
        def __init__(self):
            super().__init__()
            for i, shape in enumerate([(4, 4), (4, 4), (4, 3)]):
                self.register_parameter(str(i), nn.Parameter(torch.randn(*shape) * 0.5))

        def forward(self, x):
            a, b, c = (getattr(self, str(i)) for i in range(3))
            return torch.tanh(x @ a) @ c + torch.tanh(3 * x @ b) @ c

    torch.manual_seed(0)
    model = Digits()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)
    opt = torch.optim.Adam([getattr(model, n) for n in ("1", "0", "2")], lr=0.05, betas=(0.85, 0.99), eps=1e-6)
    state = _stepped(opt, model, x, y)
    opt_state = copy.deepcopy(get_optimizer_state_dict(model, opt))
    assert opt_state["param_groups"][0]["params"] == ["1", "0", "2"]
    got = export_gradients(model, [(state, 0.05, opt_state)], (x, y), _loss, preconditioner="adam", progress=False)
    entries = [opt_state["state"][n] for n in ("0", "1", "2")]
    v = np.concatenate([e["exp_avg_sq"].double().numpy().reshape(-1) / (1 - 0.99 ** float(e["step"])) for e in entries])
    expected = _reference_grads(model, state, x, y) / (np.sqrt(v) + 1e-6)
    np.testing.assert_allclose(
        np.asarray(got.matrices[0], np.float64), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max()
    )
    flat = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    with pytest.raises(ValueError, match=r"flattened state .*without that option"):
        export_gradients(model, [(state, 0.05, copy.deepcopy(flat))], (x, y), _loss, preconditioner="adam")


def _stepped(opt: torch.optim.Optimizer, model: nn.Module, x, y, scales=(1.0, 3.0, 9.0)) -> dict:
    """Steps `opt` once per scale of the inputs (moments that differ between layers); the model's weights."""
    for scale in scales:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x * scale), y).backward()
        opt.step()
    return copy.deepcopy(model.state_dict())


def _square_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 4 -> 4 -> 4 -> 3 tanh MLP whose layers 0 and 2 have equal shapes, and its data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)


def test_a_state_of_other_moments_names_them_and_an_empty_one_asks_for_a_step():
    """An Adamax state (exp_avg, exp_inf, step 3) was told that 'an Adam / AdamW optimizer that has taken
    at least one step is needed'; so was bitsandbytes' 8-bit Adam (quantized state1 / state2)."""
    model, x, y = _square_mlp()
    opt = torch.optim.Adamax(model.parameters(), lr=0.01)
    state = _stepped(opt, model, x, y)
    with pytest.raises(
        ValueError,
        match=r"the state of parameter 0\.weight holds exp_avg, exp_inf, step, not Adam's exp_avg and exp_avg_sq: "
        r"torch\.optim\.Adamax's .*32-bit torch\.optim\.Adam / AdamW .* preconditioner=None$",
    ):
        export_gradients(model, [(state, 0.01, opt.state_dict())], (x, y), _loss, preconditioner="adam", progress=False)
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    _stepped(adam, model, x, y, scales=(1.0,))
    eight_bit = copy.deepcopy(adam.state_dict())  # bitsandbytes' Adam8bit layout, in Adam's param groups
    for key, entry in eight_bit["state"].items():
        shape = entry["exp_avg"].shape
        eight_bit["state"][key] = {
            "step": 1,
            "state1": torch.zeros(shape, dtype=torch.uint8),
            "state2": torch.zeros(shape, dtype=torch.uint8),
            "qmap1": torch.linspace(-1, 1, 256),
            "absmax1": torch.ones(1),
        }
    with pytest.raises(ValueError, match=r"holds absmax1, qmap1, state1, state2, step, .*quantized 8-bit moments"):
        export_gradients(model, [(state, 0.01, eight_bit)], (x, y), _loss, preconditioner="adam", progress=False)
    never = torch.optim.Adam(model.parameters(), lr=0.01).state_dict()  # no step taken: no entries
    emptied = copy.deepcopy(adam.state_dict())
    emptied["state"] = {k: {} for k in emptied["state"]}
    for unstepped in (never, emptied):
        with pytest.raises(ValueError, match=r"no Adam state .* that has taken at least one step is needed$"):
            export_gradients(model, [(state, 0.01, unstepped)], (x, y), _loss, preconditioner="adam", progress=False)


@pytest.mark.parametrize("keyed", ["ids", "names"])
def test_an_empty_param_group_is_not_counted(keyed):
    """AdamW([{decay...}, {"params": [], "weight_decay": 0}]) over a model without biases (a decay split
    whose no-decay group is empty) was refused as several unnamed groups; it has one order, checked by
    position (or matched by name for a state keyed by names)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 3, bias=False))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)
    opt = torch.optim.AdamW(
        [{"params": list(model.parameters()), "weight_decay": 0.01}, {"params": [], "weight_decay": 0.0}],
        lr=0.05,
        betas=(0.85, 0.99),
        eps=1e-6,
    )
    state = _stepped(opt, model, x, y)
    opt_state = copy.deepcopy(opt.state_dict() if keyed == "ids" else get_optimizer_state_dict(model, opt))
    assert [len(g["params"]) for g in opt_state["param_groups"]] == [2, 0]
    got = export_gradients(model, [(state, 0.05, opt_state)], (x, y), _loss, preconditioner="adam", progress=False)
    entries = list(opt_state["state"].values())  # in the model's order, both ways
    v = np.concatenate([e["exp_avg_sq"].double().numpy().reshape(-1) / (1 - 0.99 ** float(e["step"])) for e in entries])
    expected = _reference_grads(model, state, x, y) / (np.sqrt(v) + 1e-6)
    np.testing.assert_allclose(
        np.asarray(got.matrices[0], np.float64), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max()
    )


@pytest.mark.parametrize("split", [False, True])
def test_params_mixing_names_with_ids_are_refused(split):
    """A state whose params are partly names (as get_optimizer_state_dict keys them) and partly torch's
    ids: one group was matched by position whatever its names said (layers 0 and 2 of one shape swapped
    passed silently); two groups were refused as having no parameter names."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, x, y = _square_mlp()
    p = dict(model.named_parameters())
    order = ["2.weight", "2.bias", "0.weight", "0.bias", "4.weight", "4.bias"]
    groups = [{"params": [p[n] for n in order[:2]]}, {"params": [p[n] for n in order[2:]]}]
    opt = torch.optim.Adam(groups if split else [{"params": [p[n] for n in order]}], lr=0.05)
    state = _stepped(opt, model, x, y)
    mixed = copy.deepcopy(get_optimizer_state_dict(model, opt))
    ids = {n: i for i, n in enumerate(order[2:])}  # the names after the first two become ids
    mixed["state"] = {ids.get(k, k): e for k, e in mixed["state"].items()}
    for group in mixed["param_groups"]:
        group["params"] = [ids.get(k, k) for k in group["params"]]
    with pytest.raises(
        ValueError, match=r"params mix parameter names \('2\.weight', '2\.bias'\) with ids \(0, 1, 2 and 1 more\)"
    ):
        export_gradients(model, [(state, 0.05, mixed)], (x, y), _loss, preconditioner="adam", progress=False)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "model."])
def test_a_state_keyed_by_prefixed_names_is_stripped_or_told_how_to_rename(prefix):
    """A state keyed by names (get_optimizer_state_dict of a DataParallel or compiled model) gives the
    plain state's rows; under a LightningModule's "model." the advice (which read g['param_names'], a
    KeyError for such a state) renames it to the same rows."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, x, y = _square_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    state = _stepped(opt, model, x, y)
    plain = copy.deepcopy(get_optimizer_state_dict(model, opt))
    prefixed = copy.deepcopy(plain)
    prefixed["state"] = {prefix + k: e for k, e in prefixed["state"].items()}
    for group in prefixed["param_groups"]:
        group["params"] = [prefix + k for k in group["params"]]

    def rows(opt_state: dict) -> np.ndarray:
        got = export_gradients(model, [(state, 0.05, opt_state)], (x, y), _loss, preconditioner="adam", progress=False)
        return np.asarray(got.matrices[0])

    if prefix == "model.":
        with pytest.raises(
            ValueError,
            match=r"under the prefix 'model\.' .* g\['param_names'\] = \[n\.removeprefix\('model\.'\) for n in "
            r"g\.get\('param_names', g\['params'\]\)\]$",
        ):
            rows(prefixed)
        for g in prefixed["param_groups"]:  # the advice, as worded
            g["param_names"] = [n.removeprefix("model.") for n in g.get("param_names", g["params"])]
    np.testing.assert_array_equal(rows(prefixed), rows(plain))


class _DigitNamed(nn.Module):
    """Parameters registered at the top under `names` (4 x 4 each, "0", "1" as a ParameterList's), each layer
    scaled by its place so that their moments differ."""

    def __init__(self, names: Sequence[str]):
        super().__init__()
        self.names = list(names)
        for n in names:
            self.register_parameter(n, nn.Parameter(torch.randn(4, 4) * 0.5))

    def forward(self, x):
        h = x
        for i, n in enumerate(self.names):
            h = torch.tanh((i + 1) * h @ getattr(self, n))
        return h[:, :3] + h[:, 3:]


@pytest.mark.parametrize(
    ("names", "order"),
    [(["0", "w"], ["0", "w"]), (["1", "0"], ["0", "1"]), (["0", "1", "2"], ["0", "1"])],
    ids=["a-digit-beside-a-name", "digits-registered-out-of-order", "an-optimizer-over-some-digit-names"],
)
def test_digit_names_the_model_has_are_names_whatever_their_order(names, order):
    """review322 F1: get_optimizer_state_dict keys a model's top-level "0", "1" by name; digits were taken for
    torch's ids whenever they ran 0, 1, ...: registered as "1", "0" they were matched by position (rows up to
    7384x off, silently), "0" beside "w" was refused as names mixed with ids, and an optimizer over "0", "1" of
    three was refused as unnamed. The model's own names are names."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    torch.manual_seed(0)
    model = _DigitNamed(names)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)
    opt = torch.optim.Adam([getattr(model, n) for n in order], lr=0.05, betas=(0.85, 0.99), eps=1e-6)
    state = _stepped(opt, model, x, y)
    opt_state = copy.deepcopy(get_optimizer_state_dict(model, opt))
    assert opt_state["param_groups"][0]["params"] == order
    layers = None if len(order) == len(names) else order
    got = export_gradients(
        model, [(state, 0.05, opt_state)], (x, y), _loss, preconditioner="adam", layers=layers, progress=False
    )
    chosen = [n for n in names if n in order]  # the rows' order: model.named_parameters()
    model.load_state_dict(state)
    rows = []
    for i in range(N):
        model.zero_grad()
        _loss(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        rows.append(np.concatenate([getattr(model, n).grad.double().numpy().reshape(-1) for n in chosen]))
    entries = [opt_state["state"][n] for n in chosen]
    v = np.concatenate([e["exp_avg_sq"].double().numpy().reshape(-1) / (1 - 0.99 ** float(e["step"])) for e in entries])
    expected = np.array(rows) / (np.sqrt(v) + 1e-6)
    np.testing.assert_allclose(
        np.asarray(got.matrices[0], np.float64), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max()
    )


def test_a_digit_named_parameter_the_optimizer_misses_is_told_with_the_names_it_holds():
    """review326 F2: the refusal for a model's "2" left out of an optimizer over its "0" and "1" read them as
    torch's ids and listed no names ("it names its 0 parameters")."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    torch.manual_seed(0)
    model = _DigitNamed(["0", "1", "2"])
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)
    opt = torch.optim.Adam([getattr(model, n) for n in ("0", "1")], lr=0.05)
    state = _stepped(opt, model, x, y)
    opt_state = copy.deepcopy(get_optimizer_state_dict(model, opt))
    with pytest.raises(
        ValueError,
        match=r"parameter 2 is in none of the optimizer's param_groups \(it names its 2 parameters '0', '1'\)",
    ):
        export_gradients(model, [(state, 0.05, opt_state)], (x, y), _loss, preconditioner="adam", progress=False)


def test_torch_ids_written_as_strings_are_positions_not_names():
    """A state whose ids were written as strings ("0", "1", ... in order, as a JSON round trip leaves them)
    is read by position like torch's own ids: the digits are not the model's names."""
    model, x, y = _square_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    state = _stepped(opt, model, x, y)
    ids = copy.deepcopy(opt.state_dict())
    texts = copy.deepcopy(ids)
    texts["state"] = {str(k): e for k, e in texts["state"].items()}
    for group in texts["param_groups"]:
        group["params"] = [str(k) for k in group["params"]]
    assert texts["param_groups"][0]["params"] == ["0", "1", "2", "3", "4", "5"]

    def rows(opt_state: dict) -> np.ndarray:
        got = export_gradients(model, [(state, 0.05, opt_state)], (x, y), _loss, preconditioner="adam", progress=False)
        return np.asarray(got.matrices[0])

    np.testing.assert_array_equal(rows(texts), rows(ids))


def test_a_state_whose_only_group_is_empty_says_it_holds_no_parameters():
    """Empty groups are not counted, but a state of empty groups only is still read as one group: it is
    told to hold 0 of the model's parameters, not that a parameter is in none of its groups."""
    model, x, y = _square_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    state = _stepped(opt, model, x, y)
    empty = copy.deepcopy(opt.state_dict())
    empty["state"] = {}
    empty["param_groups"][0]["params"] = []
    with pytest.raises(
        ValueError, match=r"holds 0 parameters, the model has 6 \(6 trainable\): without parameter names"
    ):
        export_gradients(model, [(state, 0.05, empty)], (x, y), _loss, preconditioner="adam", progress=False)


# review338: the all-zero Adam moments refusal looks at the whole optimizer state, not at the layers exported


def test_layers_whose_moments_are_all_zero_in_a_trained_state_are_taken_not_refused():
    """A layer that no gradient reached (its exp_avg and exp_avg_sq 0) while the others trained: the state is
    not a never-stepped one (the others' exp_avg_sq are not 0), so layers= naming only that layer is divided by
    eps, not refused; the refusal (every moment 0) is for the state as a whole, with its non-Adam entries left out."""
    model, x, y = _square_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.85, 0.99), eps=1e-6)
    state = _stepped(opt, model, x, y)
    opt_state = copy.deepcopy(opt.state_dict())
    for k, e in opt_state["state"].items():  # 0.weight, 0.bias: no moments; the others: exp_avg decayed to 0 alone
        for m in ("exp_avg", "exp_avg_sq") if k in (0, 1) else ("exp_avg",):
            e[m].zero_()
    with pytest.warns(RuntimeWarning, match=r"second moment \(v\) of '0\.weight' is 0 .*16 of 16 entries"):
        got = export_gradients(
            model, [(state, 0.05, opt_state)], (x, y), _loss, layers=["0.weight"], preconditioner="adam", progress=False
        )
    expected = _reference_grads(model, state, x, y)[:, :16] / 1e-6
    np.testing.assert_allclose(
        np.asarray(got.matrices[0], np.float64), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max()
    )
    for e in opt_state["state"].values():
        for m in ("exp_avg", "exp_avg_sq"):
            e[m].zero_()
    opt_state["state"][5] = {"step": torch.tensor(3.0)}  # an entry without moments: not Adam's, not counted
    with pytest.raises(
        ValueError, match=r"every Adam moment \(exp_avg, exp_avg_sq\) of every parameter is 0 \(step 3\)"
    ):
        export_gradients(
            model, [(state, 0.05, opt_state)], (x, y), _loss, layers=["0.weight"], preconditioner="adam", progress=False
        )
