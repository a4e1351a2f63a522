"""The first-rows check's arithmetic pinned to hand-worked values: its tolerances per dtype and token count,
the coarsest dtype, the tokens a layer sums over, the comparison's scale floor and gap, the memory margins and
their message, which rows it checks, and the notes its one-row errors add (first_rows_check)."""

import pytest
import torch
from torch import nn

from tracin.torch import first_rows_check as check

BF16_EPS, FP16_EPS, FP32_EPS = 2.0**-7, 2.0**-10, 2.0**-23


def test_tolerances_per_dtype_widening_tokens_and_own_gap():
    # float32 (and a widened reference): RTOL 1e-4 and ATOL 1e-5, or 1.5 times the own-dtype gap when larger
    assert check.tolerances(torch.float32) == (1e-4, 1e-5)
    assert check.tolerances(torch.float32, own_gap=1e-3) == (1e-4, pytest.approx(1.5e-3))
    # a widened bfloat16 reference: rtol and atol grow to eps and 2 eps of bfloat16
    assert check.tolerances(torch.bfloat16) == (BF16_EPS, 2 * BF16_EPS)
    # a float32 reference that was not widened does not count tokens
    assert check.tolerances(torch.float32, tokens=10**6, widened=False) == (1e-4, 1e-5)
    # a 16-bit reference not widened: atol max(2 eps, eps / 2 * sqrt(T))
    assert check.tolerances(torch.bfloat16, tokens=1024, widened=False) == (BF16_EPS, BF16_EPS / 2 * 32)
    assert check.tolerances(torch.float16, tokens=4, widened=False) == (FP16_EPS, 2 * FP16_EPS)
    assert check.tolerances(torch.float16, tokens=0, widened=False) == (FP16_EPS, 2 * FP16_EPS)
    assert check.counts_tokens(torch.bfloat16, False) and not check.counts_tokens(torch.float32, False)
    assert not check.counts_tokens(torch.bfloat16, True)


def test_coarsest_is_the_floating_dtype_with_the_largest_eps():
    t = [torch.zeros(1, dtype=d) for d in (torch.float64, torch.float16, torch.float32, torch.bfloat16)]
    assert check.coarsest(t) is torch.bfloat16  # eps 2^-7 > float16's 2^-10
    assert check.coarsest(t[:3]) is torch.float16
    assert check.coarsest([torch.zeros(1, dtype=torch.float64), torch.zeros(1)]) is torch.float32
    assert check.coarsest([torch.zeros(1, dtype=torch.long)]) is torch.float32


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(self.a(torch.cat([h, h[..., :1]], dim=-1)))


def test_tokens_of_one_counts_output_rows_over_the_feature_dimension_summed_over_calls():
    model = Twice()
    state = dict(model.named_parameters())
    one = torch.randn(1, 5, 4)
    # 'a' runs twice on 5 positions (10), 'b' once on 5
    assert check.tokens_of_one(model, ["a"], state, one) == 10
    assert check.tokens_of_one(model, ["a", "b"], state, one) == 10
    assert check.tokens_of_one(model, ["b"], state, one) == 5


def test_the_scale_floor_widens_the_tolerance_and_the_gap_is_hand_worked():
    want = torch.tensor([0.01, -0.02])
    got = want + 0.001
    assert not check.agrees([(got, want)])  # 1e-3 off, atol 1e-5 of 0.02
    assert check.agrees([(got, want)], floor=1000.0)  # atol 1e-5 of 1000: 1e-2
    assert check.gap([(torch.tensor([1.5, 2.0]), torch.tensor([1.0, -4.0]))]) == pytest.approx(6.0 / 4.0)
    inf = float("inf")
    # infinities are left out of both the differences and the sizes: 1 over 2
    assert check.gap([(torch.tensor([1.0, inf]), torch.tensor([2.0, inf]))]) == pytest.approx(0.5)
    assert check.gap([(torch.zeros(3), torch.zeros(3))]) == 0.0
    assert check.largest_finite([torch.tensor([1.0, inf, float("nan")]), torch.tensor([3.0])]) == 3.0


def test_directions_agree_is_inclusive_at_the_tolerance():
    want, scale = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    exact = torch.full((3,), 1e-4, dtype=torch.float64)  # rtol 1e-4 times (0 + 1)
    assert check.directions_agree(exact, want, scale, torch.float32)
    assert not check.directions_agree(exact * 1.01, want, scale, torch.float32)


