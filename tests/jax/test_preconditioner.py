"""Optimizer-aware gradients in tracin.jax from real optax.adam states, against float64 NumPy (the
conftest's hand-written backprop and Adam's formulas), and against tracin.torch on the same weights
and optimizer states (the same influence)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

optax = pytest.importorskip("optax")  # the "test" extra

import tracin  # noqa: E402
from tracin.jax import export_gradients  # noqa: E402

B1, B2, EPS = 0.85, 0.99, 1e-6
ORDER = [("l1", "bias", "b1"), ("l1", "kernel", "w1"), ("l2", "bias", "b2"), ("l2", "kernel", "w2")]


def _trained(mlp, x, y, steps=(2, 3), opt=None):
    """[(params, lr, optax state)] after each phase of `opt` (optax.adam) training from mlp.params[0]."""
    return mlp.trained(x, y, opt or optax.adam(0.05, b1=B1, b2=B2, eps=EPS), steps)


def _torch_weights(params) -> dict[str, np.ndarray]:
    return {
        "w1": np.asarray(params["l1"]["kernel"]).T,
        "b1": np.asarray(params["l1"]["bias"]),
        "w2": np.asarray(params["l2"]["kernel"]).T,
        "b2": np.asarray(params["l2"]["bias"]),
    }


def _flat(tree) -> np.ndarray:
    """float64 entries of a params-shaped tree in the row order (l1 bias, l1 kernel, l2 bias, l2 kernel)."""
    return np.concatenate([np.asarray(tree[a][b], np.float64).reshape(-1) for a, b, _ in ORDER])


def _adam_state(state):
    """The one ScaleByAdamState of an optax state, however deep in chains and wrappers."""
    is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)  # noqa: E731
    (found,) = [s for s in jax.tree_util.tree_leaves(state, is_leaf=is_adam) if is_adam(s)]
    return found


def _reference(mlp, params, state, x, y, kind):
    ref = mlp.reference_grads(_torch_weights(params), x, y)
    g = mlp.reference_rows(ref, [k for *_, k in ORDER], transpose={"w1", "w2"})
    if kind is None:
        return g
    adam = _adam_state(state)
    m, v, t = _flat(adam.mu), _flat(adam.nu), float(adam.count)
    if kind == "adam":
        return g / (np.sqrt(v / (1 - B2**t)) + EPS)
    m2, v2 = B1 * m + (1 - B1) * g, B2 * v + (1 - B2) * g**2
    return (m2 / (1 - B1 ** (t + 1))) / (np.sqrt(v2 / (1 - B2 ** (t + 1))) + EPS)


@pytest.mark.parametrize("kind", ["adam", "adam_update"])
def test_rows_follow_adam_formulas_from_the_optax_state(mlp, data, kind):
    x, y = data
    checkpoints = _trained(mlp, x, y)
    g = export_gradients(
        mlp.loss_fn,
        checkpoints,
        (x, y),
        preconditioner=kind,
        batch_size=16,
        preconditioner_options={"b1": B1, "b2": B2, "eps": EPS},
        progress=False,
    )
    for c, (params, _, state) in enumerate(checkpoints):
        expected = _reference(mlp, params, state, x, y, kind)
        np.testing.assert_allclose(
            np.asarray(g.matrices[c], np.float64), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max()
        )
    assert g.metadata["preconditioner"] == {"kind": kind, "b1": B1, "b2": B2, "eps": EPS}
    assert [int(_adam_state(s).count) for *_, s in checkpoints] == [2, 5]


def test_missing_or_wrong_optimizer_states_are_clear_errors(mlp, data):
    x, y = data
    checkpoints = _trained(mlp, x, y)
    with pytest.raises(ValueError, match=r"checkpoints\[0\] has no optimizer state, which preconditioner='adam'"):
        export_gradients(mlp.loss_fn, [c[:2] for c in checkpoints], (x, y), preconditioner="adam", progress=False)
    sgd_state = optax.sgd(0.1, momentum=0.9).init(mlp.params[0])
    with pytest.raises(
        ValueError,
        match=r"checkpoints\[0\]\[2\] \(optimizer state\) must hold exactly one optax "
        r"ScaleByAdamState",
    ):
        export_gradients(mlp.loss_fn, [(mlp.params[0], 1.0, sgd_state)], (x, y), progress=False)
    with pytest.raises(ValueError, match=r"preconditioner_options: unknown keys \['beta1'\]"):
        export_gradients(
            mlp.loss_fn,
            checkpoints,
            (x, y),
            preconditioner="adam",
            preconditioner_options={"beta1": 0.9},
            progress=False,
        )
    with pytest.raises(ValueError, match=r"preconditioner_options\['b2'\] must be in \[0, 1\)"):
        export_gradients(
            mlp.loss_fn, checkpoints, (x, y), preconditioner="adam", preconditioner_options={"b2": 1.0}, progress=False
        )
    fresh = optax.adam(0.1).init(mlp.params[0])
    count = r"checkpoints\[0\]\[2\] \(optimizer state\): its 'count' \(the Adam step count\)"
    with pytest.raises(ValueError, match=rf"{count} is 0; a whole number >= 1 is needed"):
        export_gradients(mlp.loss_fn, [(mlp.params[0], 1.0, fresh)], (x, y), preconditioner="adam", progress=False)
    # review155 F5: the count is the state's, named as such (not a leaf's: "the step count of b1" read as
    # Adam's b1), and a count of another shape, or not a whole number, is refused too
    trained = checkpoints[0][2]
    for bad, why in ((jnp.ones((1, 1), jnp.int32), r"must be a scalar \(0-d\), got shape \(1, 1\)"), (1.5, "is 1.5")):
        state = jax.tree_util.tree_map(
            lambda n, bad=bad: n._replace(count=bad) if type(n).__name__ == "ScaleByAdamState" else n,
            trained,
            is_leaf=lambda n: type(n).__name__ == "ScaleByAdamState",
        )
        with pytest.raises(ValueError, match=rf"{count} {why}") as info:
            export_gradients(mlp.loss_fn, [(mlp.params[0], 1.0, state)], (x, y), preconditioner="adam", progress=False)
        assert "l1/" not in str(info.value) and "l2/" not in str(info.value)
    with pytest.warns(UserWarning, match="preconditioner=None ignores it"):  # an unused state's count is not checked
        export_gradients(mlp.loss_fn, [(mlp.params[0], 1.0, fresh)], (x, y), progress=False)
    with pytest.raises(ValueError, match="preconditioner='adam' needs mode='full' in tracin.jax"):
        export_gradients(
            mlp.loss_fn,
            checkpoints,
            (x, y),
            mode="last_layer",
            layers=["l2"],
            layer_input=mlp.hidden,
            preconditioner="adam",
            progress=False,
        )
    other = (_adam_state(optax.adam(0.1).init({"l1": mlp.params[0]["l1"]}))._replace(count=jnp.ones([], jnp.int32)),)
    with pytest.raises(ValueError, match="the Adam moments have no leaf 'l2/bias'"):
        export_gradients(mlp.loss_fn, [(mlp.params[0], 1.0, other)], (x, y), preconditioner="adam", progress=False)


ADAM_LIKE = {
    "adamw": lambda: optax.adamw(0.05, b1=B1, b2=B2, eps=EPS, weight_decay=0.1),
    "chain with clipping and a schedule": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.adam(optax.exponential_decay(0.05, 2, 0.5), b1=B1, b2=B2, eps=EPS)
    ),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=0.05, b1=B1, b2=B2, eps=EPS),
    "masked (all leaves)": lambda: optax.masked(
        optax.adam(0.05, b1=B1, b2=B2, eps=EPS), lambda p: jax.tree_util.tree_map(lambda _: True, p)
    ),
    "inject_hyperparams of adamw": lambda: optax.inject_hyperparams(optax.adamw)(
        learning_rate=0.05, b1=B1, b2=B2, eps=EPS, weight_decay=0.1
    ),
    # inject_hyperparams around the step size alone records step_size / learning_rate, no b1, b2, eps
    "a step size alone injected after scale_by_adam": lambda: optax.chain(
        optax.scale_by_adam(B1, B2, EPS), optax.inject_hyperparams(optax.scale)(step_size=-0.05)
    ),
    "a learning rate alone injected around the chain": lambda: optax.inject_hyperparams(
        lambda learning_rate: optax.chain(optax.scale_by_adam(B1, B2, EPS), optax.scale(-learning_rate))
    )(learning_rate=0.05),
}


def _assert_adam_rows(mlp, x, y, checkpoints, given=None) -> None:
    """The rows of an export with preconditioner="adam" of `given` (default: `checkpoints`, the
    (params, lr, optax state) of _trained) equal the float64 Adam formula on `checkpoints`' states."""
    g = export_gradients(
        mlp.loss_fn,
        checkpoints if given is None else given,
        (x, y),
        preconditioner="adam",
        preconditioner_options={"b1": B1, "b2": B2, "eps": EPS},
        progress=False,
    )
    for c, (params, _, state) in enumerate(checkpoints):
        expected = _reference(mlp, params, state, x, y, "adam")
        np.testing.assert_allclose(
            np.asarray(g.matrices[c], np.float64), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max()
        )


