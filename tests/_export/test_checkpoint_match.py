"""Scoring refuses test and train gradients exported at different checkpoints (metadata["fingerprints"]
["checkpoints"] compared where metadata["checkpoint_sources"] says both digests were made alike), and
accepts the same checkpoints given as files on one side and in memory on the other."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import tracin
from interrupts import ctrl_c_when

REFUSED = "exported at different checkpoints: checkpoints"


def _assert_refused(test, train, indices: list[int]) -> None:
    for call in (tracin.scores, tracin.top_k, tracin.aggregate):
        with pytest.raises(ValueError, match=REFUSED + " " + str(indices).replace("[", r"\[").replace("]", r"\]")):
            call(test, train)


def _drop_sources_from_manifest(path) -> None:
    """Makes the store at `path` look as a store exported before checkpoint_sources was recorded."""
    manifest = path / "manifest.json"
    doc = json.loads(manifest.read_text())
    del doc["metadata"]["checkpoint_sources"]
    manifest.write_text(json.dumps(doc))


class TestTorch:
    torch = pytest.importorskip("torch")

    @pytest.fixture
    def setup(self, tmp_path):
        torch, nn = self.torch, self.torch.nn
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        states = []
        for _ in range(4):  # four different weights
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            states.append({k: v.clone() for k, v in model.state_dict().items()})
        paths = []
        for i, s in enumerate(states):
            paths.append(str(tmp_path / f"ck{i}.pt"))
            torch.save(s, paths[-1])
        g = torch.Generator().manual_seed(1)
        data = torch.randn(9, 4, generator=g), torch.randint(0, 3, (9,), generator=g)
        return model, states, paths, data

    def _export(self, model, sources, data, **kwargs):
        from tracin.torch import export_gradients

        def loss(out, y):
            return self.torch.nn.functional.cross_entropy(out, y, reduction="none")

        lrs = [0.5, 0.25, 0.125]
        return export_gradients(model, list(zip(sources, lrs, strict=True)), data, loss, progress=False, **kwargs)

    def test_other_checkpoints_are_refused_naming_them(self, setup, tmp_path):
        model, states, paths, data = setup
        test = self._export(model, states[:3], data)
        assert test.metadata["checkpoint_sources"] == ["state"] * 3
        train = self._export(model, [states[0], states[3], states[1]], data, store=tmp_path / "train")
        _assert_refused(test, train, [1, 2])
        _assert_refused(test[:2], train[3:], [1, 2])  # row subsets
        from_files = self._export(model, [paths[0], paths[3], paths[2]], data)
        assert from_files.metadata["checkpoint_sources"] == ["file"] * 3
        _assert_refused(self._export(model, paths[:3], data), from_files, [1])

    def test_state_dicts_of_a_dataparallel_model_match_the_plain_ones(self, setup):
        model, states, _, data = setup
        plain = self._export(model, states[:3], data)
        wrapped = self._export(model, [{f"module.{k}": v for k, v in s.items()} for s in states[:3]], data)
        assert wrapped.metadata["fingerprints"]["checkpoints"] == plain.metadata["fingerprints"]["checkpoints"]
        np.testing.assert_array_equal(tracin.scores(plain, wrapped), tracin.scores(plain, plain))

    def test_the_same_checkpoints_from_files_and_state_dicts_are_accepted(self, setup, tmp_path):
        model, states, paths, data = setup
        in_memory = self._export(model, states[:3], data)
        from_files = self._export(model, paths[:3], data)
        again = self._export(model, paths[:3], data, store=tmp_path / "again")  # the same files re-exported
        mixed = self._export(model, [paths[0], states[1], paths[2]], data)
        expected = tracin.scores(in_memory, in_memory)
        for test, train in [(in_memory, from_files), (from_files, again), (mixed, in_memory), (again, mixed)]:
            sources = (test.metadata["checkpoint_sources"], train.metadata["checkpoint_sources"])
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                np.testing.assert_array_equal(tracin.scores(test, train), expected)
            unchecked = [str(r.message) for r in record if "cannot check that both sides" in str(r.message)]
            assert len(unchecked) == (sources[0] != sources[1]), unchecked  # given differently: not compared

    def test_whitened_test_side_and_factored_sets_are_compared_too(self, setup):
        model, states, _, data = setup
        test, other = self._export(model, states[:3], data), self._export(model, states[1:4], data)
        whitening = tracin.Whitening.fit(other)
        fitted_elsewhere = r"fitted on were " + REFUSED + r" \[0, 1, 2\]"
        with pytest.raises(tracin.scoring.CheckpointMismatchError, match=fitted_elsewhere):
            whitening.apply(test)  # a whitening fitted at other checkpoints is refused where it whitens
        _assert_refused(tracin.Whitening.fit(test).apply(test), other, [0, 1, 2])  # and the whitened side at scoring
        assert tracin.scores(whitening.apply(other), other).shape == (9, 9)
        factored = {"mode": "factored", "layers": ["0", "2"]}
        test = self._export(model, states[:3], data, **factored)
        assert test.n_checkpoints == 6 and len(test.metadata["fingerprints"]["checkpoints"]) == 3
        _assert_refused(test, self._export(model, [states[0], states[3], states[2]], data, **factored), [1])
        same = tracin.scores(test, self._export(model, states[:3], data, **factored), normalize=True)
        assert same.shape == (9, 9)

    def test_adam_update_train_rows_against_plain_test_rows_of_the_same_checkpoints(self, setup):
        torch = self.torch
        model, states, _, (x, y) = setup
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        opt_state = optimizer.state_dict()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        from tracin.torch import export_gradients

        def loss(out, t):
            return torch.nn.functional.cross_entropy(out, t, reduction="none")

        train = export_gradients(
            model, [(state, 0.1, opt_state)], (x, y), loss, preconditioner="adam_update", progress=False
        )
        test = export_gradients(model, [(state, 0.1)], (x, y), loss, progress=False)
        assert tracin.scores(test, train).shape == (9, 9)
        _assert_refused(export_gradients(model, [(states[0], 0.1)], (x, y), loss, progress=False), train, [0])

    def test_older_stores_are_trusted_and_the_escape_hatch_works(self, setup, tmp_path):
        model, states, _, data = setup
        test = self._export(model, states[:3], data)
        path = tmp_path / "train"
        self._export(model, states[1:4], data, store=path)
        train = tracin.GradientStore.open(path)
        _assert_refused(test, train, [0, 1, 2])
        train.metadata.pop("checkpoint_sources")  # what the error advises, on a store: lazy, nothing copied
        _assert_refused(test, tracin.GradientStore.open(path), [0, 1, 2])  # the file is untouched
        assert tracin.scores(test, train).shape == (9, 9)
        assert tracin.top_k(test, train[2:], k=3).indices.min() >= 0
        memory = self._export(model, states[1:4], data)
        memory.metadata.pop("checkpoint_sources")
        np.testing.assert_array_equal(tracin.scores(test, memory), tracin.scores(test, train))
        _drop_sources_from_manifest(path)  # a store exported before checkpoint_sources was recorded
        older = tracin.GradientStore.open(path)
        assert tracin.scores(test, older).shape == (9, 9)
        returned = self._export(model, states[1:4], data, store=path)  # exporting again returns it as it is
        assert returned.complete and "checkpoint_sources" not in returned.metadata

    def _tied_export(self, sources, data, **kwargs):
        """Exports of a model whose head shares the embedding's weight (its state_dict names both)."""
        torch, nn = self.torch, self.torch.nn
        from tracin.torch import export_gradients

        class Tied(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb, self.head = nn.Embedding(6, 4), nn.Linear(4, 6, bias=False)
                self.head.weight = self.emb.weight

            def forward(self, x):
                return self.head(torch.tanh(self.emb(x).mean(1)))

        def loss(out, y):
            return nn.functional.cross_entropy(out, y, reduction="none")

        torch.manual_seed(2)
        checkpoints = [(s, lr) for s, lr in zip(sources, [0.5, 0.25], strict=False)]
        return export_gradients(Tied(), checkpoints, data, loss, progress=False, **kwargs)

    @pytest.fixture
    def tied(self):
        torch = self.torch
        g = torch.Generator().manual_seed(3)
        full = [{"emb.weight": w, "head.weight": w} for w in torch.randn(3, 6, 4, generator=g)]
        return full, (torch.randint(0, 6, (7, 3), generator=g), torch.randint(0, 6, (7,), generator=g))

    def test_the_same_weights_with_or_without_tied_copies_in_another_dtype_or_prefixed_are_accepted(self, tied):
        full, data = tied
        reference = self._tied_export(full[:2], data)
        expected = tracin.scores(reference, reference)
        for states in (
            [{"emb.weight": s["emb.weight"]} for s in full[:2]],  # what a safetensors load gives
            [{k: v.double() for k, v in s.items()} for s in full[:2]],  # the load casts to float32
            [{f"module.{k}": v for k, v in s.items()} for s in full[:2]],
        ):
            same = self._tied_export(states, data)
            assert same.metadata["fingerprints"]["checkpoints"] == reference.metadata["fingerprints"]["checkpoints"]
            np.testing.assert_array_equal(tracin.scores(reference, same), expected)
            np.testing.assert_array_equal(tracin.scores(same, reference), expected)
        _assert_refused(reference, self._tied_export([{"emb.weight": full[0]["emb.weight"]}, full[2]], data), [1])
        _assert_refused(self._tied_export([{k: v.double() for k, v in full[2].items()}] * 2, data), reference, [0, 1])

    def test_an_older_store_holding_the_digests_of_the_raw_state_dicts_resumes_and_is_returned(self, tied, tmp_path):
        from tracin._export.fingerprint import digest_arrays
        from tracin._export.sinks import StoreSink

        full, data = tied
        states = [{f"module.{k}": v for k, v in s.items()} for s in full[:2]]  # prefixed, both tied names
        path = tmp_path / "older"
        with ctrl_c_when(StoreSink, "write", lambda c, start, block: c == 1):
            self._tied_export(states, data, store=path)
        manifest = path / "manifest.json"
        doc = json.loads(manifest.read_text())
        new_digests = doc["metadata"]["fingerprints"]["checkpoints"]
        raw = [  # what versions before checkpoint_sources digested: the names and dtypes as given
            digest_arrays([a for k in sorted(s) for a in (np.frombuffer(k.encode(), np.uint8), s[k].numpy())])
            for s in states
        ]
        assert raw[0] != new_digests[0] and raw[1] != new_digests[1]
        doc["metadata"]["fingerprints"]["checkpoints"] = raw
        manifest.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=r"other inputs: checkpoints\[0\] differs; checkpoints\[1\] differs"):
            self._tied_export(states, data, store=path)  # a store that records checkpoint_sources: new digests
        del doc["metadata"]["checkpoint_sources"]  # as the older versions wrote it
        manifest.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=r"other inputs: checkpoints\[1\] differs"):
            self._tied_export([states[0], full[2]], data, store=path)  # other weights are still refused
        resumed = self._tied_export(states, data, store=path)
        assert resumed.complete and "checkpoint_sources" not in resumed.metadata
        assert resumed.metadata["fingerprints"]["checkpoints"] == raw
        expected = self._tied_export(full[:2], data)
        for c in range(2):
            np.testing.assert_array_equal(np.load(path / f"checkpoint_{c:03d}.npy"), expected.matrices[c])
        returned = self._tied_export(states, data, store=path)  # a finished one is returned as it is
        assert returned.complete and returned.metadata["fingerprints"]["checkpoints"] == raw
        np.testing.assert_array_equal(tracin.scores(expected, returned), tracin.scores(expected, resumed))


