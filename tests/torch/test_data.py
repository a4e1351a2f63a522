"""Data forms: tensor pairs, Datasets, DataLoaders, iterables of batches; tuple and dict inputs."""

from __future__ import annotations

import collections
import copy
import functools
import re
import warnings
from collections import UserDict

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tracin.torch import export_gradients
from tracin.torch.data import as_batches, batch_rows, call_model, slice_rows, tree_map


def _collect(batches):
    return [(start, inputs, targets) for start, inputs, targets in batches]


def test_tensor_pair_is_split_into_batches_with_their_start_rows():
    x, y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
    b = as_batches((x, y), 4)
    assert b.n_rows == 10 and not b.one_shot
    got = _collect(b)
    assert [s for s, _, _ in got] == [0, 4, 8]
    assert torch.equal(torch.cat([t for _, _, t in got]), y)
    assert _collect(b)[2][0] == 8  # re-iterable


def test_dict_and_tuple_inputs_are_sliced_together():
    ids, mask, y = torch.arange(12).reshape(6, 2), torch.ones(6, 2), torch.arange(6)
    got = _collect(as_batches(({"ids": ids, "mask": mask}, y), 4))
    assert got[1][1]["ids"].tolist() == [[8, 9], [10, 11]] and got[1][1]["mask"].shape == (2, 2)
    got = _collect(as_batches(((ids, mask), y), 5))
    assert isinstance(got[0][1], tuple) and got[1][1][0].tolist() == [[10, 11]]


def test_loaders_keep_their_row_counts_and_big_batches_are_split():
    ds = TensorDataset(torch.randn(11, 2), torch.arange(11))
    assert as_batches(DataLoader(ds, batch_size=3), 100).n_rows == 11
    with pytest.warns(UserWarning, match=r"drop_last=True: its last 2 of 11 rows are not exported \(rows 9 to 10\)"):
        assert as_batches(DataLoader(ds, batch_size=3, drop_last=True), 100).n_rows == 9
    got = _collect(as_batches(DataLoader(ds, batch_size=5), 2))
    assert [s for s, _, _ in got] == [0, 2, 4, 5, 7, 9, 10]
    assert as_batches(ds, 4).n_rows == 11 and len(_collect(as_batches(ds, 4))) == 3


class DictItems(Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return {"ids": torch.full((3,), i), "mask": torch.ones(3)}, torch.tensor(i % 2)


def test_datasets_of_dict_items_are_collated():
    ((start, inputs, targets),) = _collect(as_batches(DictItems(), 8))
    assert inputs["ids"].shape == (5, 3) and targets.tolist() == [0, 1, 0, 1, 0]


def test_lists_of_batches_count_rows_and_generators_are_one_shot():
    batches = [(torch.zeros(3, 2), torch.zeros(3)), (torch.zeros(2, 2), torch.zeros(2))]
    assert as_batches(batches, 10).n_rows == 5
    gen = as_batches((b for b in batches), 10)
    assert gen.one_shot and gen.n_rows is None


def test_call_model_spreads_tuples_and_dicts():
    def f(a, b=0):
        return a - b

    assert call_model(f, (5, 2)) == 3
    assert call_model(f, {"a": 5, "b": 1}) == 4
    assert call_model(lambda a: a, 7) == 7


def test_malformed_batches_are_explained():
    with pytest.raises(TypeError, match=r"batch 0 must be an \(inputs, targets\) pair"):
        _collect(as_batches([(torch.zeros(2), torch.zeros(2), torch.zeros(2))], 4))
    with pytest.raises(ValueError, match="share the batch dimension"):
        batch_rows({"a": torch.zeros(3), "b": torch.zeros(4)}, "inputs")
    with pytest.raises(ValueError, match="share the batch dimension"):
        batch_rows(torch.tensor(1.0), "targets")
    with pytest.raises(TypeError, match="got str"):
        tree_map(lambda t: t, {"a": "text"})
    with pytest.raises(ValueError, match="shuffle=False"):
        as_batches(DataLoader(TensorDataset(torch.zeros(3), torch.zeros(3)), shuffle=True), 2)


def _loader(**kwargs):
    return DataLoader(TensorDataset(torch.arange(6.0), torch.arange(6)), **kwargs)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _loader(sampler=torch.utils.data.SubsetRandomSampler(range(6))),
        lambda: _loader(sampler=torch.utils.data.WeightedRandomSampler([1.0] * 6, 6)),
        lambda: _loader(
            sampler=torch.utils.data.DistributedSampler(
                TensorDataset(torch.arange(6.0), torch.arange(6)), num_replicas=1, rank=0, shuffle=True
            )
        ),
        lambda: _loader(
            batch_sampler=torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(range(6)), 2, False)
        ),
    ],
)
def test_loaders_that_do_not_read_in_order_are_refused(make):
    with pytest.raises(ValueError, match=r"DataLoader drawing rows with \w+Sampler.*shuffle=False"):
        as_batches(make(), 4)


def test_a_batch_sampler_over_a_sequential_sampler_is_accepted():
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(range(6)), 4, False)
    got = _collect(as_batches(_loader(batch_sampler=sampler), 3))
    assert [s for s, _, _ in got] == [0, 3, 4] and torch.equal(torch.cat([t for *_, t in got]), torch.arange(6))


def test_numpy_arrays_are_taken_as_tensors_without_a_copy():
    import numpy as np

    x, y = np.arange(8.0).reshape(4, 2), np.arange(4)
    ((start, inputs, targets),) = _collect(as_batches((x, y), 8))
    assert isinstance(inputs, torch.Tensor) and np.shares_memory(inputs.numpy(), x)
    assert targets.tolist() == [0, 1, 2, 3]
    ((_, inputs, _),) = _collect(as_batches([(x, y)], 8))
    assert isinstance(inputs, torch.Tensor)
    with pytest.raises(TypeError, match="pair of torch tensors"):
        as_batches(x, 4)


@pytest.mark.parametrize(
    "data",
    [
        (torch.zeros(0, 2), torch.zeros(0)),
        TensorDataset(torch.zeros(0, 2), torch.zeros(0)),
        [(torch.zeros(0, 2), torch.zeros(0))],
        lambda: DataLoader(TensorDataset(torch.zeros(0, 2), torch.zeros(0)), batch_size=2),
    ],
)
def test_empty_data_is_refused(data):
    with pytest.raises(ValueError, match="data has no rows"):
        as_batches(data() if callable(data) else data, 4)