@pytest.mark.parametrize("kind", ADAM_LIKE)
def test_adam_states_in_chains_and_wrappers_are_taken(mlp, data, kind):
    x, y = data
    _assert_adam_rows(mlp, x, y, _trained(mlp, x, y, opt=ADAM_LIKE[kind]()))


def test_an_optimizer_state_inside_a_flax_train_state_is_taken(mlp, data):
    # the whole TrainState as the third item (a pytree dataclass, not a tuple, list or dict)
    from flax.training import train_state

    x, y = data
    checkpoints = _trained(mlp, x, y)
    wrapped = [
        (params, lr, train_state.TrainState(step=0, apply_fn=None, params=params, tx=optax.adam(lr), opt_state=state))
        for params, lr, state in checkpoints
    ]
    _assert_adam_rows(mlp, x, y, checkpoints, wrapped)


NOT_ADAM = {
    "amsgrad": (lambda: optax.amsgrad(0.05), r"not Adam: ScaleByAmsgradState \(optax\.amsgrad: .*nu_max"),
    "adabelief": (lambda: optax.adabelief(0.05), r"not Adam: ScaleByBeliefState \(optax\.adabelief"),
    "novograd": (lambda: optax.novograd(0.05), r"not Adam: ScaleByNovogradState \(optax\.novograd"),
    "rmsprop": (lambda: optax.rmsprop(0.05), r"not Adam: ScaleByRmsState \(optax\.rmsprop\)"),
    "amsgrad in a chain": (
        lambda: optax.chain(optax.clip(1.0), optax.amsgrad(0.05)),
        r"not Adam: ScaleByAmsgradState",
    ),
    "radam under inject_hyperparams": (
        lambda: optax.inject_hyperparams(optax.radam)(learning_rate=0.05),
        r"is the state of optax\.radam \(hyperparameter 'threshold'\), whose steps are not Adam's",
    ),
    "scale_by_yogi under inject_hyperparams": (
        lambda: optax.chain(optax.inject_hyperparams(optax.scale_by_yogi)(), optax.scale(-0.05)),
        r"is the state of optax\.scale_by_yogi \(hyperparameter 'initial_accumulator_value'\), whose steps are not",
    ),
    "lion (no second moment)": (
        lambda: optax.lion(0.05),
        r"must hold exactly one optax ScaleByAdamState \(mu, nu, count\), found 0 \(its states: EmptyState, "
        r"ScaleByLionState\)",
    ),
}


