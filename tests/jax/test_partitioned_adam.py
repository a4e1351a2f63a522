"""preconditioner='adam' / 'adam_update' with an optax.partition (multi_transform) decay / no-decay split: two
ScaleByAdamStates over disjoint leaves (MaskedNode elsewhere) merged into one per-leaf second moment, checked
against float64 NumPy (the conftest's backprop and Adam's formulas, each leaf's moments read from its own
partition's state); split states that cannot be merged (other counts, other injected b2, the same leaves,
moments of other pytrees) are refused, naming the partitions and the way out."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

optax = pytest.importorskip("optax")  # the "test" extra

from tracin.jax import export_gradients  # noqa: E402

B1, B2, EPS = 0.85, 0.99, 1e-6
OPTIONS = {"b1": B1, "b2": B2, "eps": EPS}
ORDER = [("l1", "bias", "b1"), ("l1", "kernel", "w1"), ("l2", "bias", "b2"), ("l2", "kernel", "w2")]
LABELS = {"l1": {"kernel": "decay", "bias": "nodecay"}, "l2": {"kernel": "decay", "bias": "nodecay"}}


def _is_adam(node) -> bool:
    return isinstance(node, optax.ScaleByAdamState)


def _adam_states(state) -> list:
    return [s for s in jax.tree_util.tree_leaves(state, is_leaf=_is_adam) if _is_adam(s)]


def _split(decay=None, nodecay=None):
    """optax.partition of AdamW on the kernels and Adam on the biases (b1, b2, eps as OPTIONS)."""
    decay = decay or optax.adamw(0.05, b1=B1, b2=B2, eps=EPS, weight_decay=0.1)
    nodecay = nodecay or optax.adam(0.05, b1=B1, b2=B2, eps=EPS)
    return optax.partition({"decay": decay, "nodecay": nodecay}, LABELS)


def _leaf_moments(state, part: str) -> np.ndarray:
    """float64 `part` (mu or nu) in the row order, each leaf from the one Adam state that is not masked there."""
    out = []
    for a, b, _ in ORDER:
        layers = [getattr(s, part)[a] for s in _adam_states(state)]  # a whole layer masked: one MaskedNode
        (leaf,) = [
            layer[b]
            for layer in layers
            if not isinstance(layer, optax.MaskedNode) and not isinstance(layer[b], optax.MaskedNode)
        ]
        out.append(np.asarray(leaf, np.float64).reshape(-1))
    return np.concatenate(out)


def _reference(mlp, params, state, x, y, kind: str) -> np.ndarray:
    w = {
        "w1": np.asarray(params["l1"]["kernel"]).T,
        "b1": np.asarray(params["l1"]["bias"]),
        "w2": np.asarray(params["l2"]["kernel"]).T,
        "b2": np.asarray(params["l2"]["bias"]),
    }
    g = mlp.reference_rows(mlp.reference_grads(w, x, y), [k for *_, k in ORDER], transpose={"w1", "w2"})
    (t,) = {float(s.count) for s in _adam_states(state)}
    m, v = _leaf_moments(state, "mu"), _leaf_moments(state, "nu")
    if kind == "adam":
        return g / (np.sqrt(v / (1 - B2**t)) + EPS)
    m2, v2 = B1 * m + (1 - B1) * g, B2 * v + (1 - B2) * g**2
    return (m2 / (1 - B1 ** (t + 1))) / (np.sqrt(v2 / (1 - B2 ** (t + 1))) + EPS)


def _export(mlp, checkpoints, x, y, kind="adam", **kwargs):
    return export_gradients(
        mlp.loss_fn, checkpoints, (x, y), preconditioner=kind, preconditioner_options=OPTIONS, progress=False, **kwargs
    )


@pytest.mark.parametrize(
    "opt",
    [
        _split(),
        _split(  # the same hyperparameters recorded by inject_hyperparams on both sides
            optax.inject_hyperparams(optax.adamw)(0.05, b1=B1, b2=B2, eps=EPS, weight_decay=0.1),
            optax.inject_hyperparams(optax.adam)(0.05, b1=B1, b2=B2, eps=EPS),
        ),
        optax.chain(  # optax.masked with complementary masks, no partition
            optax.masked(optax.adam(0.05, b1=B1, b2=B2, eps=EPS), jax.tree.map(lambda s: s == "decay", LABELS)),
            optax.masked(optax.adam(0.05, b1=B1, b2=B2, eps=EPS), jax.tree.map(lambda s: s != "decay", LABELS)),
        ),
    ],
    ids=["partition", "inject_hyperparams", "complementary_masks"],
)
@pytest.mark.parametrize("kind", ["adam", "adam_update"])
def test_adam_states_over_disjoint_leaves_are_merged_per_leaf(mlp, data, opt, kind):
    x, y = data
    checkpoints = mlp.trained(x, y, opt)
    assert [len(_adam_states(s)) for *_, s in checkpoints] == [2, 2]
    g = _export(mlp, checkpoints, x, y, kind)
    for c, (params, _, state) in enumerate(checkpoints):
        expected = _reference(mlp, params, state, x, y, kind)
        np.testing.assert_allclose(
            np.asarray(g.matrices[c], np.float64), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max()
        )
    masked = jax.tree_util.tree_leaves(  # each state holds moments for two of the four leaves
        [s.nu for s in _adam_states(checkpoints[0][2])], is_leaf=lambda n: isinstance(n, optax.MaskedNode)
    )
    assert sum(isinstance(n, optax.MaskedNode) for n in masked) == 4 and len(masked) == 8


def test_one_partition_exported_alone_matches_the_merged_rows(mlp, data):
    x, y = data
    checkpoints = mlp.trained(x, y, _split())
    merged = _export(mlp, checkpoints, x, y)
    kernels = ["l1/kernel", "l2/kernel"]
    alone = _export(
        mlp, [(p, lr, s.inner_states["decay"].inner_state) for p, lr, s in checkpoints], x, y, layers=kernels
    )
    subset = _export(mlp, checkpoints, x, y, layers=kernels)
    for c in range(2):
        np.testing.assert_array_equal(np.asarray(alone.matrices[c]), np.asarray(subset.matrices[c]))
    assert merged.matrices[0].shape[1] > subset.matrices[0].shape[1]


def _with_count(state, label: str, count: int):
    """`state` with the count of partition `label`'s ScaleByAdamState replaced."""
    inner = state.inner_states[label]
    adam = _adam_states(inner)[0]
    changed = jax.tree_util.tree_map(
        lambda s: s._replace(count=np.asarray(count, np.int32)) if s is adam else s, inner, is_leaf=_is_adam
    )
    return state._replace(inner_states={**state.inner_states, label: changed})