def test_which_pairs_of_two_are_one_pair_of_inputs_and_targets():
    x, y, w = torch.randn(4, 3), torch.arange(4), torch.ones(4)
    assert as_batches((x, (y, w)), 8).n_rows == 4 and as_batches([x, [y, w]], 8).n_rows == 4
    two = as_batches([(x, y), (x[:2], y[:2])], 8)  # both items pairs: two batches
    assert two.n_rows == 6 and [len(t) for _, _, t in _collect(two)] == [4, 2]
    with pytest.raises(ValueError, match=r"targets\['b'\] has 3 rows, inputs\['a'\] has 4 rows"):
        as_batches([{"a": x}, {"b": y[:3]}], 8)  # two dicts are never two batches


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            ({"x": torch.randn(6, 4)}, {"y": torch.arange(6), "cw": torch.ones(3)}),
            r"targets\['cw'\] has 3 rows, inputs\['x'\] has 6 rows: every leaf of a pair needs one row",
        ),
        (
            ({"x": torch.randn(6, 4), "m": (torch.ones(6), np.ones(2))}, {"y": torch.arange(6)}),
            r"inputs\['m'\]\[1\] has 2 rows, inputs\['x'\] has 6 rows",
        ),
        (
            ({"x": torch.randn(6, 4)}, {"y": torch.arange(6), "t": torch.tensor(2.0)}),
            # a 0-d tensor: a setting, named as any leaf without rows is (as tracin.jax does)
            r"data targets\['t'\]: expected an array or tensor with a leading batch dimension .*got a 0-d tensor "
            r"\(float32\).*functools\.partial\(loss_fn, t=\.\.\.\)",
        ),
    ],
)
def test_a_pair_of_dicts_with_a_leaf_of_other_rows_names_that_leaf(data, message):
    """Was read as two batches: 'batch 0 must be an (inputs, targets) pair ... got dict (split each item
    into (inputs, targets) ...)', although the data was such a pair."""
    with pytest.raises(ValueError, match=message):
        as_batches(data, 4)


def test_two_dicts_of_common_rows_are_one_pair_hugging_face_style():
    """({'input_ids': x}, {'labels': y}) was refused as two dict batches (6332e45); it is one pair again."""
    torch.manual_seed(0)
    x, y, w = torch.randn(6, 4), torch.randint(0, 3, (6,)), torch.rand(6)

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, input_ids):
            return self.lin(input_ids)

    def loss(out, t):
        return nn.functional.cross_entropy(out, t["labels"], reduction="none") * t["w"]

    model = Keyword()
    data = ({"input_ids": x}, {"labels": y, "w": w})
    assert as_batches(data, 4).n_rows == 6 and as_batches(list(data), 4).n_rows == 6
    g = export_gradients(model, [(model.state_dict(), 1.0)], data, loss, batch_size=4, progress=False)
    twin = copy.deepcopy(model).double()
    want = []
    for i in range(6):
        t = {"labels": y[i : i + 1], "w": w[i : i + 1].double()}
        part = loss(twin(input_ids=x[i : i + 1].double()), t).sum()
        want.append(torch.cat([p.reshape(-1) for p in torch.autograd.grad(part, list(twin.parameters()))]))
    np.testing.assert_allclose(g.matrices[0], torch.stack(want).numpy(), rtol=1e-5, atol=1e-7)


class _Encoding(UserDict):
    """A Mapping that is not a dict, as transformers' BatchEncoding (what a tokenizer returns)."""


def test_inputs_in_any_mapping_are_taken_as_a_dict_of_tensors():
    """(BatchEncoding, labels) was refused: 'batch 0 must be an (inputs, targets) pair ... got BatchEncoding'."""
    torch.manual_seed(0)
    x, mask, y = torch.randn(5, 4), torch.rand(5, 4), torch.randint(0, 3, (5,))

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, input_ids, attention_mask):
            return self.lin(input_ids * attention_mask)

    def loss(out, t):
        return nn.functional.cross_entropy(out, t, reduction="none")

    model = Keyword()
    twin = copy.deepcopy(model).double()
    want = []
    for i in range(5):
        part = loss(twin(x[i : i + 1].double(), mask[i : i + 1].double()), y[i : i + 1]).sum()
        want.append(torch.cat([p.reshape(-1) for p in torch.autograd.grad(part, list(twin.parameters()))]))
    enc = _Encoding(input_ids=x, attention_mask=mask)
    assert call_model(lambda **kw: sorted(kw), enc) == ["attention_mask", "input_ids"]
    for data in [(enc, y), [(enc, y)]]:  # one pair, a list of batches
        assert as_batches(data, 4).n_rows == 5
        g = export_gradients(model, [(model.state_dict(), 1.0)], data, loss, batch_size=4, progress=False)
        np.testing.assert_allclose(g.matrices[0], torch.stack(want).numpy(), rtol=1e-5, atol=1e-7)


def test_a_transformers_batch_encoding_is_taken_as_inputs():
    transformers = pytest.importorskip("transformers")
    x, y = torch.randn(3, 2), torch.arange(3)
    got = _collect(as_batches((transformers.BatchEncoding({"input_ids": x}), y), 2))
    assert [s for s, _, _ in got] == [0, 2] and torch.equal(got[1][1]["input_ids"], x[2:])


def test_one_pair_may_have_a_dict_of_targets():
    """(inputs, {"y": ...}) was read as a list of batches ('batch 0 must be a pair, got Tensor')."""
    x, y, w = torch.randn(10, 3), torch.randint(0, 2, (10,)), torch.rand(10)
    b = as_batches((x, {"y": y, "w": w}), 4)
    assert b.n_rows == 10 and not b.one_shot
    got = _collect(b)
    assert [s for s, _, _ in got] == [0, 4, 8]
    assert torch.equal(torch.cat([t["w"] for _, _, t in got]), w)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)

    def weighted(out, t):
        return nn.functional.cross_entropy(out, t["y"], reduction="none") * t["w"]

    g = export_gradients(model, [(model.state_dict(), 1.0)], (x, {"y": y, "w": w}), weighted, progress=False)
    twin = copy.deepcopy(model).double()
    want = []
    for i in range(10):
        loss = weighted(twin(x[i : i + 1].double()), {"y": y[i : i + 1], "w": w[i : i + 1].double()}).sum()
        want.append(torch.cat([p.reshape(-1) for p in torch.autograd.grad(loss, list(twin.parameters()))]))
    np.testing.assert_allclose(g.matrices[0], torch.stack(want).numpy(), rtol=1e-5, atol=1e-7)