@pytest.mark.parametrize("kind", NOT_ADAM)
def test_states_of_other_optimizers_are_refused_naming_them(mlp, data, kind):
    """optax.amsgrad / adabelief ... states hold mu, nu and count like Adam's, but their steps divide by
    another second moment: refused by their type, naming the optimizer and what is supported."""
    x, y = data
    make, message = NOT_ADAM[kind]
    checkpoints = _trained(mlp, x, y, steps=(2,), opt=make())
    with pytest.raises(ValueError, match=r"checkpoints\[0\]\[2\] \(optimizer state\) .*" + message) as caught:
        export_gradients(mlp.loss_fn, checkpoints, (x, y), preconditioner="adam", progress=False)
    assert "preconditioner='adam' takes the ScaleByAdamState of optax.adam / adamw" in str(caught.value)


INJECTED_WITHOUT_EPS_ROOT = {
    "adamax": (
        lambda: optax.inject_hyperparams(optax.adamax)(learning_rate=0.05),
        "learning_rate",
        "state.inner_state[0]",
    ),
    "adamaxw": (
        lambda: optax.inject_hyperparams(optax.adamaxw)(learning_rate=0.05),
        "learning_rate, weight_decay",
        "state.inner_state[0]",
    ),
    "yogi": (lambda: optax.inject_hyperparams(optax.yogi)(learning_rate=0.05), "learning_rate", "state.inner_state[0]"),
    "scale_by_adamax in a chain": (
        lambda: optax.chain(optax.clip(1.0), optax.inject_hyperparams(optax.scale_by_adamax)(), optax.scale(-0.05)),
        "",
        "state[1].inner_state",
    ),
}


@pytest.mark.parametrize("kind", INJECTED_WITHOUT_EPS_ROOT)
def test_injected_states_without_eps_root_are_refused_as_adamax_or_yogi(mlp, data, kind):
    """optax.adamax / adamaxw / yogi keep a ScaleByAdamState whose nu is not Adam's (a running max of |g|, an
    additive update); under inject_hyperparams they record b1, b2, eps but no eps_root, which optax.adam / adamw
    record: refused naming the state, what it looks like and the ways out, which work (plain rows from the
    checkpoints without their states)."""
    x, y = data
    make, more, path = INJECTED_WITHOUT_EPS_ROOT[kind]
    checkpoints = _trained(mlp, x, y, opt=make())
    recorded = "b1, b2, eps" + (f", {more}" if more else "")
    with pytest.raises(ValueError) as caught:
        export_gradients(mlp.loss_fn, checkpoints, (x, y), preconditioner="adam", progress=False)
    message = str(caught.value)
    assert message.startswith(
        "checkpoints[0][2] (optimizer state) looks like the state of optax.adamax / adamaxw / yogi: "
        f"inject_hyperparams recorded {recorded} but no eps_root, as those do, while optax.adam / adamw record "
        "eps_root too; their ScaleByAdamState holds a second moment that is not Adam's"
    ), message
    assert "use the states of a model trained with optax.adam / adamw" in message
    assert "preconditioner=None with the checkpoints without their states, [c[:2] for c in checkpoints]" in message
    assert f"pass its ScaleByAdamState alone, {path}, with preconditioner_options" in message
    g = export_gradients(mlp.loss_fn, [c[:2] for c in checkpoints], (x, y), progress=False)
    for c, (params, _, state) in enumerate(checkpoints):
        expected = _reference(mlp, params, state, x, y, None)
        np.testing.assert_allclose(np.asarray(g.matrices[c], np.float64), expected, rtol=2e-5, atol=2e-6)


def test_an_injected_adamax_state_inside_a_flax_train_state_is_refused(mlp, data):
    from flax.training import train_state

    x, y = data
    opt = optax.inject_hyperparams(optax.adamax)(learning_rate=0.05)
    wrapped = [
        (params, lr, train_state.TrainState(step=0, apply_fn=None, params=params, tx=opt, opt_state=state))
        for params, lr, state in _trained(mlp, x, y, steps=(2,), opt=opt)
    ]
    with pytest.raises(
        ValueError,
        match=r"^checkpoints\[0\]\[2\] \(optimizer state\) looks like the state of optax\.adamax / adamaxw / yogi: "
        r".*pass its ScaleByAdamState alone, state\.opt_state\.inner_state\[0\], with",
    ):
        export_gradients(mlp.loss_fn, wrapped, (x, y), preconditioner="adam", progress=False)