def test_partitions_with_other_counts_are_refused_naming_them(mlp, data):
    x, y = data
    params, lr, state = mlp.trained(x, y, _split(), steps=(2,))[0]
    with pytest.raises(
        ValueError,
        match=r"checkpoints\[0\]\[2\] \(optimizer state\) holds 2 optax ScaleByAdamStates over disjoint leaves "
        r"\(state\.inner_states\['decay'\]\.inner_state\[0\], state\.inner_states\['nodecay'\]\.inner_state\[0\]; "
        r".*their counts \(Adam step counts\) differ \(state\.inner_states\['decay'\]\.inner_state\[0\]: 2, "
        r"state\.inner_states\['nodecay'\]\.inner_state\[0\]: 7\); export each partition alone instead: pass its "
        r"ScaleByAdamState as the optimizer state, e.g\. state\.inner_states\['decay'\]\.inner_state\[0\], with "
        r"layers= naming its leaves, e\.g\. layers=\['l1/kernel', 'l2/kernel'\]",
    ):
        _export(mlp, [(params, lr, _with_count(state, "nodecay", 7))], x, y)


def test_partitions_with_other_injected_b2_are_refused(mlp, data):
    x, y = data
    opt = _split(
        optax.inject_hyperparams(optax.adamw)(0.05, b1=B1, b2=B2, eps=EPS),
        optax.inject_hyperparams(optax.adam)(0.05, b1=B1, b2=0.95, eps=EPS),
    )
    checkpoints = mlp.trained(x, y, opt, steps=(2,))
    with pytest.raises(
        ValueError,
        match=r"hyperparameters: inject_hyperparams records different b2 \(state\.inner_states\['decay'\]"
        r"\.inner_state\.inner_state\[0\]: 0\.99, state\.inner_states\['nodecay'\]\.inner_state\.inner_state\[0\]: "
        r"0\.95\), while preconditioner_options are one set; export each partition alone",
    ):
        _export(mlp, checkpoints, x, y)


def test_a_partition_recording_no_hyperparameters_beside_one_that_does_is_warned_about(mlp, data):
    """fr303: b1 / b2 / eps that inject_hyperparams does not record are not in the state: beside a partition
    that records them, the other's are taken from preconditioner_options unchecked (its rows wrong if they
    differ), which a RuntimeWarning names; a split recording none (the common one) merges without it."""
    x, y = data
    opt = _split(optax.inject_hyperparams(optax.adamw)(0.05, b1=B1, b2=B2, eps=EPS), None)
    checkpoints = mlp.trained(x, y, opt, steps=(2,))
    with pytest.warns(
        RuntimeWarning, match=r"state\.inner_states\['nodecay'\]\.inner_state\[0\] \(merged .*records no"
    ):
        _export(mlp, checkpoints, x, y)


def test_adam_states_over_the_same_leaves_keep_the_old_refusal(mlp, data):
    x, y = data
    adam = optax.adam(0.05, b1=B1, b2=B2, eps=EPS)
    checkpoints = mlp.trained(x, y, optax.chain(adam, adam), steps=(2,))
    with pytest.raises(
        ValueError,
        match=r"must hold exactly one optax ScaleByAdamState \(mu, nu, count\), found 2 .*two of them hold moments "
        r"for the same leaves \(\['l1/bias', 'l1/kernel', 'l2/bias'\]\), so which one preconditions a leaf is "
        r"ambiguous",
    ):
        _export(mlp, checkpoints, x, y)