class DictOnly(Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return {"ids": torch.arange(3), "labels": torch.tensor(i)}


def test_batches_that_are_not_pairs_say_how_to_fix_them():
    x, y = torch.zeros(4, 2), torch.zeros(4)
    with pytest.raises(TypeError, match=r"got Tensor \(data is read as .*a tuple or list of two is one"):
        _collect(as_batches((x, y, y), 4))
    with pytest.raises(TypeError, match=r"got dict \(split each item into \(inputs, targets\)"):
        _collect(as_batches(DictOnly(), 4))


def test_a_loader_dropping_its_last_rows_warns_and_one_dropping_none_does_not():
    """Was: DataLoader(drop_last=True) exported 10 of 12 rows without a word (review1 t_droplast.py)."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    ds = TensorDataset(torch.randn(12, 5), torch.randint(0, 3, (12,)))
    loss = nn.CrossEntropyLoss(reduction="none")
    with pytest.warns(UserWarning, match=r"last 2 of 12 rows are not exported.*drop_last=False") as caught:
        g = export_gradients(
            model, [(model.state_dict(), 1.0)], DataLoader(ds, batch_size=5, drop_last=True), loss, progress=False
        )
    assert g.matrices[0].shape[0] == 10 and caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = export_gradients(
            model, [(model.state_dict(), 1.0)], DataLoader(ds, batch_size=4, drop_last=True), loss, progress=False
        )
    assert g.matrices[0].shape[0] == 12


class _Rows(torch.utils.data.IterableDataset):
    """12 rows of an IterableDataset without len()."""

    def __init__(self, ds):
        self.ds = ds

    def __iter__(self):
        return iter(self.ds)


def test_a_batch_sampler_or_a_dataset_without_len_dropping_rows_warns():
    """Was silent (review5 droplast.py): a BatchSampler(drop_last=True) given as batch_sampler (the
    loader's batch_size is None), and drop_last=True over an IterableDataset without len()."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    ds = TensorDataset(torch.randn(12, 5), torch.randint(0, 3, (12,)))
    loss = nn.CrossEntropyLoss(reduction="none")
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(ds), 5, drop_last=True)
    loaders = {
        r"last 2 of 12 rows are not exported \(rows 10 to 11\)": DataLoader(ds, batch_sampler=sampler),
        r"dataset, which has no len\(\), may not be exported": DataLoader(_Rows(ds), batch_size=5, drop_last=True),
    }
    for message, loader in loaders.items():
        with pytest.warns(UserWarning, match=message + ".*drop_last=False") as caught:
            g = export_gradients(model, [(model.state_dict(), 1.0)], loader, loss, progress=False)
        assert g.matrices[0].shape[0] == 10 and caught[0].filename == __file__
    kept = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(ds), 4, drop_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = export_gradients(
            model, [(model.state_dict(), 1.0)], DataLoader(ds, batch_sampler=kept), loss, progress=False
        )
    assert g.matrices[0].shape[0] == 12


def _float64_rows(model, examples, loss, call=None):
    """Per-example float64 autograd gradients (one example at a time) over the trainable parameters."""
    twin = copy.deepcopy(model).double()
    params = [p for p in twin.parameters() if p.requires_grad]
    rows = []
    for inputs, target in examples:
        inputs = tree_map(lambda t: t.double() if t.is_floating_point() else t, inputs)
        out = call_model(twin, inputs) if call is None else call(twin, inputs)
        part = loss(out, target).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(part, params)]))
    return torch.stack(rows).numpy()


def _bucket_data(n=8):
    torch.manual_seed(0)
    x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
    return TensorDataset(x, y), x, y


class _BucketBatchSampler(torch.utils.data.BatchSampler):
    """Batches in the order of a sort key, as length-bucketing samplers do (torchnlp's BucketBatchSampler)."""

    def __init__(self, sampler, batch_size, key):
        super().__init__(sampler, batch_size, drop_last=False)
        self.key = key

    def __iter__(self):
        order = sorted(self.sampler, key=self.key)
        for k in range(0, len(order), self.batch_size):
            yield order[k : k + self.batch_size]


class _Backwards(torch.utils.data.SequentialSampler):
    def __iter__(self):
        return iter(range(len(self.data_source) - 1, -1, -1))


class _Uneven:
    """A batch sampler of its own (not a BatchSampler): batches of 1, 2, 3... rows, in dataset order, of the
    first `stop` rows."""

    def __init__(self, stop):
        self.stop = stop

    def __iter__(self):
        start, size = 0, 1
        while start < self.stop:
            yield list(range(start, min(start + size, self.stop)))
            start, size = start + size, size + 1


def test_a_batch_sampler_or_sampler_reordering_rows_is_refused():
    """Was silent (review31 s16_bucket.py): a BatchSampler subclass over a SequentialSampler passed the
    type check and rows 1-7 of the export were the gradients of other examples than 1-7."""
    ds, x, _ = _bucket_data()
    bucket = _BucketBatchSampler(torch.utils.data.SequentialSampler(ds), 4, key=lambda i: float(x[i, 0]))
    order = [i for b in bucket for i in b]
    assert order != list(range(8))
    first_wrong = next(i for i, j in enumerate(order) if i != j)
    with pytest.raises(
        ValueError,
        match=rf"drawing rows with _BucketBatchSampler \(a batch_sampler handing out the dataset's examples out of "
        rf"order: row {first_wrong} is example {order[first_wrong]}.*shuffle=False",
    ):
        as_batches(DataLoader(ds, batch_sampler=bucket), 4)
    with pytest.raises(ValueError, match=r"_Backwards \(a sampler handing out .*: row 0 is example 7, row 1 is"):
        as_batches(DataLoader(ds, sampler=_Backwards(ds), batch_size=3), 4)
    with pytest.raises(ValueError, match=r"_Backwards \(a sampler handing out .*row 0 is example 7"):
        as_batches(DataLoader(ds, sampler=_Backwards(ds), batch_size=None), 4)