def test_adam_injected_by_a_function_without_eps_root_is_refused_and_its_adam_state_alone_is_taken(mlp, data):
    """A function of one's own around optax.adam taking no eps_root records what adamax does: refused too (the
    state cannot tell them apart); its ScaleByAdamState alone, as the message says, gives Adam's rows."""
    x, y = data

    def own_adam(learning_rate, b1, b2, eps):
        return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)

    checkpoints = _trained(mlp, x, y, opt=optax.inject_hyperparams(own_adam)(0.05, B1, B2, EPS))
    with pytest.raises(ValueError, match=r"looks like the state of optax\.adamax / adamaxw / yogi"):
        export_gradients(mlp.loss_fn, checkpoints, (x, y), preconditioner="adam", progress=False)
    _assert_adam_rows(mlp, x, y, checkpoints, [(p, lr, state.inner_state[0]) for p, lr, state in checkpoints])


def test_a_partition_injected_as_adamax_is_refused_naming_it(mlp, data):
    """Of an optax.partition split whose partitions are otherwise mergeable (one count, the same b1, b2, eps,
    learning rate), the one injected as adamax (no eps_root) is refused, naming its path."""
    x, y = data
    labels = {"l1": {"kernel": "decay", "bias": "nodecay"}, "l2": {"kernel": "decay", "bias": "nodecay"}}
    opt = optax.partition(
        {
            "decay": optax.inject_hyperparams(optax.adamw)(0.05, b1=B1, b2=B2, eps=EPS),
            "nodecay": optax.inject_hyperparams(optax.adamax)(0.05, b1=B1, b2=B2, eps=EPS),
        },
        labels,
    )
    checkpoints = _trained(mlp, x, y, steps=(2,), opt=opt)
    name = r"state\.inner_states\['nodecay'\]\.inner_state\.inner_state\[0\]"
    with pytest.raises(
        ValueError,
        match=rf"^checkpoints\[0\]\[2\] \(optimizer state\), partition {name} \(of 2 Adam states\), looks like the "
        rf"state of optax\.adamax / adamaxw / yogi: inject_hyperparams recorded b1, b2, eps, learning_rate but no "
        rf"eps_root.* pass its ScaleByAdamState alone, {name}, with preconditioner_options giving its b1, b2, eps "
        r"and layers= naming its leaves\)$",
    ):
        export_gradients(
            mlp.loss_fn,
            checkpoints,
            (x, y),
            preconditioner="adam",
            preconditioner_options={"b1": B1, "b2": B2, "eps": EPS},
            progress=False,
        )


def test_injected_settings_that_differ_from_the_given_ones_are_refused(mlp, data):
    x, y = data
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=0.05, b1=B1, b2=B2, eps=EPS)
    checkpoints = _trained(mlp, x, y, steps=(2,), opt=opt)
    with pytest.raises(
        ValueError,
        match=r"checkpoints\[0\]\[2\] \(optimizer state\) records b2=0\.99 \(inject_hyperparams\), but the export "
        r"uses b2=0\.999: pass preconditioner_options=\{'b2': 0\.99, \.\.\.\}",
    ):
        export_gradients(
            mlp.loss_fn, checkpoints, (x, y), preconditioner="adam", preconditioner_options={"b1": B1, "eps": EPS}
        )


@pytest.mark.parametrize("value", [-1e-3, np.nan, np.inf])
def test_a_second_moment_that_is_negative_or_not_finite_is_refused(mlp, data, value):
    """Adam's nu is a running mean of squares: a negative or NaN entry would make rows NaN, an infinite one
    zero; refused naming the leaf and how many entries."""
    x, y = data
    ((params, lr, state),) = _trained(mlp, x, y, steps=(2,))
    adam = _adam_state(state)
    nu = jax.tree_util.tree_map(lambda a: a, adam.nu)
    nu["l2"]["kernel"] = nu["l2"]["kernel"].at[1, 2].set(value)
    bad = tuple(adam._replace(nu=nu) if s is adam else s for s in state)
    with pytest.raises(
        ValueError,
        match=r"checkpoints\[0\]\[2\] \(optimizer state\): the second moment of l2/kernel has 1 negative, "
        r"NaN or infinite entries of 24",
    ):
        export_gradients(mlp.loss_fn, [(params, lr, bad)], (x, y), preconditioner="adam", progress=False)


def test_resume_with_another_optimizer_state_is_refused(mlp, data, tmp_path):
    x, y = data
    checkpoints = _trained(mlp, x, y)
    export_gradients(mlp.loss_fn, checkpoints, (x, y), preconditioner="adam", store=tmp_path / "s", progress=False)
    params, lr, state = checkpoints[1]
    doubled = jax.tree_util.tree_map(
        lambda a: a * 2 if isinstance(a, jax.Array) and a.dtype == jnp.float32 else a, state
    )
    with pytest.raises(ValueError, match="optimizer states saved with the checkpoints differ"):
        export_gradients(
            mlp.loss_fn,
            [checkpoints[0], (params, lr, doubled)],
            (x, y),
            preconditioner="adam",
            store=tmp_path / "s",
            progress=False,
        )


