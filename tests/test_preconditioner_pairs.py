"""Which preconditioned sets tracin.scoring pairs (metadata["preconditioner"]), and the self-influence of
preconditioner='adam_update' rows, refused by every entry point (review36 F2, F3)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import tracin
import tracin.distributed
import tracin.report
from tracin.report import checkpoint_diagnostics


def _side(rng, n: int, kind: str | None) -> tracin.Gradients:
    meta = {"mode": "full", "preconditioner": None if kind is None else {"kind": kind, "eps": 1e-8}}
    return tracin.Gradients(rng.standard_normal((n, 6)).astype(np.float32), metadata=meta)


@pytest.mark.parametrize("test_kind", ["adam", "adam_update"])
def test_adam_update_train_rows_ask_for_plain_test_rows_whatever_the_test_side_is(rng, test_kind):
    # F3: 'adam' test rows against 'adam_update' train rows said "export both sides with the same one",
    # which is refused in turn: the advice is plain test rows
    test, train = _side(rng, 3, test_kind), _side(rng, 5, "adam_update")
    with pytest.raises(ValueError, match=r"export test rows with preconditioner=None") as e:
        tracin.scores(test, train)
    assert "same one" not in str(e.value)
    assert tracin.scores(_side(rng, 3, None), train).shape == (3, 5)


def test_other_mismatches_still_ask_for_the_same_preconditioner(rng):
    with pytest.raises(ValueError, match=r"test gradients are preconditioner='adam' but train .*=None: export both"):
        tracin.scores(_side(rng, 3, "adam"), _side(rng, 5, None))


def test_self_influence_of_adam_update_rows_is_refused_everywhere(rng, tmp_path):
    # F2: self_influence returned sum_c w_c |u_c|^2 (the next step's squared norm), which ranks rows unlike <g, u>
    rows = _side(rng, 5, "adam_update")
    writer = tracin.GradientStore.create(tmp_path / "s", 5, [6], metadata=rows.metadata)
    writer.write(0, 0, rows.kernel_side().blocks[0])
    writer.finalize()
    store = tracin.GradientStore.open(tmp_path / "s")
    refused = r"^train gradients are preconditioner='adam_update' .* no self-influence; rank by the diagonal of scores"
    for call in (
        lambda: tracin.self_influence(rows),
        lambda: tracin.self_influence(rows, per_checkpoint=True),
        lambda: tracin.self_influence(rows, whitening=tracin.Whitening.fit(rows)),
        lambda: tracin.Whitening.fit(rows).self_influence(rows),
        lambda: checkpoint_diagnostics(rows),
        lambda: tracin.distributed.self_influence(store),  # refused before any cluster is sought
    ):
        with pytest.raises(ValueError, match=refused):
            call()
    for kind in (None, "adam"):  # their self-influence is a score of a row with itself
        plain = _side(rng, 5, kind)
        expected = (plain.kernel_side().blocks[0].astype(np.float64) ** 2).sum(1)
        np.testing.assert_allclose(tracin.self_influence(plain), expected, rtol=1e-6)


# -- optimizer states (metadata["fingerprints"]["optimizer_states"], made alike: metadata["optimizer_state_sources"]):
# "adam" test and train rows of the same checkpoints weighed by different Adam states were scored without a word

STATES_DIFFER = r"^test and train were exported with different optimizer states: the optimizer states of checkpoints "


class TestTorchOptimizerStates:
    torch = pytest.importorskip("torch")

    @pytest.fixture
    def setup(self, tmp_path):
        """A 4 -> 5 -> 3 tanh MLP, its data, two checkpoints' weights and, for each, Adam states of short
        runs from those weights on different halves of the data (states[c][0] != states[c][1]), as
        copy.deepcopy(optimizer.state_dict()) and torch.save files."""
        torch, nn = self.torch, self.torch.nn
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
        weights, states = [], []
        for c in range(2):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.2 * torch.randn_like(p))
            start = copy.deepcopy(model.state_dict())
            weights.append(start)
            per_run = []
            for rows in (slice(0, 4), slice(4, 8)):  # the same start, different data
                opt = torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.85, 0.99), eps=1e-6)
                for _ in range(2 + c):
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
                    opt.step()
                per_run.append(copy.deepcopy(opt.state_dict()))
                model.load_state_dict(start)  # the checkpoint's weights again
            states.append(per_run)
        paths = []
        for c, (a, _) in enumerate(states):
            paths.append(str(tmp_path / f"opt{c}.pt"))
            torch.save(a, paths[-1])
        return model, weights, states, paths, (x, y)

    def _export(self, model, weights, states, data, **kwargs):
        from tracin.torch import export_gradients

        def loss(out, t):
            return self.torch.nn.functional.cross_entropy(out, t, reduction="none")

        checkpoints = [(w, lr, s) for w, lr, s in zip(weights, (0.5, 0.25), states, strict=True)]
        return export_gradients(model, checkpoints, data, loss, preconditioner="adam", progress=False, **kwargs)

    def _reference(self, model, weights, states, data) -> np.ndarray:
        """float64 NumPy sum_c lr_c <g_c(i) / (sqrt(v_hat_c) + eps), g_c(j) / (sqrt(v_hat_c) + eps)>: per-example
        gradients by float64 autograd, Adam's v_hat from the state_dicts."""
        torch = self.torch
        x, y = data
        total = np.zeros((len(x), len(x)))
        for w, lr, s in zip(weights, (0.5, 0.25), states, strict=True):
            ref = copy.deepcopy(model).double()
            ref.load_state_dict({k: v.double() for k, v in w.items()})
            params = list(ref.parameters())
            rows = []
            for i in range(len(x)):
                out = torch.nn.functional.cross_entropy(ref(x[i : i + 1].double()), y[i : i + 1])
                rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, params)]).numpy())
            group = s["param_groups"][0]
            (b2, eps), entries = (group["betas"][1], group["eps"]), [s["state"][i] for i in group["params"]]
            v_hat = np.concatenate(
                [e["exp_avg_sq"].double().numpy().reshape(-1) / (1 - b2 ** float(e["step"])) for e in entries]
            )
            pre = np.stack(rows) / (np.sqrt(v_hat) + eps)
            total += lr * pre @ pre.T
        return total

    def test_different_states_of_the_same_checkpoints_are_refused_naming_them(self, setup, tmp_path):
        model, weights, states, _, data = setup
        test = self._export(model, weights, [states[0][0], states[1][0]], data)
        assert test.metadata["optimizer_state_sources"] == ["state", "state"]
        path = tmp_path / "train"
        self._export(model, weights, [states[0][1], states[1][0]], data, store=path)
        train = tracin.GradientStore.open(path)
        assert train.metadata["fingerprints"]["checkpoints"] == test.metadata["fingerprints"]["checkpoints"]
        whitened = tracin.Whitening.fit(test).apply(test)
        top = tracin.top_k(test, test, k=3)
        for call in (
            lambda: tracin.scores(test, train),
            lambda: tracin.top_k(test, train, k=3),
            lambda: tracin.aggregate(test, train),
            lambda: tracin.scores(test[:3], train[2:]),  # row subsets
            lambda: tracin.scores(whitened, train),
            lambda: tracin.report.checkpoint_contributions(test, train, top),
            lambda: tracin.distributed.top_k(test, train, k=3),  # refused before any cluster is sought
            lambda: tracin.distributed.aggregate(test, train),
        ):
            with pytest.raises(tracin.scoring.CheckpointMismatchError, match=STATES_DIFFER + r"\[0\] differ") as e:
                call()
            assert e.value.checkpoints == [0] and e.value.optimizer_states
            assert "optimizer_state_sources" in str(e.value) and "pop(" in str(e.value)
        # both checkpoints' states differ: both named
        both = self._export(model, weights, [states[0][1], states[1][1]], data)
        with pytest.raises(tracin.scoring.CheckpointMismatchError, match=STATES_DIFFER + r"\[0, 1\] differ"):
            tracin.scores(test, both)
        # the escape hatch: the record dropped from one side (a store's metadata, in memory only)
        train.metadata.pop("optimizer_state_sources")
        assert tracin.scores(test, train).shape == (8, 8)
        with pytest.raises(tracin.scoring.CheckpointMismatchError, match=STATES_DIFFER):
            tracin.scores(test, tracin.GradientStore.open(path))  # the file is untouched

    def test_a_whitening_fitted_on_rows_of_other_states_is_refused(self, setup):
        # the whitening records the optimizer states of the rows it was fitted on (WhiteningSpec.space)
        model, weights, states, _, data = setup
        test = self._export(model, weights, [states[0][0], states[1][0]], data)
        train = self._export(model, weights, [states[0][1], states[1][0]], data)
        fitted = tracin.Whitening.fit(train)
        assert fitted.spec.space["optimizer_state_sources"] == ["state", "state"]
        elsewhere = r"^test and the gradients the whitening was fitted on were exported with different optimizer "
        with pytest.raises(tracin.scoring.CheckpointMismatchError, match=elsewhere + r"states: .* \[0\] differ"):
            fitted.apply(test)
        elsewhere = r"^the gradients the test side's whitening was fitted on and train were exported with different "
        whitened = tracin.Whitening.fit(test).apply(test)
        whitened.metadata.pop("optimizer_state_sources")  # its own record dropped: its whitening's still compared
        with pytest.raises(tracin.scoring.CheckpointMismatchError, match=elsewhere + r"optimizer states: .* \[0\]"):
            tracin.scores(whitened, train)
        assert tracin.scores(fitted.apply(train), train).shape == (8, 8)

    def test_whitened_self_influence_of_rows_of_other_states_is_refused(self, setup):
        # the train-rows paths of a whitening (self-influence, diagnostics) compare the optimizer states too: they
        # were let through, checkpoints compared but not states, with self-influences 165% off
        model, weights, states, _, data = setup
        fitted_on = self._export(model, weights, [states[0][0], states[1][0]], data)
        other = self._export(model, weights, [states[0][1], states[1][0]], data)
        whitening = tracin.Whitening.fit(fitted_on)
        elsewhere = r"^train were exported with different optimizer states|^train and the gradients the whitening"
        for call in (
            lambda: whitening.self_influence(other),
            lambda: tracin.self_influence(other, whitening=whitening),
            lambda: checkpoint_diagnostics(other, whitening=whitening),
        ):
            with pytest.raises(tracin.scoring.CheckpointMismatchError, match=elsewhere) as e:
                call()
            assert e.value.checkpoints == [0] and e.value.optimizer_states
        expected = tracin.scores(whitening.apply(fitted_on), fitted_on).diagonal()
        np.testing.assert_allclose(whitening.self_influence(fitted_on), expected, rtol=1e-4, atol=1e-6)

    def test_the_same_states_score_as_the_float64_reference(self, setup, tmp_path):
        model, weights, states, _, data = setup
        chosen = [states[0][0], states[1][1]]
        test = self._export(model, weights, chosen, data)
        train = self._export(model, weights, [copy.deepcopy(s) for s in chosen], data, store=tmp_path / "train")
        expected = self._reference(model, weights, chosen, data)
        got = tracin.scores(test, train)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
        np.testing.assert_allclose(tracin.aggregate(test, train), expected.sum(0), rtol=1e-4, atol=1e-4)

    def test_a_state_given_as_a_file_on_one_side_and_in_memory_on_the_other_is_not_compared(self, setup):
        model, weights, states, paths, data = setup
        from_file = self._export(model, weights, [paths[0], states[1][0]], data)
        assert from_file.metadata["optimizer_state_sources"] == ["file", "state"]
        # checkpoint 0: a file against another in-memory state (digested differently: trusted)
        memory = self._export(model, weights, [states[0][1], states[1][0]], data)
        assert tracin.scores(from_file, memory).shape == (8, 8)
        # the same file on both sides is compared like the in-memory states are
        other = self._export(model, weights, [paths[0], states[1][1]], data)
        with pytest.raises(tracin.scoring.CheckpointMismatchError, match=STATES_DIFFER + r"\[1\] differ"):
            tracin.scores(from_file, other)
        expected = self._reference(model, weights, [states[0][0], states[1][0]], data)
        memory_same = self._export(model, weights, [states[0][0], states[1][0]], data)
        np.testing.assert_allclose(
            tracin.scores(from_file, memory_same), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max()
        )

    def test_sides_without_the_record_are_trusted(self, setup):
        model, weights, states, _, data = setup
        test = self._export(model, weights, [states[0][0], states[1][0]], data)
        train = self._export(model, weights, [states[0][1], states[1][0]], data)
        for side in (test, train):  # a side exported before the record was (or with it dropped)
            older = tracin.Gradients(
                side.matrices,
                side.weights,
                metadata={k: v for k, v in side.metadata.items() if k != "optimizer_state_sources"},
            )
            pair = (older, train) if side is test else (test, older)
            assert tracin.scores(*pair).shape == (8, 8)

    def test_plain_and_adam_update_pairings_are_not_compared(self, setup):
        from tracin.torch import export_gradients

        model, weights, states, _, data = setup

        def loss(out, t):
            return self.torch.nn.functional.cross_entropy(out, t, reduction="none")

        plain = export_gradients(model, [(w, 0.5) for w in weights], data, loss, progress=False)
        update = export_gradients(
            model,
            [(w, 0.5, s[1]) for w, s in zip(weights, states, strict=True)],
            data,
            loss,
            preconditioner="adam_update",
            progress=False,
        )
        assert "optimizer_state_sources" not in plain.metadata
        assert update.metadata["optimizer_state_sources"] == ["state", "state"]
        assert tracin.scores(plain, update).shape == (8, 8)