@pytest.mark.parametrize("chunk", [list, np.array, torch.tensor])
def test_batch_size_none_samplers_of_index_chunks_are_checked_row_by_row(chunk):
    """A sampler handing out several indices at a time, each chunk one __getitem__ of batch_size=None: was
    accepted unchecked (review33: a bucketing one exported 0 of 8 right rows; tensor chunks crashed)."""
    ds, x, y = _bucket_data()
    backwards = [chunk([4, 5, 6, 7]), chunk([0, 1, 2, 3])]
    with pytest.raises(ValueError, match=r"a sampler handing out .*: row 0 is example 4, row 1 is example 5"):
        as_batches(DataLoader(ds, sampler=backwards, batch_size=None), 4)
    model, loss = nn.Linear(5, 3), nn.CrossEntropyLoss(reduction="none")
    in_order = DataLoader(ds, sampler=[chunk([0, 1, 2]), chunk([3, 4, 5, 6, 7])], batch_size=None)
    g = export_gradients(model, [(model.state_dict(), 1.0)] * 2, in_order, loss, progress=False)
    want = _float64_rows(model, [(x[i : i + 1], y[i : i + 1]) for i in range(8)], loss)
    for m in g.matrices:
        np.testing.assert_allclose(m, want, rtol=1e-5, atol=1e-7)


class _KeyedByTuples(torch.utils.data.Dataset):
    """Examples keyed by (row, augmentation) tuples: a key, not two rows."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        row, augmentation = key
        return self.x[row] * (1 + augmentation), self.y[row]


class _OwnBatches:
    """A batch sampler of its own whose `sampler` attribute is not a sampler (not iterable)."""

    sampler = len

    def __iter__(self):
        return iter([[0, 1, 2], [3, 4, 5, 6, 7]])


def test_sampler_items_that_are_keys_masks_or_odd_attributes_are_read_as_they_mean():
    """review35: tuple keys were unpacked into two 'rows' (a right loader refused), a boolean mask read as
    indices 1, 1, 0..., a non-iterable .sampler in the chain a TypeError."""
    ds, x, y = _bucket_data()
    model, loss = nn.Linear(5, 3), nn.CrossEntropyLoss(reduction="none")
    want = _float64_rows(model, [(x[i : i + 1], y[i : i + 1]) for i in range(8)], loss)
    mask = torch.zeros(8, dtype=torch.bool)
    mask[:4] = True
    for loader in [
        DataLoader(_KeyedByTuples(x, y), sampler=[(i, 0) for i in range(8)], batch_size=3),
        DataLoader(ds, sampler=[mask, ~mask], batch_size=None),
        DataLoader(ds, batch_sampler=_OwnBatches()),
    ]:
        g = export_gradients(model, [(model.state_dict(), 1.0)], loader, loss, progress=False)
        np.testing.assert_allclose(g.matrices[0], want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"a sampler handing out .*: row 0 is example 4"):
        as_batches(DataLoader(ds, sampler=[~mask, mask], batch_size=None), 4)


@pytest.mark.parametrize("batch_size", [None, 3])
def test_a_sampler_read_once_is_refused_before_it_is_used_up(batch_size):
    """An iterator as sampler: checking its order would use it up, and the export then said the data gave
    0 rows (review33)."""
    ds, _, _ = _bucket_data()
    with pytest.raises(ValueError, match=r"drawing rows with range_iterator, an iterator, read once"):
        as_batches(DataLoader(ds, sampler=iter(range(8)), batch_size=batch_size), 4)
    with pytest.raises(ValueError, match=r"drawing rows with list_iterator, an iterator, read once"):
        as_batches(DataLoader(ds, batch_sampler=iter([[0, 1], [2, 3]])), 4)


def test_samplers_handing_out_rows_in_order_are_accepted_and_their_rows_are_the_examples():
    ds, x, y = _bucket_data()
    model, loss = nn.Linear(5, 3), nn.CrossEntropyLoss(reduction="none")
    want = _float64_rows(model, [(x[i : i + 1], y[i : i + 1]) for i in range(8)], loss)
    in_order = _BucketBatchSampler(torch.utils.data.SequentialSampler(ds), 3, key=lambda i: i)
    distributed = torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, shuffle=False)
    for loader in [
        DataLoader(ds, batch_sampler=in_order),
        DataLoader(ds, batch_sampler=_Uneven(8)),
        DataLoader(ds, sampler=distributed, batch_size=3),
        DataLoader(
            batches := [(x[:3], y[:3]), (x[3:], y[3:])],
            sampler=torch.utils.data.DistributedSampler(batches, num_replicas=1, rank=0, shuffle=False),
            batch_size=None,
        ),
    ]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert as_batches(loader, 4).n_rows == (None if loader.batch_sampler is None else 8)
            g = export_gradients(model, [(model.state_dict(), 1.0)] * 2, loader, loss, progress=False)
        for m in g.matrices:
            np.testing.assert_allclose(m, want, rtol=1e-5, atol=1e-7)


def test_a_sampler_stopping_early_in_order_exports_its_rows_and_warns():
    ds, x, y = _bucket_data()
    model, loss = nn.Linear(5, 3), nn.CrossEntropyLoss(reduction="none")
    with pytest.warns(
        UserWarning,
        match=r"batch_sampler _Uneven hands out examples 0 to 5 of its dataset's 8: the "
        r"last 2 \(rows 6 to 7\) are not exported",
    ) as caught:
        g = export_gradients(
            model, [(model.state_dict(), 1.0)], DataLoader(ds, batch_sampler=_Uneven(6)), loss, progress=False
        )
    assert caught[0].filename == __file__
    want = _float64_rows(model, [(x[i : i + 1], y[i : i + 1]) for i in range(6)], loss)
    np.testing.assert_allclose(g.matrices[0], want, rtol=1e-5, atol=1e-7)


def test_torchs_own_batch_sampler_over_a_sequential_sampler_is_not_iterated(monkeypatch):
    def never(self):
        raise AssertionError("iterated")

    ds, _, _ = _bucket_data()
    monkeypatch.setattr(torch.utils.data.SequentialSampler, "__iter__", never)
    assert as_batches(DataLoader(ds, batch_size=3), 4).n_rows == 8
    assert as_batches(DataLoader(ds, batch_size=None), 4).n_rows is None  # each item a batch: rows unknown


class _Sequences(torch.utils.data.IterableDataset):
    """(ids (T,), tags (T,)) items, one per sequence."""

    def __init__(self, ids, tags):
        self.ids, self.tags = ids, tags

    def __iter__(self):
        return iter(zip(self.ids, self.tags, strict=True))


class _SequenceBatches(_Sequences):
    def __iter__(self):
        return iter((self.ids[i : i + 3], self.tags[i : i + 3]) for i in range(0, len(self.ids), 3))


class _Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(20, 4), nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def _sequence_loss(out, tags):
    """Mean token cross-entropy per sequence."""
    return nn.functional.cross_entropy(out.movedim(-1, 1), tags, reduction="none").mean(-1)


def test_an_iterable_dataset_passed_directly_is_refused_and_through_a_loader_gives_one_row_per_item():
    """Was (review31 s15_iterable_items.py): its items were read as batches, so 4 sequences of 6 tokens
    exported 24 rows, one per token, with no word."""
    torch.manual_seed(0)
    ids, tags = torch.randint(0, 20, (5, 6)), torch.randint(0, 3, (5, 6))
    model = _Tagger()
    with pytest.raises(
        TypeError,
        match=r"IterableDataset \(_Sequences\).*DataLoader\(data, batch_size=64\) when it "
        r"yields single .*DataLoader\(data, batch_size=None\) when it yields",
    ):
        as_batches(_Sequences(ids, tags), 4)
    want = _float64_rows(model, [(ids[i : i + 1], tags[i : i + 1]) for i in range(5)], _sequence_loss)
    for loader in [
        DataLoader(_Sequences(ids, tags), batch_size=2),
        DataLoader(_SequenceBatches(ids, tags), batch_size=None),
    ]:
        g = export_gradients(model, [(model.state_dict(), 1.0)], loader, _sequence_loss, progress=False)
        assert g.n_rows == 5
        np.testing.assert_allclose(g.matrices[0], want, rtol=1e-5, atol=1e-7)


_Inputs = collections.namedtuple("_Inputs", "x mask")


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x, mask):
        return self.lin(x * mask)


class _NamedItems(Dataset):
    def __init__(self, x, mask, y):
        self.x, self.mask, self.y = x, mask, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return _Inputs(self.x[i], self.mask[i]), self.y[i]


def test_namedtuple_inputs_are_kept_and_passed_positionally():
    """Were a TypeError from the namedtuple's constructor (review31 s11_namedtuple.py), whatever the form."""
    torch.manual_seed(0)
    x, mask, y = torch.randn(6, 5), (torch.rand(6, 5) > 0.2).float(), torch.randint(0, 3, (6,))
    got = _collect(as_batches((_Inputs(x, mask), y), 4))
    assert isinstance(got[1][1], _Inputs) and torch.equal(got[1][1].mask, mask[4:])
    assert isinstance(tree_map(lambda t: t, _Inputs(x, mask)), _Inputs)
    model, loss = _Masked(), nn.CrossEntropyLoss(reduction="none")
    want = _float64_rows(model, [(_Inputs(x[i : i + 1], mask[i : i + 1]), y[i : i + 1]) for i in range(6)], loss)
    forms = [
        ((_Inputs(x, mask), y), None),
        ((_Inputs(x, mask), y), 2),
        ([(_Inputs(x[:4], mask[:4]), y[:4]), (_Inputs(x[4:], mask[4:]), y[4:])], None),
        ((_Inputs(x.numpy(), mask.numpy()), y.numpy()), 4),
        (_NamedItems(x, mask, y), 4),
        (DataLoader(_NamedItems(x, mask, y), batch_size=4), None),
    ]
    for data, batch_size in forms:
        g = export_gradients(model, [(model.state_dict(), 1.0)], data, loss, batch_size=batch_size, progress=False)
        np.testing.assert_allclose(g.matrices[0], want, rtol=1e-5, atol=1e-7)