def _torch_checkpoints(checkpoints):
    """The same weights and Adam states as torch (state_dict, lr, optimizer state_dict) triples."""
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    names = {
        "0.weight": ("l1", "kernel"),
        "0.bias": ("l1", "bias"),
        "2.weight": ("l2", "kernel"),
        "2.bias": ("l2", "bias"),
    }

    def as_torch(tree, name):
        a = np.asarray(tree[names[name][0]][names[name][1]])
        return torch.tensor(a.T if name.endswith("weight") else a)

    out = []
    for params, lr, state in checkpoints:
        adam = _adam_state(state)
        opt = torch.optim.Adam(model.parameters(), betas=(B1, B2), eps=EPS)
        opt_state = opt.state_dict()
        opt_state["state"] = {
            i: {
                "step": torch.tensor(float(adam.count)),
                "exp_avg": as_torch(adam.mu, name),
                "exp_avg_sq": as_torch(adam.nu, name),
            }
            for i, name in enumerate(names)
        }
        out.append(({name: as_torch(params, name) for name in names}, lr, opt_state))
    return model, out


@pytest.mark.parametrize("train_kind, test_kind", [("adam", "adam"), ("adam_update", None)])
def test_torch_and_jax_give_the_same_influence(mlp, data, train_kind, test_kind):
    from tracin.torch import export_gradients as torch_export

    torch = pytest.importorskip("torch")

    x, y = data
    checkpoints = _trained(mlp, x, y)
    model, torch_checkpoints = _torch_checkpoints(checkpoints)
    options = {"b1": B1, "b2": B2, "eps": EPS}
    loss = lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="none")  # noqa: E731
    sides = {}
    for side, kind, rows in (("train", train_kind, slice(0, 50)), ("test", test_kind, slice(50, 70))):
        states = slice(None) if kind else slice(0, 2)  # the plain side without the unused states (else a warning)
        sides["jax", side] = export_gradients(
            mlp.loss_fn,
            [c[states] for c in checkpoints],
            (x[rows], y[rows]),
            preconditioner=kind,
            preconditioner_options=options if kind else None,  # unused on the plain side (else a warning)
            progress=False,
        )
        sides["torch", side] = torch_export(
            model,
            [c[states] for c in torch_checkpoints],
            (torch.as_tensor(x[rows]), torch.as_tensor(y[rows])),
            loss,
            preconditioner=kind,
            progress=False,
        )
    ours = tracin.scores(sides["jax", "test"], sides["jax", "train"])
    theirs = tracin.scores(sides["torch", "test"], sides["torch", "train"])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    exact = sum(
        w * _reference(mlp, p, s, x[50:], y[50:], test_kind) @ _reference(mlp, p, s, x[:50], y[:50], train_kind).T
        for p, w, s in checkpoints
    )
    np.testing.assert_allclose(ours, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())


def test_an_optimizer_state_given_without_a_preconditioner_warns_and_gives_plain_rows(mlp, data):
    x, y = data
    checkpoints = _trained(mlp, x, y)
    with pytest.warns(UserWarning, match=r"checkpoints\[0\]\[2\] is an optimizer state, but preconditioner=None") as w:
        g = export_gradients(mlp.loss_fn, checkpoints, (x, y), batch_size=16, progress=False)
    assert 'preconditioner="adam"' in str(w[0].message) and "drop the state" in str(w[0].message)
    assert g.metadata["preconditioner"] is None
    for c, (params, _, state) in enumerate(checkpoints):
        expected = _reference(mlp, params, state, x, y, None)
        np.testing.assert_allclose(np.asarray(g.matrices[c], np.float64), expected, rtol=2e-5, atol=2e-6)


def test_preconditioner_options_without_a_preconditioner_warn_as_an_unused_state_does(mlp, data):
    """preconditioner_options= with preconditioner=None exported plain rows without a word (review63 F3); now a
    UserWarning naming both arguments, pointing at the caller (tracin.torch reads Adam's settings from the
    optimizer state, whose unused presence warns the same way), and the rows stay the plain SGD gradients."""
    x, y = data
    params = mlp.params[0]
    with pytest.warns(UserWarning, match=r"preconditioner_options is given, but preconditioner=None ignores it") as w:
        g = export_gradients(
            mlp.loss_fn, [(params, 1.0)], (x, y), preconditioner_options={"b1": 0.5, "b2": 0.9}, progress=False
        )
    assert len(w) == 1 and w[0].filename == __file__
    assert 'preconditioner="adam"' in str(w[0].message) and "drop preconditioner_options" in str(w[0].message)
    assert g.metadata["preconditioner"] is None
    expected = _reference(mlp, params, None, x, y, None)
    np.testing.assert_allclose(np.asarray(g.matrices[0], np.float64), expected, rtol=2e-5, atol=2e-6)
    with pytest.raises(ValueError, match=r"preconditioner_options: unknown keys \['beta1'\]"):  # still checked
        export_gradients(mlp.loss_fn, [(params, 1.0)], (x, y), preconditioner_options={"beta1": 0.5}, progress=False)