def test_adam_states_of_other_pytrees_are_refused(mlp, data):
    x, y = data
    params, lr, _ = mlp.trained(x, y, _split(), steps=(1,))[0]
    adam = optax.adam(0.05, b1=B1, b2=B2, eps=EPS)
    grads = jax.tree.map(np.ones_like, params)
    state = tuple(  # one Adam per layer, each initialised on {layer: ...}: disjoint paths, other pytrees
        adam.update({k: grads[k]}, adam.init({k: params[k]}))[1] for k in ("l1", "l2")
    )
    with pytest.raises(ValueError, match=r"their moments are not trees of one params pytree \("):
        _export(mlp, [(params, lr, state)], x, y)


def test_a_prefix_label_tree_masking_whole_layers_is_merged(mlp, data):
    """r306: labels given per layer (a prefix of the params, as optax.partition allows) mask a whole layer with
    one MaskedNode in one state, while the other holds that layer's dict of leaves: merged, not refused."""
    x, y = data
    opt = optax.partition(
        {"a": optax.adam(0.05, b1=B1, b2=B2, eps=EPS), "b": optax.adam(0.05, b1=B1, b2=B2, eps=EPS)},
        {"l1": "b", "l2": "a"},
    )
    checkpoints = mlp.trained(x, y, opt)
    g = _export(mlp, checkpoints, x, y)
    for c, (params, _, state) in enumerate(checkpoints):
        expected = _reference(mlp, params, state, x, y, "adam")
        np.testing.assert_allclose(
            np.asarray(g.matrices[c], np.float64), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max()
        )


def test_partitions_with_other_injected_learning_rates_are_refused(mlp, data):
    """r306: a row is weighted by one learning rate, the checkpoint's (as tracin.torch refuses param groups of
    other rates): partitions recording other ones are not merged."""
    x, y = data
    opt = _split(
        optax.inject_hyperparams(optax.adamw)(0.05, b1=B1, b2=B2, eps=EPS),
        optax.inject_hyperparams(optax.adam)(0.5, b1=B1, b2=B2, eps=EPS),
    )
    checkpoints = mlp.trained(x, y, opt, steps=(2,))
    with pytest.raises(ValueError, match=r"records different learning_rate \(.*0\.05.*0\.5\), a row is weighted"):
        _export(mlp, checkpoints, x, y)


def test_none_and_empty_leaves_of_the_params_do_not_block_the_merge():
    """None leaves and empty containers (an Equinox model filtered with eqx.is_array, a layer holding no
    parameters) are the same empty subtree in every partition's moments: merged, not 'two states hold moments
    for one leaf'; the rows equal one optax.adam's over all leaves (the same b1/b2/eps, one step count)."""
    key = jax.random.PRNGKey(3)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = {
        "l1": {"kernel": jax.random.normal(k1, (3, 4)), "bias": jnp.zeros(4), "scale": None},
        "l2": {"kernel": jax.random.normal(k2, (4, 2))},
        "dropout": {},
    }
    x, y = jax.random.normal(k3, (5, 3)), jax.random.normal(k4, (5, 2))

    def loss_fn(p, x, y):
        return ((jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"]) @ p["l2"]["kernel"] - y) ** 2).sum(-1)

    def rows(opt):
        state = opt.init(params)
        updates, state = opt.update(jax.grad(lambda p: loss_fn(p, x, y).mean())(params), state, params)
        trained = optax.apply_updates(params, updates)
        out = export_gradients(loss_fn, [(trained, 0.05, state)], (x, y), preconditioner="adam", progress=False)
        return np.asarray(out.matrices[0])

    alone = rows(optax.adam(0.05))
    for labels in (
        {"l1": {"kernel": "a", "bias": "b", "scale": None}, "l2": {"kernel": "b"}, "dropout": {}},  # leaf by leaf
        {"l1": {"kernel": "a", "bias": "b", "scale": None}, "l2": "a", "dropout": {}},  # one layer by prefix
    ):
        merged = rows(optax.partition({"a": optax.adam(0.05), "b": optax.adam(0.05)}, labels))
        np.testing.assert_allclose(merged, alone, rtol=1e-6, atol=0)


def test_a_learning_rate_injected_around_the_partition_alone_is_no_unchecked_warning(mlp, data):
    """inject_hyperparams over the whole chain records only learning_rate, for every partition alike: no
    RuntimeWarning that some partitions record b1 / b2 / eps and others do not (none does)."""
    x, y = data
    inner = lambda learning_rate: optax.chain(  # noqa: E731
        optax.partition(
            {"decay": optax.scale_by_adam(B1, B2, EPS), "nodecay": optax.scale_by_adam(B1, B2, EPS)}, LABELS
        ),
        optax.scale(-learning_rate),
    )
    checkpoints = mlp.trained(x, y, optax.inject_hyperparams(inner)(learning_rate=0.05))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _export(mlp, checkpoints, x, y)