class TestJax:
    jax = pytest.importorskip("jax")

    @pytest.fixture
    def setup(self, tmp_path):
        from flax import serialization

        jnp = self.jax.numpy
        r = np.random.default_rng(0)
        params = [
            {"w": jnp.asarray(r.normal(size=(4, 3)), jnp.float32), "b": jnp.asarray(r.normal(size=3), jnp.float32)}
            for _ in range(3)
        ]
        paths = []
        for i, p in enumerate(params):
            paths.append(tmp_path / f"p{i}.msgpack")
            paths[-1].write_bytes(serialization.msgpack_serialize(p))
        data = r.normal(size=(7, 4)).astype(np.float32), r.integers(0, 3, 7)
        return params, paths, data

    def _export(self, sources, data, **kwargs):
        from tracin.jax import export_gradients

        jax = self.jax

        def loss(params, x, y):
            logits = x @ params["w"] + params["b"]
            return -jax.numpy.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]

        checkpoints = [(s, lr) for s, lr in zip(sources, [0.5, 0.25], strict=False)]
        return export_gradients(loss, checkpoints, data, progress=False, **kwargs)

    def test_other_checkpoints_refused_same_ones_accepted_from_files_or_memory(self, setup, tmp_path):
        params, paths, data = setup
        in_memory = self._export(params[:2], data)
        from_files = self._export(paths[:2], data, store=tmp_path / "files")
        assert in_memory.metadata["checkpoint_sources"] == ["state"] * 2
        assert from_files.metadata["checkpoint_sources"] == ["file"] * 2
        expected = tracin.scores(in_memory, in_memory)
        for test, train in [(in_memory, from_files), (from_files, self._export(paths[:2], data))]:
            np.testing.assert_array_equal(tracin.scores(test, train), expected)
        _assert_refused(in_memory, self._export([params[0], params[2]], data), [1])
        _assert_refused(from_files, self._export([paths[2], paths[1]], data), [0])
        older = self._export([params[0], params[2]], data)
        older.metadata.pop("checkpoint_sources")
        assert tracin.scores(in_memory, older).shape == (7, 7)


def test_the_static_digest_note_is_for_in_memory_jax_checkpoints_only():
    """What scoring adds to a checkpoint mismatch (tracin.scoring, tests/jax for the whole case): JAX
    in-memory params were digested by their arrays alone before their static parts counted."""
    from tracin._export.resume import static_digest_note

    assert "by their arrays alone" in static_digest_note("jax", ["file", "state"])
    assert static_digest_note("jax", ["file"]) == static_digest_note("torch", ["state"]) == ""