def test_moments_of_a_pytree_with_more_leaves_than_the_params_are_refused_naming_them(mlp, data):
    x, y = data
    params = mlp.params[0]
    wider = dict(params, extra={"w": jnp.zeros(5, jnp.float32)})
    opt = optax.adam(0.05, b1=B1, b2=B2, eps=EPS)
    _, state = opt.update(jax.tree_util.tree_map(jnp.ones_like, wider), opt.init(wider), wider)
    with pytest.raises(
        ValueError,
        match=r"checkpoints\[0\]\[2\] \(optimizer state\): the Adam moments have leaves "
        r"the params do not: \['extra/w'\]",
    ):
        export_gradients(mlp.loss_fn, [(params, 1.0, state)], (x, y), preconditioner="adam", progress=False)


def test_a_leaf_masked_out_of_adam_is_named_and_layers_without_it_follow_adam(mlp, data):
    x, y = data
    mask = {"l1": {"bias": True, "kernel": True}, "l2": {"bias": False, "kernel": False}}
    checkpoints = _trained(mlp, x, y, steps=(2,), opt=optax.masked(optax.adam(0.05, b1=B1, b2=B2, eps=EPS), mask))
    options = {"b1": B1, "b2": B2, "eps": EPS}
    with pytest.raises(
        ValueError,
        match=r"leaf 'l2/bias' is masked out of Adam \(optax.masked.*layers=\['l1/bias', 'l1/kernel'\]",
    ):
        export_gradients(
            mlp.loss_fn, checkpoints, (x, y), preconditioner="adam", preconditioner_options=options, progress=False
        )
    g = export_gradients(
        mlp.loss_fn,
        checkpoints,
        (x, y),
        layers=["l1"],
        preconditioner="adam",
        preconditioner_options=options,
        progress=False,
    )
    params, _, state = checkpoints[0]
    adam = _adam_state(state)
    grads = mlp.reference_rows(mlp.reference_grads(_torch_weights(params), x, y), ["b1", "w1"], transpose={"w1"})
    v = np.concatenate([np.asarray(adam.nu["l1"][k], np.float64).reshape(-1) for k in ("bias", "kernel")])
    t = float(adam.count)
    expected = grads / (np.sqrt(v / (1 - B2**t)) + EPS)
    np.testing.assert_allclose(
        np.asarray(g.matrices[0], np.float64), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max()
    )


EPS_ROOT = 1e-3


def _per_example_trees(mlp, params, x, y):
    """float64 per-example gradients (the conftest's backprop) as a params-shaped tree, leading axis n."""
    ref = mlp.reference_grads(_torch_weights(params), x, y)
    return {
        "l1": {"kernel": np.swapaxes(ref["w1"], 1, 2), "bias": ref["b1"]},
        "l2": {"kernel": np.swapaxes(ref["w2"], 1, 2), "bias": ref["b2"]},
    }


def _flat_rows(tree) -> np.ndarray:
    """(n, d) float64 rows of a params-shaped tree with a leading axis n, in the row order."""
    return np.concatenate([np.asarray(tree[a][b], np.float64).reshape(len(tree[a][b]), -1) for a, b, _ in ORDER], 1)


@pytest.mark.parametrize("kind", ["adam", "adam_update"])
def test_eps_root_is_taken_from_the_options_and_follows_optax(mlp, data, kind):
    """optax.adam(eps_root=...) steps by m_hat / (sqrt(v_hat + eps_root) + eps) (review126 F1): "adam" rows
    against that formula in float64, "adam_update" rows against optax's own scale_by_adam update of each
    example's gradient from the saved state; a state recording eps_root it is not given is refused."""
    x, y = data
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=0.05, b1=B1, b2=B2, eps=EPS, eps_root=EPS_ROOT)
    checkpoints = _trained(mlp, x, y, opt=opt)
    options = {"b1": B1, "b2": B2, "eps": EPS}
    with pytest.raises(
        ValueError,
        match=r"records eps_root=0\.001 \(inject_hyperparams\), but the export uses eps_root=0: pass "
        r"preconditioner_options=\{'eps_root': 0\.001, \.\.\.\}",
    ):
        export_gradients(
            mlp.loss_fn, checkpoints, (x, y), preconditioner=kind, preconditioner_options=options, progress=False
        )
    g = export_gradients(
        mlp.loss_fn,
        checkpoints,
        (x, y),
        preconditioner=kind,
        preconditioner_options={**options, "eps_root": EPS_ROOT},
        progress=False,
    )
    assert g.metadata["preconditioner"] == {"kind": kind, **options, "eps_root": EPS_ROOT}
    for c, (params, _, state) in enumerate(checkpoints):
        adam = _adam_state(state)
        grads = _per_example_trees(mlp, params, x, y)
        if kind == "adam":
            v_hat = _flat(adam.nu) / (1 - B2 ** float(adam.count))
            expected = _flat_rows(grads) / (np.sqrt(v_hat + EPS_ROOT) + EPS)
            without = _flat_rows(grads) / (np.sqrt(v_hat) + EPS)
        else:
            step = optax.scale_by_adam(b1=B1, b2=B2, eps=EPS, eps_root=EPS_ROOT)
            direction = jax.vmap(lambda gi, s=step, a=adam: s.update(gi, a)[0])
            expected = _flat_rows(direction(jax.tree_util.tree_map(jnp.float32, grads)))
            without = _reference(mlp, params, state, x, y, kind)
        assert np.abs(expected - without).max() > 0.05 * np.abs(expected).max()  # eps_root matters here
        np.testing.assert_allclose(
            np.asarray(g.matrices[c], np.float64), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max()
        )


