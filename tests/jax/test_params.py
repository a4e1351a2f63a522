"""Parameter pytrees of every kind (nested dicts, Flax linen, Flax NNX, Equinox): paths, order, layers,
and exported gradients against the float64 reference of conftest."""

from __future__ import annotations

import warnings

import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tracin.jax import export_gradients
from tracin.jax.params import layout_of, matches

KERNELS = {"w1", "w2"}


def _close(ours, ref):
    np.testing.assert_allclose(np.asarray(ours, np.float64), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


class _BatchNormNet(nnx.Module):
    """Linear(5, 4) -> BatchNorm(4) -> relu -> Linear(4, 3)."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1, self.bn = nnx.Linear(5, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs)
        self.l2 = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, v):
        return self.l2(jax.nn.relu(self.bn(self.l1(v))))


def _batchnorm_net() -> _BatchNormNet:
    """A _BatchNormNet in eval mode whose running statistics (BatchStat) are not their initial values."""
    model = _BatchNormNet(nnx.Rngs(0))
    model.bn.mean[...] = jnp.linspace(-0.5, 0.5, 4)
    model.bn.var[...] = jnp.linspace(0.5, 2.0, 4)
    model.eval()
    return model


@pytest.mark.parametrize(
    "path, pattern, hit",
    [
        ("l2/kernel", "l2", True),
        ("l2/kernel", "l2/", True),
        ("l2/kernel", "l2/kernel", True),
        ("l20/kernel", "l2", False),
        ("params/Dense_1/bias", "params/Dense_1/*", True),
        ("params/Dense_10/bias", "params/Dense_1/*", False),
        ("a/b/c", "*/c", True),
        ("a/b/c", "b", False),
    ],
)
def test_pattern_matching(path, pattern, hit):
    assert matches(path, pattern) is hit


def test_layout_skips_non_float_leaves_and_reports_missing_patterns():
    params = {"w": jnp.ones((2, 3)), "step": jnp.array(3), "act": jax.nn.relu, "b": np.zeros(3, np.float32)}
    layout = layout_of(params, None)
    assert [layout.paths[i] for i in layout.selected] == ["b", "w"]
    assert layout.widths == [3, 6] and layout.dim == 9
    assert layout.merge(*layout.split(params))["act"] is jax.nn.relu
    with pytest.raises(ValueError, match="'nope' matches no floating-point parameter.*'b', 'w'"):
        layout_of(params, ["nope"])
    with pytest.raises(ValueError, match="'step' matches no floating-point"):
        layout_of(params, ["step"])
    with pytest.raises(TypeError, match="layers must be a non-empty list"):
        layout_of(params, [])


def test_flax_linen(mlp, data):
    x, y = data

    class MLP(linen.Module):
        @linen.compact
        def __call__(self, x):
            h = jnp.tanh(linen.Dense(8)(x))  # Dense_0
            return linen.Dense(3)(h)  # Dense_1

    model = MLP()
    w = mlp.weights[0]
    params = {
        "params": {"Dense_0": {"kernel": w["w1"].T, "bias": w["b1"]}, "Dense_1": {"kernel": w["w2"].T, "bias": w["b2"]}}
    }
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(model.init(jax.random.key(0), x[:1]))

    def loss(p, inputs, targets):
        return mlp.cross_entropy(model.apply(p, inputs), targets)

    ref = mlp.reference_grads(w, x, y)
    full = export_gradients(loss, [(params, 1.0)], (x, y), progress=False)
    assert [p["name"] for p in full.metadata["params"]] == [
        "params/Dense_0/bias",
        "params/Dense_0/kernel",
        "params/Dense_1/bias",
        "params/Dense_1/kernel",
    ]
    _close(full.matrices[0], mlp.reference_rows(ref, ["b1", "w1", "b2", "w2"], KERNELS))
    head = export_gradients(loss, [(params, 1.0)], (x, y), layers=["params/Dense_1/*"], progress=False)
    _close(head.matrices[0], mlp.reference_rows(ref, ["b2", "w2"], KERNELS))


def test_flax_nnx_state(mlp, data):
    x, y = data

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.l2 = nnx.Linear(5, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    model = MLP(nnx.Rngs(0))
    w = mlp.weights[0]
    for layer, k, b in ((model.l1, "w1", "b1"), (model.l2, "w2", "b2")):
        layer.kernel[...] = jnp.asarray(w[k].T, jnp.float32)
        layer.bias[...] = jnp.asarray(w[b], jnp.float32)
    graphdef, state = nnx.split(model, nnx.Param)

    def loss(s, inputs, targets):
        return mlp.cross_entropy(nnx.merge(graphdef, s)(inputs), targets)

    grads = export_gradients(loss, [(state, 1.0)], (x, y), layers=["l2"], progress=False)
    assert [p["name"] for p in grads.metadata["params"]] == ["l2/bias/value", "l2/kernel/value"]
    _close(grads.matrices[0], mlp.reference_rows(mlp.reference_grads(w, x, y), ["b2", "w2"], KERNELS))


def test_an_nnx_state_exports_its_params_alone_by_default(data, per_example_jax_grad):
    """review155 F2: the State of nnx.split(model) exported BatchNorm's running mean and var (BatchStat) as
    parameters, with non-zero gradients in eval mode (1-15% of the self-influence), without a word. By default
    only the nnx.Param leaves are exported, as linen's "params", with one warning naming what is left out."""
    import optax

    x, y = data

    model = _batchnorm_net()
    graphdef, state = nnx.split(model)
    _, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(s, inputs, targets):
        logits = nnx.merge(graphdef, s)(inputs)
        return -jax.nn.log_softmax(logits)[jnp.arange(targets.shape[0]), targets]

    def params_loss(p, inputs, targets):
        logits = nnx.merge(graphdef, p, rest)(inputs)
        return -jax.nn.log_softmax(logits)[jnp.arange(targets.shape[0]), targets]

    with pytest.warns(
        UserWarning, match=r"NNX State: only its nnx.Param .*BatchStat \(bn/mean/value, bn/var/value\)"
    ) as caught:
        grads = export_gradients(loss, [(state, 1.0)], (x, y), progress=False)
    assert sum("NNX State" in str(w.message) for w in caught) == 1
    names = [p["name"] for p in grads.metadata["params"]]
    assert names == [
        f"{m}/{k}/value"
        for m, ks in (("bn", ("bias", "scale")), ("l1", ("bias", "kernel")), ("l2", ("bias", "kernel")))
        for k in ks
    ]
    expected = per_example_jax_grad(params_loss, params, x, y)  # jax.grad of each example, Params alone
    np.testing.assert_allclose(np.asarray(grads.matrices[0]), expected, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the Params alone, or the BatchStat named: no warning
        export_gradients(params_loss, [(params, 1.0)], (x, y), progress=False)
        every = export_gradients(loss, [(state, 1.0)], (x, y), layers=["*"], progress=False)
    assert {"bn/mean/value", "bn/var/value"} <= {p["name"] for p in every.metadata["params"]}
    # an optimizer on the Params (as nnx.Optimizer(model, tx, wrt=nnx.Param) keeps): the default fits it
    tx = optax.adam(1e-2)
    opt = tx.init(params)
    step = jax.grad(lambda p: params_loss(p, x, y).mean())(params)
    opt = tx.update(step, opt, params)[1]
    with pytest.warns(UserWarning, match="NNX State"):
        adam = export_gradients(loss, [(state, 1.0, opt)], (x, y), preconditioner="adam", progress=False)
    assert [p["name"] for p in adam.metadata["params"]] == names
    with pytest.raises(
        ValueError, match=r"no leaf 'bn/mean/value'.*pass layers= naming only .*nnx.split\(model, nnx.Param"
    ):
        export_gradients(loss, [(state, 1.0, opt)], (x, y), layers=["*"], preconditioner="adam", progress=False)


def test_an_nnx_module_given_as_params_exports_its_params_alone_by_default(data, per_example_jax_grad):
    """review255 F2: a Module passed itself (a pytree in flax 0.12) exported BatchNorm's running statistics
    (BatchStat) as parameters without a word, where its State leaves them out; with preconditioner="adam" and
    nnx.Optimizer(model, tx, wrt=nnx.Param)'s state it was refused. A Module is now read as its State."""
    import optax

    x, y = data

    model = _batchnorm_net()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(m, inputs, targets):
        return -jax.nn.log_softmax(m(inputs))[jnp.arange(targets.shape[0]), targets]

    def params_loss(p, inputs, targets):
        return loss(nnx.merge(graphdef, p, rest), inputs, targets)

    with pytest.warns(UserWarning, match=r"NNX (State|Module): only its nnx.Param .*BatchStat \(bn/mean/value"):
        grads = export_gradients(loss, [(model, 1.0)], (x, y), progress=False)
    names = [p["name"] for p in grads.metadata["params"]]
    assert names == [f"{m}/{k}/value" for m in ("bn", "l1", "l2") for k in ("bias", "scale" if m == "bn" else "kernel")]
    expected = per_example_jax_grad(params_loss, params, x, y)  # jax.grad of each example, Params alone
    np.testing.assert_allclose(np.asarray(grads.matrices[0]), expected, rtol=1e-5, atol=1e-6)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    opt.update(model, jax.tree.map(jnp.ones_like, params))
    with pytest.warns(UserWarning, match="NNX"):
        adam = export_gradients(loss, [(model, 1.0, opt.opt_state)], (x, y), preconditioner="adam", progress=False)
    assert [p["name"] for p in adam.metadata["params"]] == names


def _equinox_mlp(w):
    model = eqx.nn.MLP(5, 3, 8, depth=1, activation=jnp.tanh, key=jax.random.key(0))
    f = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return eqx.tree_at(
        lambda m: (m.layers[0].weight, m.layers[0].bias, m.layers[1].weight, m.layers[1].bias),
        model,
        (f(w["w1"]), f(w["b1"]), f(w["w2"]), f(w["b2"])),
    )


def test_equinox_module_and_partition(mlp, data):
    x, y = data
    w = mlp.weights[0]
    model = _equinox_mlp(w)
    ref = mlp.reference_rows(mlp.reference_grads(w, x, y), ["w1", "b1", "w2", "b2"])  # (out, in) weights

    def module_loss(m, inputs, targets):
        return mlp.cross_entropy(jax.vmap(m)(inputs), targets)

    whole = export_gradients(module_loss, [(model, 1.0)], (x, y), progress=False)
    assert [p["name"] for p in whole.metadata["params"]] == [
        "layers/0/weight",
        "layers/0/bias",
        "layers/1/weight",
        "layers/1/bias",
    ]
    _close(whole.matrices[0], ref)

    arrays, static = eqx.partition(model, eqx.is_inexact_array)

    def split_loss(a, inputs, targets):
        return module_loss(eqx.combine(a, static), inputs, targets)

    parted = export_gradients(split_loss, [(arrays, 1.0)], (x, y), progress=False)
    _close(parted.matrices[0], ref)


def test_equinox_last_layer_with_out_in_kernel(mlp, data):
    x, y = data
    w = mlp.weights[1]
    model = _equinox_mlp(w)

    def loss(m, inputs, targets):
        return mlp.cross_entropy(jax.vmap(m)(inputs), targets)

    def layer_input(m, inputs):
        return jax.vmap(lambda v: jnp.tanh(m.layers[0](v)))(inputs)

    grads = export_gradients(
        loss, [(model, 1.0)], (x, y), mode="last_layer", layers=["layers/1"], layer_input=layer_input, progress=False
    )
    ref = mlp.reference_grads(w, x, y)
    assert grads.dims == ((3, 9),)
    _close(grads.left[0], ref["b2"])
    _close(grads.right[0], np.hstack([ref["hidden"], np.ones((70, 1))]))


@pytest.mark.parametrize("scale_dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_bfloat16_and_float16_leaves_are_differentiated(scale_dtype, per_example_jax_grad):
    r = np.random.default_rng(3)
    x, y = r.standard_normal((6, 4)).astype(np.float32), r.integers(0, 3, 6)
    params = {
        "w": jnp.asarray(r.standard_normal((4, 3)), jnp.bfloat16),
        "scale": jnp.asarray(r.uniform(0.5, 2, 3), scale_dtype),
    }

    def loss(p, inputs, targets):
        logits = (inputs.astype(jnp.bfloat16) @ p["w"]).astype(jnp.float32) * p["scale"].astype(jnp.float32)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=1)[:, 0]

    grads = export_gradients(loss, [(params, 1.0)], (x, y), progress=False)
    assert [(p["name"], p["shape"]) for p in grads.metadata["params"]] == [("scale", [3]), ("w", [4, 3])]
    ref = per_example_jax_grad(loss, params, x, y)  # leaves "scale", "w": the same order
    assert ref.shape == (6, 15)
    # both sides compute the bf16 leaves' gradients in bfloat16 (8 significant bits)
    np.testing.assert_allclose(np.asarray(grads.matrices[0], np.float64), ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
    only_w = export_gradients(loss, [(params, 1.0)], (x, y), layers=["w"], progress=False)
    np.testing.assert_allclose(
        np.asarray(only_w.matrices[0], np.float64), ref[:, 3:], rtol=2e-2, atol=2e-2 * np.abs(ref).max()
    )


def test_low_precision_leaves_are_selected():
    params = {"a": jnp.ones(2, jnp.bfloat16), "b": jnp.ones(3, jnp.float16), "c": jnp.ones(4, jnp.float8_e4m3fn)}
    params["n"] = np.ones(5, np.int8)
    layout = layout_of(params, None)
    assert [layout.paths[i] for i in layout.selected] == ["a", "b", "c"] and layout.dim == 9
    assert [layout.paths[i] for i in layout.arrays] == ["n"]


@pytest.mark.parametrize("scalar", [np.float32, float, np.float64], ids=["np.float32", "float", "np.float64"])
def test_floating_scalar_leaves_are_differentiated_like_jax_grad(scalar, per_example_jax_grad):
    """A learned temperature held as a Python float or a NumPy scalar: a parameter, as jax.grad sees it
    (it was a constant baked into the compiled function), and two checkpoints may differ in it."""
    r = np.random.default_rng(4)
    x, y = r.standard_normal((6, 4)).astype(np.float32), r.integers(0, 3, 6)
    w = r.standard_normal((4, 3)).astype(np.float32)

    def loss(p, inputs, targets):
        logits = inputs @ p["w"] / p["t"]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=1)[:, 0]

    ckpts = [({"w": w, "t": scalar(2.0)}, 1.0), ({"w": w, "t": scalar(3.0)}, 1.0)]
    grads = export_gradients(loss, ckpts, (x, y), progress=False)
    assert [(p["name"], p["shape"]) for p in grads.metadata["params"]] == [("t", []), ("w", [4, 3])]
    assert len(set(grads.metadata["fingerprints"]["checkpoints"])) == 2
    for (params, _), ours in zip(ckpts, grads.matrices, strict=True):
        ref = per_example_jax_grad(loss, params, x, y)
        assert ref.shape == (6, 13) and np.abs(ref[:, 0]).min() > 0
        np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    only_w = export_gradients(loss, ckpts, (x, y), layers=["w"], progress=False)  # t: an argument, not baked in
    np.testing.assert_array_equal(only_w.matrices[1], grads.matrices[1][:, 1:])


def test_complex_leaves_are_constants_not_differentiated(per_example_jax_grad):
    """A complex buffer (rotary table) is not a parameter column: jax.grad of a real loss w.r.t. it is
    complex and a real row would drop its imaginary part (it was differentiated, with a ComplexWarning)."""
    r = np.random.default_rng(5)
    rot = jnp.exp(1j * jnp.arange(4, dtype=jnp.float32))
    params = {"rot": rot, "w": jnp.asarray(r.standard_normal((4, 3)), jnp.float32), "z": np.complex64(1 + 2j)}
    x, y = r.standard_normal((6, 4)).astype(np.float32), r.integers(0, 3, 6)

    def loss(p, inputs, targets):
        logits = jnp.real(inputs * p["rot"] * p["z"]) @ p["w"]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=1)[:, 0]

    layout = layout_of(params, None)
    assert [layout.paths[i] for i in layout.selected] == ["w"] and layout.dim == 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no complex-to-real cast
        grads = export_gradients(loss, [(params, 1.0)], (x, y), progress=False)
    ref = per_example_jax_grad(lambda w, i, t: loss({**params, "w": w}, i, t), params["w"], x, y)
    np.testing.assert_allclose(np.asarray(grads.matrices[0]), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    with pytest.raises(ValueError, match=r"'rot': complex leaves are constants, not differentiated"):
        layout_of(params, ["rot"])


def test_layers_naming_integer_or_bool_leaves_say_they_are_constants():
    """layers=["count"] on an integer leaf said only 'matches no floating-point parameter' (review63 F4), where a
    complex leaf got the reason; integer and bool leaves (arrays, NumPy and Python scalars) now get theirs."""
    params = {
        "w": jnp.ones((2, 3)),
        "count": np.int32(2),
        "steps": jnp.arange(3),
        "n": 4,
        "mask": np.array([True, False]),
        "flag": True,
        "cplx": np.ones(2, np.complex64),
        "act": jax.nn.relu,
    }
    for name, kind in [("count", "integer"), ("steps", "integer"), ("n", "integer"), ("mask", "boolean")]:
        with pytest.raises(
            ValueError,
            match=rf"pattern '{name}' matches no floating-point parameter \('{name}': {kind} leaves are constants, "
            r"not differentiated\); parameter paths are 'w'",
        ):
            layout_of(params, [name])
    with pytest.raises(ValueError, match=r"\('flag': boolean leaves are constants, not differentiated\)"):
        layout_of(params, ["flag"])
    with pytest.raises(
        ValueError,
        match=r"pattern 'c\*' matches no floating-point parameter \('count': integer leaves are constants, not "
        r"differentiated; 'cplx': complex leaves are constants, not differentiated\)",
    ):
        layout_of(params, ["c*"])
    with pytest.raises(ValueError, match=r"pattern 'act' matches no floating-point parameter; parameter paths"):
        layout_of(params, ["act"])  # a function: no reason given


class _Scaled(eqx.Module):
    lin: eqx.nn.Linear
    drop: eqx.nn.Dropout
    temperature: float

    def __call__(self, x):
        return self.drop(self.lin(x), inference=True) / self.temperature


def test_float_fields_of_equinox_modules_are_static_as_in_eqx_filter_grad(per_example_jax_grad):
    """Dropout.p and a float field are settings for Equinox (eqx.is_array is False, eqx.filter_grad leaves
    them alone): not columns, but in the checkpoint digest as static leaves; a float in a dict is still a
    parameter."""
    from tracin.jax.checkpoints import state_digest

    r = np.random.default_rng(6)
    x, y = r.standard_normal((8, 4)).astype(np.float32), r.integers(0, 3, 8)
    model = _Scaled(eqx.nn.Linear(4, 3, key=jax.random.PRNGKey(0)), eqx.nn.Dropout(0.1), 2.0)

    def loss(m, inputs, targets):
        return -jnp.take_along_axis(jax.nn.log_softmax(jax.vmap(m)(inputs)), targets[:, None], axis=1)[:, 0]

    grads = export_gradients(loss, [(model, 1.0)], (x, y), progress=False)
    assert [p["name"] for p in grads.metadata["params"]] == ["lin/weight", "lin/bias"] and grads.dims == (15,)
    arrays, static = eqx.partition(model, eqx.is_inexact_array)
    ref = per_example_jax_grad(lambda a, i, t: loss(eqx.combine(a, static), i, t), arrays, x, y)
    assert ref.shape == (8, 15)  # eqx.filter_grad's columns
    np.testing.assert_allclose(np.asarray(grads.matrices[0]), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    digests = {state_digest(m) for m in (model, eqx.tree_at(lambda m: m.drop.p, model, 0.5))}
    assert len(digests | {state_digest(eqx.tree_at(lambda m: m.lin.bias, model, model.lin.bias + 1))}) == 3
    with pytest.raises(ValueError, match=r"non-array leaf 'temperature' differs"):
        export_gradients(loss, [(model, 1.0), (eqx.tree_at(lambda m: m.temperature, model, 3.0), 1.0)], (x, y))
    in_dict = layout_of({"m": model.lin, "t": 2.0}, None)  # the Linear is a module: its dict is Equinox's too
    assert [in_dict.paths[i] for i in in_dict.selected] == ["m/weight", "m/bias"]
    assert [p for p, _ in layout_of({"w": model.lin.weight, "t": 2.0}, None).describe()] == ["t", "w"]


def test_one_of_several_patterns_matching_nothing_is_refused():
    """r304: a mistyped pattern next to one that matches ("l2" and a typo) is refused, naming it, rather than
    exporting the matched leaves alone."""
    params = {"l1": {"kernel": jnp.ones((2, 3))}, "l2": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    with pytest.raises(ValueError, match=r"^layers: pattern 'l3/\*' matches no floating-point parameter; parameter "):
        layout_of(params, ["l2", "l3/*"])
    both = layout_of(params, ["l2", "l1/kernel"])
    assert [both.paths[i] for i in both.selected] == ["l1/kernel", "l2/bias", "l2/kernel"]


def test_an_nnx_param_subclass_is_exported_by_default(data, per_example_jax_grad):
    """r304: a Variable type of one's own deriving from nnx.Param (a LoRA factor) is a parameter: exported by
    default with the other Params, with no warning that it was left out."""

    class Factor(nnx.Param):
        pass

    class Net(nnx.Module):
        def __init__(self):
            self.l1 = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
            self.scale = Factor(jnp.linspace(0.5, 1.5, 3))

        def __call__(self, x):
            return self.l1(x) * self.scale[...]

    x, y = data
    graphdef, state = nnx.split(Net())

    def loss(s, inputs, targets):
        logits = nnx.merge(graphdef, s)(inputs)
        return -jax.nn.log_softmax(logits)[jnp.arange(targets.shape[0]), targets]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = export_gradients(loss, [(state, 1.0)], (x, y), progress=False)
    assert [p["name"] for p in grads.metadata["params"]] == ["l1/bias/value", "l1/kernel/value", "scale/value"]
    np.testing.assert_allclose(
        np.asarray(grads.matrices[0]), per_example_jax_grad(loss, state, x, y), rtol=1e-5, atol=1e-6
    )