class _Stream(torch.utils.data.IterableDataset):
    """(x, y) examples in order; sharded over the loader's workers when `shard`."""

    def __init__(self, x, y, shard=False):
        self.x, self.y, self.shard = x, y, shard

    def __iter__(self):
        info = torch.utils.data.get_worker_info() if self.shard else None
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        return iter(zip(self.x[start::step], self.y[start::step], strict=True))


def test_an_iterable_dataset_read_by_several_workers_warns_that_rows_repeat_or_interleave():
    """Was silent (review56 F1): with num_workers=2 each worker replayed the stream, 10 examples
    exported as 20 rows (row 4 was example 0 again), and a sharded stream's rows interleave."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    loss = nn.CrossEntropyLoss(reduction="none")
    ck = [(model.state_dict(), 1.0)]
    want = export_gradients(model, ck, (x, y), loss, progress=False).matrices[0]
    pattern = (
        r"IterableDataset \(_Stream\) with num_workers=2: each worker runs the dataset's iterator.*"
        r"get_worker_info\(\).*interleaves.*row i is the loader's i-th example.*num_workers=0 or 1"
    )
    with pytest.warns(UserWarning, match=pattern) as caught:
        g = export_gradients(model, ck, DataLoader(_Stream(x, y), batch_size=4, num_workers=2), loss, progress=False)
    assert caught[0].filename == __file__
    assert g.n_rows == 20 and np.array_equal(g.matrices[0][4], want[0])  # what the warning is about
    with pytest.warns(UserWarning, match=pattern):
        g = export_gradients(
            model, ck, DataLoader(_Stream(x, y, shard=True), batch_size=2, num_workers=2), loss, progress=False
        )
    order = [0, 2, 1, 3, 4, 6, 5, 7, 8, 9]  # worker 0 has the even examples, worker 1 the odd ones
    np.testing.assert_allclose(g.matrices[0], want[order], rtol=1e-6, atol=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for workers in (0, 1):
            loader = DataLoader(_Stream(x, y), batch_size=4, num_workers=workers)
            g = export_gradients(model, ck, loader, loss, progress=False)
            np.testing.assert_allclose(g.matrices[0], want, rtol=1e-6, atol=1e-8)
        loader = DataLoader(TensorDataset(x, y), batch_size=4, num_workers=2)  # map-style: each row once
        np.testing.assert_allclose(
            export_gradients(model, ck, loader, loss, progress=False).matrices[0], want, rtol=1e-6, atol=1e-8
        )


class _OneArgLoss(nn.Module):
    def forward(self, outputs):
        return outputs.logsumexp(1)


def _keyword_only_loss(outputs, *, targets):
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def _loss_with_options(outputs, targets, smoothing=0.0, *rest):
    return nn.functional.cross_entropy(outputs, targets, reduction="none", label_smoothing=smoothing)


@pytest.mark.parametrize(
    "loss_fn, shown",
    [
        (lambda out: out.logsumexp(1), r"<lambda>\(out\) cannot take them \(too many positional arguments\)"),
        (_OneArgLoss(), r"_OneArgLoss.forward\(outputs\) cannot take them"),
        (_keyword_only_loss, r"_keyword_only_loss\(outputs, \*, targets\) cannot take them"),
    ],
)
def test_a_loss_fn_that_cannot_take_outputs_and_targets_says_how_it_is_called(loss_fn, shown):
    """Was (review56 F3): torch's raw "<lambda>() takes 1 positional argument but 2 were given", raised
    from inside tracin after a forward pass, with no word of how tracin calls loss_fn. Explained after the
    call's TypeError (review60 F1: not up front), which it names."""
    model = nn.Linear(4, 3)
    data = (torch.randn(5, 4), torch.randint(0, 3, (5,)))
    with pytest.raises(
        TypeError, match=r"loss_fn is called as loss_fn\(outputs, targets\).*" + shown + r".*\(the call raised: .+\)"
    ):
        export_gradients(model, [(model.state_dict(), 1.0)], data, loss_fn, progress=False)