def _batchnorm_model(with_batch_norm=True):
    """(loss_fn, variables, x, y) of a small Flax linen classifier, with a BatchNorm in inference mode whose
    running mean and var (the "batch_stats" collection) are moved off their initial values."""
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(8)(x)
            if with_batch_norm:
                x = nn.BatchNorm(use_running_average=True)(x)
            return nn.Dense(3)(jnp.tanh(x))

    net = Net()
    r = np.random.default_rng(3)
    x, y = r.standard_normal((16, 4)).astype(np.float32), r.integers(0, 3, 16)
    variables = dict(net.init(jax.random.PRNGKey(0), x))
    if with_batch_norm:
        variables["batch_stats"] = jax.tree_util.tree_map(lambda a: a + 0.3, variables["batch_stats"])

    def loss_fn(v, inputs, labels):
        return optax.softmax_cross_entropy_with_integer_labels(net.apply(v, inputs), labels)

    return loss_fn, variables, x, y


def _params_rows(per_example_jax_grad, loss_fn, variables, x, y) -> np.ndarray:
    """Per-example jax.grad rows w.r.t. variables["params"] alone, the other collections held fixed."""
    rest = {k: v for k, v in variables.items() if k != "params"}
    return per_example_jax_grad(lambda p, a, b: loss_fn({"params": p, **rest}, a, b), variables["params"], x, y)


def test_linen_variables_with_batch_stats_export_the_params_collection_by_default(per_example_jax_grad):
    """BatchNorm's running mean and var are no parameters a gradient trains (review126 F2a): by default only
    the "params" collection becomes columns; layers= naming batch_stats still exports them."""
    loss_fn, variables, x, y = _batchnorm_model()
    g = export_gradients(loss_fn, [(variables, 0.1)], (x, y), progress=False)
    names = [q["name"] for q in g.metadata["params"]]
    assert names and all(n.startswith("params/") for n in names)
    expected = _params_rows(per_example_jax_grad, loss_fn, variables, x, y)
    np.testing.assert_allclose(np.asarray(g.matrices[0], np.float64), expected, rtol=1e-5, atol=1e-6)
    both = export_gradients(loss_fn, [(variables, 0.1)], (x, y), layers=["batch_stats", "params"], progress=False)
    assert [q["name"] for q in both.metadata["params"]][:2] == [
        "batch_stats/BatchNorm_0/mean",
        "batch_stats/BatchNorm_0/var",
    ]


def test_a_plain_dict_with_a_params_entry_keeps_its_other_trainable_entries_or_warns(per_example_jax_grad):
    """A user's dict {"params": ..., "head": ...} is not linen variables whose other collections no gradient
    trains: a top-level array keeps every leaf; a Mapping entry that is not a linen state collection
    (batch_stats, cache, ...) is left out by default with a UserWarning naming it and layers=['*']."""
    r = np.random.default_rng(4)
    x, y = r.standard_normal((6, 3)).astype(np.float32), r.standard_normal(6).astype(np.float32)
    params = {"params": {"w": jnp.ones(3)}, "bias": jnp.float32(0.5)}

    def loss_fn(p, inputs, targets):
        head = p["head"]["v"] if "head" in p else jnp.ones(3)
        return ((inputs @ p["params"]["w"]) * (inputs @ head) + p["bias"] - targets) ** 2

    g = export_gradients(loss_fn, [(params, 0.1)], (x, y), progress=False)
    assert [q["name"] for q in g.metadata["params"]] == ["bias", "params/w"]
    expected = per_example_jax_grad(loss_fn, params, x, y)
    np.testing.assert_allclose(np.asarray(g.matrices[0], np.float64), expected, rtol=1e-5, atol=1e-6)
    params = {**params, "head": {"v": jnp.full(3, 0.5)}}
    del params["bias"]
    params["cache"] = {"c": jnp.zeros(2)}
    with pytest.warns(
        UserWarning, match=r"leaving out \['head'\]; if those are trained parameters, pass layers=\['\*'\]"
    ):
        g = export_gradients(lambda p, a, b: loss_fn({**p, "bias": 0.0}, a, b), [(params, 0.1)], (x, y), progress=False)
    assert [q["name"] for q in g.metadata["params"]] == ["params/w"]