def test_the_jax_export_records_its_states_and_is_refused_the_same_way():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    from tracin.jax import export_gradients

    jnp = jax.numpy

    def loss_fn(params, x, y):
        logits = jnp.tanh(x @ params["w"] + params["b"])
        return -jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), y]

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32), "b": jnp.zeros(3, jnp.float32)}
    x, y = rng.standard_normal((8, 4)).astype(np.float32), rng.integers(0, 3, 8)
    opt = optax.adam(0.05)
    grad = jax.grad(lambda p, xs, ys: loss_fn(p, xs, ys).mean())
    runs = []
    for rows in (slice(0, 4), slice(4, 8)):  # the same params, states of runs on different data
        state, p = opt.init(params), params
        for _ in range(2):
            updates, state = opt.update(grad(p, x[rows], y[rows]), state, p)
            p = optax.apply_updates(p, updates)
        runs.append(state)

    def export(state):
        return export_gradients(loss_fn, [(params, 0.5, state)], (x, y), preconditioner="adam", progress=False)

    test, train, again = export(runs[0]), export(runs[1]), export(runs[0])
    assert test.metadata["optimizer_state_sources"] == ["state"]
    with pytest.raises(tracin.scoring.CheckpointMismatchError, match=STATES_DIFFER + r"\[0\] differ") as e:
        tracin.scores(test, train)
    assert e.value.optimizer_states and e.value.checkpoints == [0]
    # the same state: scores as the float64 NumPy reference, lr <g / (sqrt(v_hat) + eps), ...> with the gradients
    # of -log_softmax(tanh(x w + b))[y] by hand (rows: the leaves in path order, b then w)
    adam = runs[0][0]
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    a = np.tanh(x.astype(np.float64) @ w + b)
    p = np.exp(a - a.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = (p - np.eye(3)[y]) * (1 - a**2)
    grads = {"b": dz, "w": np.einsum("ni,nj->nij", x.astype(np.float64), dz).reshape(8, -1)}
    v_hat = {k: np.asarray(adam.nu[k], np.float64).reshape(-1) / (1 - 0.999 ** float(adam.count)) for k in grads}
    pre = np.concatenate([grads[k] / (np.sqrt(v_hat[k]) + 1e-8) for k in ("b", "w")], axis=1)
    expected = 0.5 * pre @ pre.T
    np.testing.assert_allclose(tracin.scores(test, again), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_jax_adam_sides_of_other_preconditioner_options_are_refused():
    # b2 and eps weigh the rows as the second moments do: sides exported from one optax state with other
    # preconditioner_options were scored without a word (scores 80% off)
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    from tracin.jax import export_gradients

    jnp = jax.numpy

    def loss_fn(params, x, y):
        return -jax.nn.log_softmax(jnp.tanh(x @ params["w"]))[jnp.arange(x.shape[0]), y]

    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
    x, y = rng.standard_normal((6, 4)).astype(np.float32), rng.integers(0, 3, 6)
    opt = optax.adam(0.05)
    updates, state = opt.update(jax.grad(lambda p: loss_fn(p, x, y).mean())(params), opt.init(params), params)

    def export(**options):
        return export_gradients(
            loss_fn, [(params, 0.5, state)], (x, y), preconditioner="adam", progress=False, **options
        )

    default, other = export(), export(preconditioner_options={"b2": 0.9, "eps": 0.1})
    message = r"^test and train were preconditioned with other settings \(metadata\['preconditioner'\]: "
    with pytest.raises(ValueError, match=message + r"b2 0\.999 vs 0\.9, eps 1e-08 vs 0\.1\)"):
        tracin.scores(default, other)
    with pytest.raises(ValueError, match=message + r"b2 0\.9 vs 0\.999"):
        tracin.top_k(other, default, k=2)
    whitening = tracin.Whitening.fit(default)
    with pytest.raises(
        ValueError, match="^train and the gradients the whitening was fitted on were preconditioned with other"
    ):
        whitening.self_influence(other)
    with pytest.raises(ValueError, match="^test and the gradients the whitening was fitted on were preconditioned"):
        whitening.apply(other)
    same = export(preconditioner_options={"b1": 0.9, "b2": 0.999, "eps": 1e-8})  # optax.adam's defaults, spelt out
    assert tracin.scores(default, same).shape == (6, 6)