class _CallSuppliesReduction(nn.Module):
    """__call__ supplies forward's third argument."""

    def __call__(self, outputs, targets):
        return self.forward(outputs, targets, "none")

    def forward(self, outputs, targets, reduction):
        return nn.functional.cross_entropy(outputs, targets, reduction=reduction)


class _HookSuppliesReduction(nn.Module):
    """A forward pre-hook appends forward's third argument."""

    def __init__(self):
        super().__init__()
        self.register_forward_pre_hook(lambda module, args: (*args, "none"))

    def forward(self, outputs, targets, reduction):
        return nn.functional.cross_entropy(outputs, targets, reduction=reduction)


def _supplying_reduction(loss):
    @functools.wraps(loss)  # inspect.signature reports loss's three arguments
    def wrapper(outputs, targets):
        return loss(outputs, targets, "none")

    return wrapper


@_supplying_reduction
def _wrapped_cross_entropy(outputs, targets, reduction):
    return nn.functional.cross_entropy(outputs, targets, reduction=reduction)


@pytest.mark.parametrize("mode", ["full", "last_layer"])
@pytest.mark.parametrize(
    "loss_fn",
    [_CallSuppliesReduction(), _HookSuppliesReduction(), _wrapped_cross_entropy],
    ids=["call", "pre_hook", "wraps"],
)
def test_loss_fns_whose_signature_shows_more_arguments_than_the_call_takes_are_accepted(loss_fn, mode):
    """Was (review60 F1): refused up front as unable to take (outputs, targets), from forward's or the wrapped
    function's signature, though each works called so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    ck = [(model.state_dict(), 1.0)]
    plain = nn.CrossEntropyLoss(reduction="none")
    want = export_gradients(model, ck, (x, y), plain, mode=mode, progress=False)
    got = export_gradients(model, ck, (x, y), loss_fn, mode=mode, progress=False)
    blocks = ("matrices",) if mode == "full" else ("left", "right")
    for block in blocks:
        for g, w in zip(getattr(got, block), getattr(want, block), strict=True):
            np.testing.assert_array_equal(g, w)
    if mode == "full":
        reference = _float64_rows(model, [(x[i : i + 1], y[i : i + 1]) for i in range(6)], plain)
        np.testing.assert_allclose(got.matrices[0], reference, rtol=1e-5, atol=1e-7)


def test_a_torch_script_loss_module_gives_the_plain_losss_rows():
    """Was (review60 note): AttributeError 'OrderedModuleDict' object has no attribute 'get', from the loss's
    fingerprint."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    ck = [(model.state_dict(), 1.0)]
    plain = nn.CrossEntropyLoss(reduction="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated in torch 2.x
        scripted = torch.jit.script(nn.CrossEntropyLoss(reduction="none"))
    got = export_gradients(model, ck, (x, y), scripted, progress=False)
    want = export_gradients(model, ck, (x, y), plain, progress=False)
    np.testing.assert_array_equal(got.matrices[0], want.matrices[0])
    assert got.metadata["fingerprints"]["loss"].startswith("torch.jit.ScriptModule CrossEntropyLoss torch_script=")


def test_a_type_error_inside_a_loss_fn_that_takes_outputs_and_targets_surfaces_unchanged():
    def loss_fn(outputs, targets):
        return nn.functional.cross_entropy(outputs, targets, reduction="none", smoothing=0.1)

    model = nn.Linear(4, 3)
    data = (torch.randn(5, 4), torch.randint(0, 3, (5,)))
    with pytest.raises(TypeError, match="smoothing") as caught:
        export_gradients(model, [(model.state_dict(), 1.0)], data, loss_fn, progress=False)
    assert "loss_fn is called as" not in str(caught.value)


def test_loss_fns_taking_outputs_and_targets_among_other_arguments_are_accepted():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    want = _float64_rows(model, [(x[i : i + 1], y[i : i + 1]) for i in range(5)], _loss_with_options)
    for loss_fn in (_loss_with_options, nn.CrossEntropyLoss(reduction="none"), lambda *a: _loss_with_options(*a)):
        g = export_gradients(model, [(model.state_dict(), 1.0)], (x, y), loss_fn, progress=False)
        np.testing.assert_allclose(g.matrices[0], want, rtol=1e-5, atol=1e-7)


class _BatchDictModel(nn.Module):
    """forward(self, batch) taking one dict, as many training loops write it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 5), nn.Linear(2, 5), nn.Linear(5, 3)

    def forward(self, batch):
        return self.head(torch.relu(self.a(batch["u"]) + self.b(batch["v"])))


@pytest.mark.parametrize("mode", ["full", "last_layer", "factored"])
def test_a_model_taking_one_dict_says_dicts_are_keywords_and_takes_a_tuple_of_it(mode):
    """Was (review56 F3): "forward() got an unexpected keyword argument 'u'" with no hint that dict inputs
    are passed as model(**inputs)."""
    torch.manual_seed(0)
    model = _BatchDictModel()
    x, y = {"u": torch.randn(6, 3), "v": torch.randn(6, 2)}, torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss(reduction="none")
    ck = [(model.state_dict(), 1.0)]
    with pytest.raises(
        TypeError,
        match=r"_BatchDictModel.forward\(batch\) cannot take the batch's inputs .*model\(\*\*inputs\) for dict "
        r"inputs.*as a tuple of that dict, \(batch,\)",
    ):
        export_gradients(model, ck, (x, y), loss, mode=mode, progress=False)
    got = export_gradients(model, ck, ((x,), y), loss, mode=mode, progress=False)
    if mode == "full":
        examples = [((slice_rows(x, i, i + 1),), y[i : i + 1]) for i in range(6)]
        np.testing.assert_allclose(got.matrices[0], _float64_rows(model, examples, loss), rtol=1e-5, atol=1e-7)
    else:
        assert got.n_rows == 6


class _MaskedBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(10, 4), nn.Linear(4, 3)

    def forward(self, ids, mask=None):
        z = self.emb(ids)
        if mask is not None:
            z = z * mask[..., None]
        return self.out(z.mean(1))


def _weighted_loss(out, targets):
    labels, weights = targets
    return weights * nn.functional.cross_entropy(out, labels, reduction="none")


@pytest.mark.parametrize("mode", ["full", "last_layer"])
def test_an_error_on_data_read_as_two_batches_says_how_it_was_read(mode):
    """Was (review56 F4): ((ids, mask), (labels, weights)) is two batches by PAIR_RULE, and the user saw only
    their loss's "too many values to unpack", with no word of how the data was read."""
    torch.manual_seed(0)
    model = _MaskedBag()
    ids, mask = torch.randint(0, 10, (6, 5)), (torch.rand(6, 5) > 0.3).float()
    labels, weights = torch.randint(0, 3, (6,)), torch.rand(6)
    ck = [(model.state_dict(), 1.0)]
    with pytest.raises(
        ValueError,
        match=r"too many values to unpack.*read as a list of two batches of \(inputs, targets\), data\[0\] and "
        r"data\[1\] \(PAIR_RULE\).*\[\(\(x, k\), \(y, w\)\)\]",
    ):
        export_gradients(model, ck, ((ids, mask), (labels, weights)), _weighted_loss, mode=mode, progress=False)
    got = export_gradients(model, ck, [((ids, mask), (labels, weights))], _weighted_loss, mode=mode, progress=False)
    if mode == "full":
        examples = [((ids[i : i + 1], mask[i : i + 1]), (labels[i : i + 1], weights[i : i + 1])) for i in range(6)]
        want = _float64_rows(model, examples, _weighted_loss)
        np.testing.assert_allclose(got.matrices[0], want, rtol=1e-5, atol=1e-7)
    # two batches meant as such are read so; an error on data that is not two pairs says nothing of PAIR_RULE
    loss = nn.CrossEntropyLoss(reduction="none")
    two = [(ids[:3], labels[:3]), (ids[3:], labels[3:])]
    assert export_gradients(model, ck, two, loss, mode=mode, progress=False).n_rows == 6
    with pytest.raises(ValueError, match=r"^(?!.*PAIR_RULE)"):
        export_gradients(model, ck, [(ids, labels)], lambda o, t: loss(o, t)[:1], mode=mode, progress=False)


def _supplying_scale(loss):
    @functools.wraps(loss)  # inspect.signature reports loss's three arguments
    def wrapper(outputs, targets):
        return loss(outputs, targets, 1.0)

    return wrapper


@_supplying_scale
def _wrapped_buggy_loss(outputs, targets, scale):
    return nn.functional.cross_entropy(outputs, targets, reduction="none", smoothing=scale)


def test_a_type_error_inside_a_wrapped_loss_supplied_its_arguments_surfaces_unchanged():
    """Was (review61 N1): the wrapper's call bound (it supplies scale), but the error raised inside was said
    to come from the signature: '_wrapped_buggy_loss(outputs, targets, scale) cannot take them ... Wrap it'."""
    model = nn.Linear(4, 3)
    data = (torch.randn(5, 4), torch.randint(0, 3, (5,)))
    for mode in ("full", "last_layer"):
        with pytest.raises(TypeError, match="smoothing") as caught:
            export_gradients(model, [(model.state_dict(), 1.0)], data, _wrapped_buggy_loss, mode=mode, progress=False)
        assert "loss_fn is called as" not in str(caught.value)


class _Tempered(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 3)
        self.calls = 0

    def forward(self, x, temperature=1.0):
        self.calls += 1
        return self.linear(x) / temperature


_X5 = np.random.default_rng(3).normal(size=(6, 5)).astype(np.float32)
_Y3 = np.arange(6) % 3


@pytest.mark.parametrize(
    "data, path, got, setting",
    [
        (({"x": _X5, "temperature": 2.0}, _Y3), "data inputs['temperature']", "a float", "temperature"),
        (({"x": _X5, "temperature": "hot"}, _Y3), "data inputs['temperature']", "a str", "temperature"),
        (({"x": _X5, "t": torch.tensor(2.0)}, _Y3), "data inputs['t']", r"a 0-d tensor \(float32\)", "t"),
        (({"x": _X5, "t": np.float64(2.0)}, _Y3), "data inputs['t']", "a NumPy float64 scalar", "t"),
        ((_X5, {"labels": _Y3, "smoothing": 0.1}), "data targets['smoothing']", "a float", "smoothing"),
        (((_X5, 2.0), _Y3), "data inputs[1]", "a float; a setting shared", "setting"),
        (((_X5, torch.tensor(2.0)), _Y3), "data inputs[1]", r"a 0-d tensor \(float32\); a setting", "setting"),
        ([({"x": _X5, "temperature": 2.0}, _Y3)], "batch 0 inputs['temperature']", "a float", "temperature"),
    ],
)
def test_a_leaf_without_rows_is_named_with_what_it_is_and_where_a_setting_goes(data, path, got, setting):
    """A setting in the data (({'x': x, 'temperature': 2.0}, y)) was read as a list of two batches ('batch 0 must
    be an (inputs, targets) pair ... got dict') or a bare 'got float' from tree_map; it is a ValueError naming the
    leaf's path and what it is, and pointing at functools.partial, as tracin.jax's batches do (f824587)."""
    model = _Tempered()
    with pytest.raises(ValueError) as caught:
        export_gradients(
            model, [(model.state_dict(), 1.0)], data, nn.CrossEntropyLoss(reduction="none"), progress=False
        )
    text = str(caught.value)
    assert re.match(
        rf"{re.escape(path)}: expected an array or tensor with a leading batch dimension \(one row per example\), "
        rf"got {got}",
        text,
    ), text
    assert f"functools.partial(loss_fn, {setting}=...)" in text and "two batches" not in text
    assert ("forward(self, ..., " in text) == (" inputs" in path), text  # inputs go to the model
    assert "Python list" not in text and "tensor(...) of it" not in text, text  # review102 F1: not circular
    assert model.calls == 0  # refused before any forward


@pytest.mark.parametrize(
    "data, path, what, user",
    [
        (({"x": _X5, "mask": None}, _Y3), "data inputs['mask']", "the key 'mask'", "the model's forward"),
        (((_X5, None), _Y3), "data inputs[1]", "it", "the model's forward"),
        ((_X5, {"labels": _Y3, "weight": None}), "data targets['weight']", "the key 'weight'", "loss_fn"),
        ([({"x": _X5, "mask": None}, _Y3)], "batch 0 inputs['mask']", "the key 'mask'", "the model's forward"),
    ],
)
def test_a_none_leaf_is_to_be_left_out(data, path, what, user):
    """review100 F3: {'attention_mask': None} was told that 'a setting shared by every example belongs with the
    model'; None is an argument not given: leave the key out (forward's or loss_fn's default), or pass rows."""
    model = _Tempered()
    with pytest.raises(ValueError) as caught:
        export_gradients(
            model, [(model.state_dict(), 1.0)], data, nn.CrossEntropyLoss(reduction="none"), progress=False
        )
    text = str(caught.value)
    assert text == (
        f"{path}: expected an array or tensor with a leading batch dimension (one row per example), got None: "
        f"leave {what} out of the data ({user} then uses its default), or pass a tensor with one row per example"
    ), text
    assert model.calls == 0


@pytest.mark.parametrize("value", [3, 0.5, True, np.int64(3)])
def test_numbers_in_the_python_lists_of_a_dict_point_at_return_tensors_pt(value):
    """review100 F3: a tokenizer's output made without return_tensors="pt" ({'x': [[...], ...]}) was told to pass
    torch.tensor(...) 'for a value per example' and where a setting goes; it names the key whose value is a
    Python list and return_tensors="pt" (or torch.tensor of the list)."""
    model = _Tempered()
    data = ({"x": [[value] * 5 for _ in range(6)]}, _Y3)
    with pytest.raises(ValueError) as caught:
        export_gradients(
            model, [(model.state_dict(), 1.0)], data, nn.CrossEntropyLoss(reduction="none"), progress=False
        )
    text = str(caught.value)
    assert text.startswith("data inputs['x'][0][0]: expected an array or tensor with a leading batch dimension"), text
    assert "in the Python list of 'x'" in text and 'return_tensors="pt"' in text, text
    assert "torch.tensor(...) of the list" in text and "setting" not in text, text
    assert model.calls == 0


@pytest.mark.parametrize(
    "data, path, column",
    [
        (((_X5, [0.5] * 6), _Y3), "data inputs[1][0]", "inputs[1]"),
        (((_X5, [[0.5, 1.0]] * 6), _Y3), "data inputs[1][0][0]", "inputs[1]"),
        ((_X5, [int(v) for v in _Y3]), "data targets[0]", "targets"),
        ([(_X5, [int(v) for v in _Y3])], "batch 0 targets[0]", "targets"),
    ],
)
def test_numbers_in_a_python_list_of_values_point_at_a_tensor_of_the_list(data, path, column):
    """review102 F1: numbers in a Python list that is a column of values (targets [0, 1, 2, ...]) are told to make a
    tensor of the list, naming it, not where a setting goes."""
    model = _Tempered()
    with pytest.raises(ValueError) as caught:
        export_gradients(
            model, [(model.state_dict(), 1.0)], data, nn.CrossEntropyLoss(reduction="none"), progress=False
        )
    text = str(caught.value)
    assert text.startswith(f"{path}: expected an array or tensor with a leading batch dimension"), text
    assert text.endswith(
        f"in the Python list {column}, which tracin reads as a tree of values, not a tensor: pass torch.tensor(...) "
        "of the list"
    ), text
    assert model.calls == 0


@pytest.mark.parametrize("data, where", [((_X5, None), "data"), ([(_X5, None)], "batch 0")])
def test_targets_none_says_a_torch_pair_needs_targets_and_a_placeholder_works(data, where):
    """review102 F3: (x, None) was told to leave the targets out (loss_fn's default), which torch refuses ((x,) is
    not a pair) and loss_fn(outputs, targets) has no default for; it says targets are needed, and the placeholder
    it names (torch.zeros(n)) exports what the loss alone gives."""
    model = _Tempered()

    def loss(outputs, targets):
        return outputs.pow(2).sum(1)

    with pytest.raises(ValueError) as caught:
        export_gradients(model, [(model.state_dict(), 1.0)], data, loss, progress=False)
    text = str(caught.value)
    assert text.startswith(f"{where} targets: expected an array or tensor with a leading batch dimension"), text
    assert "pair needs targets" in text and "torch.zeros(n)" in text and "leave" not in text, text
    assert model.calls == 0
    with pytest.raises(ValueError, match=r"^data inputs: .*got None: a torch \(inputs, targets\) pair needs inputs"):
        export_gradients(model, [(model.state_dict(), 1.0)], (None, _Y3), loss, progress=False)
    placeholder = export_gradients(model, [(model.state_dict(), 1.0)], (_X5, torch.zeros(6)), loss, progress=False)
    x = torch.as_tensor(_X5, dtype=torch.float64)
    w, b = (t.detach().double() for t in (model.linear.weight, model.linear.bias))
    z = x @ w.T + b  # d/dz of sum(z**2) is 2z: per-example gradients 2 z x^T (weight) and 2 z (bias)
    expected = torch.cat([(2 * z[:, :, None] * x[:, None, :]).reshape(6, -1), 2 * z], 1).numpy()
    np.testing.assert_allclose(np.asarray(placeholder.matrices[0]), expected, rtol=1e-5, atol=1e-6)


def test_a_setting_given_to_the_model_instead_exports_what_dividing_the_logits_gives():
    """The remedy the message names: the setting as a default of forward, the data holding rows only."""

    class Warm(_Tempered):
        def forward(self, x):
            return super().forward(x, temperature=2.0)

    model = Warm()
    got = export_gradients(
        model, [(model.state_dict(), 1.0)], ({"x": _X5}, _Y3), nn.CrossEntropyLoss(reduction="none"), progress=False
    )
    examples = [({"x": torch.from_numpy(_X5[i : i + 1])}, torch.from_numpy(_Y3[i : i + 1])) for i in range(6)]
    want = _float64_rows(model, examples, nn.CrossEntropyLoss(reduction="none"))
    np.testing.assert_allclose(got.matrices[0], want, rtol=1e-5, atol=1e-7)


def test_inputs_of_other_batch_sizes_are_named_by_their_keys():
    """A (1, T) position_ids beside (B, T) input_ids: the refusal names each key's shape and says size 1 is not
    broadcast."""
    with pytest.raises(ValueError, match=r"input_ids: \(6, 7\), position_ids: \(1, 7\).*not broadcast"):
        batch_rows({"input_ids": torch.zeros(6, 7), "position_ids": torch.zeros(1, 7)}, "inputs")