def test_a_train_state_object_as_checkpoint_takes_its_own_optimizer_state(per_example_jax_grad):
    """The TrainState object itself as the checkpoint (its params exported under 'params/') with its own
    opt_state (initialised on state.params: paths 'Dense_0/kernel'): the moments are matched under
    "params/" as for the state restored as a dict, giving the same rows (review219 F1)."""
    from flax.training import train_state

    loss_fn, variables, x, y = _batchnorm_model(False)
    state = train_state.TrainState.create(apply_fn=None, params=variables["params"], tx=optax.adam(1e-2))
    for _ in range(2):
        grads = jax.grad(lambda p: loss_fn({"params": p}, x, y).mean())(state.params)
        state = state.apply_gradients(grads=grads)

    def state_loss(s, inputs, labels):
        return loss_fn({"params": s.params}, inputs, labels)

    with pytest.warns(UserWarning, match=r"Flax TrainState .*leaving out \['opt_state'\]"):
        g = export_gradients(
            state_loss, [(state, 0.01, state.opt_state)], (x, y), preconditioner="adam", progress=False
        )
    dict_form = ({"params": state.params}, 0.01, state.opt_state)
    expected = export_gradients(loss_fn, [dict_form], (x, y), preconditioner="adam", progress=False)
    assert [q["name"] for q in g.metadata["params"]] == [q["name"] for q in expected.metadata["params"]]
    np.testing.assert_array_equal(np.asarray(g.matrices[0]), np.asarray(expected.matrices[0]))


@pytest.mark.parametrize("batch_norm", [True, False])
def test_a_train_state_optimizer_on_variables_params_preconditions_linen_variables(per_example_jax_grad, batch_norm):
    """A TrainState's optax state is initialised on variables["params"] (paths 'Dense_0/kernel') while the
    checkpoint is the linen variables ('params/Dense_0/kernel'): its moments are matched under "params/"
    (review126 F2b), with or without batch_stats, against g / (sqrt(v_hat) + eps) in float64."""
    from flax.training import train_state

    loss_fn, variables, x, y = _batchnorm_model(batch_norm)
    rest = {k: v for k, v in variables.items() if k != "params"}
    state = train_state.TrainState.create(apply_fn=None, params=variables["params"], tx=optax.adam(1e-2))
    for _ in range(2):
        grads = jax.grad(lambda p: loss_fn({"params": p, **rest}, x, y).mean())(state.params)
        state = state.apply_gradients(grads=grads)
    checkpoint = ({"params": state.params, **rest}, 0.01, state.opt_state)
    g = export_gradients(loss_fn, [checkpoint], (x, y), preconditioner="adam", progress=False)
    adam = _adam_state(state.opt_state)
    v = np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in jax.tree_util.tree_leaves(adam.nu)])
    plain = _params_rows(per_example_jax_grad, loss_fn, checkpoint[0], x, y)
    expected = plain / (np.sqrt(v / (1 - 0.999 ** float(adam.count))) + 1e-8)
    np.testing.assert_allclose(
        np.asarray(g.matrices[0], np.float64), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max()
    )
    renamed = {**state.params, "Dense_9": state.params["Dense_0"]}
    del renamed["Dense_0"]
    other = optax.adam(1e-2).init(renamed)  # one layer differs: named alone, not every other collection's leaf
    other = (other[0]._replace(count=jnp.asarray(2, jnp.int32)), *other[1:])
    with pytest.raises(ValueError, match=r"do not: \['params/Dense_9/bias', 'params/Dense_9/kernel'\];"):
        export_gradients(loss_fn, [(checkpoint[0], 0.01, other)], (x, y), preconditioner="adam", progress=False)
    if batch_norm:  # batch_stats chosen by name: no Adam moments for them, said so
        with pytest.raises(ValueError, match=r"'params' collection, which has no leaf 'batch_stats/BatchNorm_0/mean'"):
            export_gradients(
                loss_fn, [checkpoint], (x, y), layers=["batch_stats"], preconditioner="adam", progress=False
            )


@pytest.mark.parametrize("injected_adam", [False, True])
def test_an_injected_adagrad_beside_adam_is_not_read_as_its_hyperparameters(mlp, data, injected_adam):
    """fr313: an optax.partition of an injected optax.adagrad (its initial_accumulator_value and eps=1e-7) on
    l2 and Adam on l1 is neither refused as optax.scale_by_yogi nor checked against adagrad's eps: layers=["l1"]
    follows Adam with its own eps (before, refused as scale_by_yogi, and earlier asked for eps=1e-07)."""
    x, y = data
    adam = (optax.inject_hyperparams(optax.adam) if injected_adam else optax.adam)(0.05, b1=B1, b2=B2, eps=EPS)
    labels = {"l1": {"bias": "adam", "kernel": "adam"}, "l2": {"bias": "adagrad", "kernel": "adagrad"}}
    adagrad = optax.inject_hyperparams(optax.adagrad)(learning_rate=0.05)
    opt = optax.partition({"adam": adam, "adagrad": adagrad}, labels)
    checkpoints = _trained(mlp, x, y, steps=(2,), opt=opt)
    g = export_gradients(
        mlp.loss_fn,
        checkpoints,
        (x, y),
        layers=["l1"],
        preconditioner="adam",
        preconditioner_options={"b1": B1, "b2": B2, "eps": EPS},
        progress=False,
    )
    params, _, state = checkpoints[0]
    adam_state = _adam_state(state)
    grads = mlp.reference_rows(mlp.reference_grads(_torch_weights(params), x, y), ["b1", "w1"], transpose={"w1"})
    v = np.concatenate([np.asarray(adam_state.nu["l1"][k], np.float64).reshape(-1) for k in ("bias", "kernel")])
    expected = grads / (np.sqrt(v / (1 - B2 ** float(adam_state.count))) + EPS)
    np.testing.assert_allclose(
        np.asarray(g.matrices[0], np.float64), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max()
    )