def test_the_cpu_copy_needs_twice_its_size_free_and_the_message_says_so(monkeypatch):
    narrow = [torch.zeros(1000, dtype=torch.bfloat16)]  # float32 copy: 4000 bytes, twice: 8000
    monkeypatch.setattr(check, "available_memory", lambda device: 8001)
    assert check._room_for(narrow)
    monkeypatch.setattr(check, "available_memory", lambda device: 7999)
    assert not check._room_for(narrow)
    state = {"w": torch.zeros(10**6)}  # float64 copy 8 MB, twice 16 MB
    monkeypatch.setattr(check, "available_memory", lambda device: 10 * 10**6)
    assert check.float64_room(state).endswith("needs about 16.0 MB, and cpu has 10.0 MB available")
    assert check._gigabytes(150 * 10**6) == "0.15 GB" and check._gigabytes(99 * 10**6) == "99.0 MB"


def test_checked_rows_are_the_first_two_or_the_whole_batch_of_one():
    x, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    xs, ys, rows = check.checked_rows(x, y, 5)
    assert rows == 2 and torch.equal(xs, x[:2]) and torch.equal(ys, y[:2])
    xs, ys, rows = check.checked_rows(x[:2], y[:2], 2)
    assert rows == 2 and torch.equal(xs, x[:2])
    xs, ys, rows = check.checked_rows(x[:1], y[:1], 1)
    assert rows == 1 and torch.equal(xs, x[:1])


def test_a_sparse_embedding_gradient_is_densified_to_the_hand_worked_rows():
    model = nn.Embedding(4, 2, sparse=True)
    state = dict(model.named_parameters())
    x, y = torch.tensor([[1, 1, 3], [0, 2, 2]]), torch.zeros(2)

    def loss(out, y):  # sum of the looked-up vectors: d/dW row k = count of k in the example
        return out.sum(dim=(1, 2)) + 0 * y

    rows = list(check.example_gradients(model, state, ["weight"], loss, x, y, 2))
    for (g,), counts in zip(rows, ([0, 2, 0, 1], [1, 0, 2, 0]), strict=True):
        assert not g.is_sparse
        torch.testing.assert_close(g, torch.tensor(counts, dtype=torch.float32)[:, None].expand(4, 2))


def test_the_dimensions_dropped_at_one_row_are_those_of_an_output_with_fewer_dimensions():
    assert check._dimensions_dropped([()], [(2,)]) == ((), (2,))
    assert check._dimensions_dropped([(1, 2, 3)], [(2, 3)]) is None  # more dimensions on one row: not dropped
    assert check._dimensions_dropped([(1, 3)], [(2, 3), (2,)]) is None  # outputs that differ in number
    assert check._dimensions_dropped(None, [(2,)]) is None


def test_the_batch_statistics_note_names_untracked_batchnorms_only_with_its_verb():
    tracked = nn.BatchNorm1d(3)
    assert check.batch_statistics_note(nn.Sequential(tracked)) is None
    one = check.batch_statistics_note(nn.Sequential(tracked, nn.BatchNorm1d(3, track_running_stats=False)))
    assert one.startswith("'1' (BatchNorm without running statistics) normalizes over the batch")
    two = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False), nn.BatchNorm1d(3, track_running_stats=False))
    assert check.batch_statistics_note(two).startswith("'0', '1' (BatchNorm without running statistics) normalize ")


def test_out_of_memory_on_one_row_is_raised_as_it_is():
    model = nn.Linear(3, 2)
    state = dict(model.named_parameters())
    ce = nn.CrossEntropyLoss(reduction="none")
    x, y = torch.randn(1, 3), torch.tensor([1])
    assert check.one_row_error(MemoryError("no room"), model, state, ce, x, y) is None
    # the same model and loss run on two rows: another error is explained as a one-row failure
    assert "a batch of one row" in str(check.one_row_error(RuntimeError("boom"), model, state, ce, x, y))


def test_a_forward_under_autocast_is_its_own_reference_not_widened():
    model = nn.Linear(3, 2).to(torch.bfloat16)
    state = dict(model.named_parameters())
    x, y = torch.randn(2, 3, dtype=torch.bfloat16), torch.tensor([0, 1])

    def ce(out, y):
        return nn.functional.cross_entropy(out.float(), y, reduction="none")

    plain = check.reference_gradients(model, state, list(state), ce, x, y, 2)
    assert plain.own is not None and plain.dtype is torch.bfloat16  # widened to float32
    assert all(g.dtype == torch.float32 for g in plain.rows[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = check.reference_gradients(model, state, list(state), ce, x, y, 2)
    assert under.own is None and under.dtype is torch.bfloat16
    assert all(g.dtype == torch.bfloat16 for g in under.rows[0])
