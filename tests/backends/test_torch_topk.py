"""The torch backend's top-k selection (tracin.backends._torch_topk) on heavily tied scores: torch.topk's
k + 1 candidates per tile, and the exact selection of the rows cut inside a run of equal scores, against
the C++ kernel and a stable sort of the exact scores, also through the grouped selection (_grouped_topk,
forced on small tiles). Run on CPU tensors ("torch:cpu"), also with a torch.topk that keeps the largest
tied indices (allowed: torch promises no order among ties)."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest

import tracin
from reference import exact_scores, factored_to_full
from tracin import _tunables
from tracin.backends import _torch_topk

torch = pytest.importorskip("torch")

TILE = 32  # train rows per tile: DEVICE_TILE_BYTES below, over 8 float32 columns
BLOCK = 5  # test rows per score block
PIECE = 80  # train rows per piece of the generic loop (cut for the progress bar)
_TopK = namedtuple("_TopK", "values indices")


@pytest.fixture(params=["torch.topk", "largest tied indices"])
def topk(request, monkeypatch):
    """torch.topk as it is, or one keeping the largest indices among equal float scores (int64 keys,
    never equal, still go to torch.topk)."""
    if request.param == "largest tied indices":
        original = torch.topk

        def adverse(x, k, dim=-1, largest=True, sorted=True):
            if x.dtype == torch.int64:
                return original(x, k, dim=dim, largest=largest, sorted=sorted)
            assert dim == 1
            order = torch.sort(x.flip(1), dim=1, descending=largest, stable=True)  # ties: larger index first
            return _TopK(order.values[:, :k], x.shape[1] - 1 - order.indices[:, :k])

        monkeypatch.setattr(torch, "topk", adverse)
    return request.param


@pytest.fixture
def small_cuts(monkeypatch):
    monkeypatch.setattr(_tunables, "DEVICE_TILE_BYTES", TILE * 8 * 4)
    monkeypatch.setattr(_tunables, "DEVICE_RESIDENT_TILE_BYTES", TILE * 8 * 4)
    monkeypatch.setattr(_tunables, "DEVICE_TILE_SCORES", BLOCK * TILE)
    monkeypatch.setattr(tracin.scoring, "_MIN_PIECE_ROWS", PIECE)


def tied_rows(rng, n: int, d: int) -> np.ndarray:
    """Small integers (exact scores in any summation order, many ties), a tenth of the rows zero."""
    rows = np.round(rng.standard_normal((n, d))).astype(np.float32)
    rows[rng.choice(n, n // 10, replace=False)] = 0.0
    return rows


def signs(rng, n: int) -> np.ndarray:
    """Rows of four entries +-1, a tenth of the rows zero."""
    rows = rng.choice(np.array([-1, 1], np.float32), (n, 4))
    rows[rng.choice(n, n // 10, replace=False)] = 0.0
    return rows


def stable_order(exact: np.ndarray, k: int, side: str) -> np.ndarray:
    return np.argsort((-1 if side == "proponents" else 1) * exact, axis=1, kind="stable")[:, :k]


def sets(rng, kind: str, n: int, m: int, w: list[float]):
    """(test set, train set, exact float64 scores) of 8 columns per row (two checkpoints)."""
    if kind == "factored":  # checkpoint 0: factors of 1 and 3 columns, checkpoint 1: 2 and 2
        train, test = [tied_rows(rng, n, d) for d in (1, 3, 2, 2)], [tied_rows(rng, m, d) for d in (1, 3, 2, 2)]
        full_t, full_x = factored_to_full(test[0::2], test[1::2]), factored_to_full(train[0::2], train[1::2])
        made = (
            tracin.FactoredGradients(test[0::2], test[1::2], w),
            tracin.FactoredGradients(train[0::2], train[1::2], w),
        )
        return *made, exact_scores(full_t, full_x, w)
    if kind == "plain":
        train, test = [tied_rows(rng, n, 4) for _ in w], [tied_rows(rng, m, 4) for _ in w]
        for t in test:
            t[3] = 0.0  # every score of test row 3 is 0.0 or -0.0
            t[4] = -np.abs(t[4])
        return tracin.Gradients(test, w), tracin.Gradients(train, w), exact_scores(test, train, w)
    # cosine scores: entries +-1, so each checkpoint's row norm is 2 (0 for the zero rows): exact scores
    train, test = [signs(rng, n) for _ in w], [signs(rng, m) for _ in w]
    return (
        tracin.Gradients(test, w),
        tracin.Gradients(train, w),
        exact_scores([r / 2 for r in test], [r / 2 for r in train], w),
    )


@pytest.mark.parametrize("k", [1, 5, 20, 31, 32, 33, 81, 400])  # about the tile (32), the piece (80), above n
@pytest.mark.parametrize("kind", ["plain", "cosine", "factored"])
def test_tied_scores_give_the_cpu_kernel_results(rng, small_cuts, topk, k, kind):
    """Both sides at once, 300 train rows in pieces of 80 (tiles of 32, 32, 16) and 60 (32, 28), score
    blocks of 5 test rows."""
    n, normalize = 300, kind == "cosine"
    t, x, exact = sets(rng, kind, n, 11, [0.5, -2.0])
    ours = tracin.top_k(t, x, k=k, side="both", device="torch:cpu", normalize=normalize, progress=True)
    kernel = tracin.top_k(t, x, k=k, side="both", device="cpu", normalize=normalize)
    for got, want, side in zip(ours, kernel, ("proponents", "opponents"), strict=True):
        assert got.indices.shape == (11, min(k, n))
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.indices, stable_order(exact, k, side))
        np.testing.assert_array_equal(got.values, want.values)


def test_only_rows_cut_inside_a_tie_are_selected_exactly(rng, small_cuts, monkeypatch):
    """Counted through _cut_in_tie: none on tie-free scores, some (not all) on tied ones."""
    counted: list[tuple[int, int]] = []
    original = _torch_topk._cut_in_tie

    def count(values, side):
        tied = original(values, side)
        counted.append((int(tied.sum()), len(tied)))
        return tied

    monkeypatch.setattr(_torch_topk, "_cut_in_tie", count)
    for kind in ("plain", "cosine"):
        counted.clear()
        t, x, _ = sets(rng, kind, 200, 11, [0.5, -2.0])
        tracin.top_k(t, x, k=3, side="both", device="torch:cpu", progress=True)
        tied, rows = map(sum, zip(*counted, strict=True))
        assert 0 < tied < rows, kind
    counted.clear()
    free = [rng.standard_normal((11, 4)).astype(np.float32), rng.standard_normal((200, 4)).astype(np.float32)]
    tracin.top_k(free[0], free[1], k=3, side="both", device="torch:cpu", progress=True)
    assert counted and sum(c for c, _ in counted) == 0


@pytest.mark.parametrize(
    "values, side, tied",
    [
        ([[3, 1, 1]], "proponents", [True]),
        ([[1, 3, 2]], "proponents", [False]),
        ([[2, 2, 1]], "proponents", [False]),  # the tie is above the cut: both kept
        ([[5, 0.0, -0.0], [-0.0, 7, 0.0]], "proponents", [True, True]),
        ([[-1, -3, -1]], "opponents", [True]),
        ([[1, 1, 5]], "opponents", [False]),
        ([[np.inf, 2, np.inf], [4, -np.inf, -np.inf]], "proponents", [False, True]),
    ],
)
def test_a_cut_is_tied_when_the_worst_candidate_occurs_twice(values, side, tied):
    got = _torch_topk._cut_in_tie(torch.tensor(values, dtype=torch.float32), side)
    assert got.tolist() == tied


def test_one_tile_tied_at_the_cut_keeps_the_smallest_indices(topk):
    """Row 0: seven equal scores, k = 3 of them; row 1: no tie at the cut; row 2: -0.0 and 0.0."""
    scores = torch.tensor(
        [[1, 1, 1, 1, 1, 1, 1], [0, 5, 1, 4, 2, 3, 6], [-0.0, 9, 0.0, -0.0, 0.0, -1, -0.0]], dtype=torch.float32
    )
    running = _torch_topk.RunningTopK(3, "proponents", 3, torch.device("cpu"))
    found = running.candidates(scores, 100)
    assert found.tied.tolist() == [True, False, True]
    running.merge(found)
    result = running.result()
    assert result.indices.tolist() == [[100, 101, 102], [106, 101, 103], [101, 100, 102]]
    np.testing.assert_array_equal(result.values[2], [9, 0, 0])


def test_a_score_blocks_candidates_are_merged_after_the_next_blocks_are_made(rng, small_cuts, monkeypatch):
    """On a GPU the merge's wait for its block's selection then leaves the next block's GEMM running."""
    events: list[tuple[str, int, int]] = []
    made, merge = _torch_topk.RunningTopK.candidates, _torch_topk.RunningTopK.merge

    def candidates(self, scores, first, extremes=None):
        events.append(("made", id(self), first))
        return made(self, scores, first, extremes)

    def merged(self, found):
        events.append(("merged", id(self), found.first))
        merge(self, found)

    monkeypatch.setattr(_torch_topk.RunningTopK, "candidates", candidates)
    monkeypatch.setattr(_torch_topk.RunningTopK, "merge", merged)
    test, train = rng.standard_normal((7, 8)).astype(np.float32), rng.standard_normal((70, 8)).astype(np.float32)
    tracin.top_k(test, train, k=3, side="both", device="torch:cpu")  # 2 blocks (5 + 2 rows) x 3 tiles x 2 sides
    assert [e[0] for e in events] == ["made"] * 2 + ["made", "made", "merged", "merged"] * 5 + ["merged"] * 2
    assert sorted(e for e in events if e[0] == "made") == sorted(("made", *e[1:]) for e in events if e[0] == "merged")


def test_the_tied_rows_are_read_only_for_score_blocks_cut_inside_a_tie(rng, small_cuts, monkeypatch):
    """torch.nonzero (on CUDA a wait for all enqueued work, the next block's GEMM included) runs in a
    merge only when some row of its block was cut inside a tie: never on tie-free float scores."""
    log: list[str] = []
    cut, nonzero = _torch_topk._cut_in_tie, torch.nonzero

    def logged_cut(values, side):
        tied = cut(values, side)
        log.append("tied block" if bool(tied.any()) else "tie-free block")
        return tied

    def logged_nonzero(x, *args, **kwargs):
        log.append("nonzero")
        return nonzero(x, *args, **kwargs)

    monkeypatch.setattr(_torch_topk, "_cut_in_tie", logged_cut)
    monkeypatch.setattr(torch, "nonzero", logged_nonzero)
    free = [rng.standard_normal((11, 8)).astype(np.float32), rng.standard_normal((300, 8)).astype(np.float32)]
    tracin.top_k(free[0], free[1], k=3, side="both", device="torch:cpu")  # 3 blocks x (32 * 9 + 12 rows)
    assert log == ["tie-free block"] * 3 * 10 * 2
    log.clear()
    t, x, exact = sets(rng, "plain", 300, 11, [0.5, -2.0])
    got = tracin.top_k(t, x, k=3, side="both", device="torch:cpu")
    assert 0 < log.count("nonzero") == log.count("tied block") < log.count("tied block") + log.count("tie-free block")
    assert log.index("nonzero") > log.index("tied block")  # a block late, after the next block's candidates
    for found, side in zip(got, ("proponents", "opponents"), strict=True):
        np.testing.assert_array_equal(found.indices, stable_order(exact, 3, side))


# The grouped selection (_grouped_topk): forced on small tiles by groups of a few columns.


@pytest.fixture
def groups_of(monkeypatch):
    """Sets _group_size's choices to `sizes`, any k + 1 groups fitting in the tile (span 1); returns
    the list of (k + 1, group size) of each _grouped_topk call."""
    calls: list[tuple[int, int]] = []
    original = _torch_topk._grouped_topk

    def counted(scores, count, extremes, side):
        calls.append((count, extremes.group))
        return original(scores, count, extremes, side)

    def force(*sizes):
        monkeypatch.setattr(_torch_topk, "_GROUP_SIZES", sizes)
        monkeypatch.setattr(_torch_topk, "_GROUP_SPAN", 1)
        monkeypatch.setattr(_torch_topk, "_grouped_topk", counted)
        return calls

    return force


def integer_scores(rng, rows: int, n: int, spread: int) -> np.ndarray:
    """float32 integers in [-spread, spread] (many exact ties), a third of the zeros -0.0."""
    scores = rng.integers(-spread, spread + 1, (rows, n)).astype(np.float32)
    zeros = np.flatnonzero(scores == 0)
    scores.flat[zeros[::3]] = -0.0
    return scores


def run_tiles(scores: np.ndarray, widths: list[int], k: int, side: str):
    """RunningTopK over tiles of `widths` columns of `scores` (float32 on the CPU), merged in order."""
    running = _torch_topk.RunningTopK(k, side, scores.shape[0], torch.device("cpu"))
    first = 0
    for width in widths:
        running.merge(running.candidates(torch.from_numpy(scores[:, first : first + width]), first))
        first += width
    assert first == scores.shape[1]
    return running.result()


def check_against_numpy(got, scores: np.ndarray, k: int, side: str) -> None:
    exact = scores.astype(np.float64)
    want = stable_order(exact, k, side)
    np.testing.assert_array_equal(got.indices, want)
    np.testing.assert_array_equal(got.values, np.take_along_axis(exact, want, axis=1))


def test_group_size_takes_the_largest_group_whose_k_plus_one_groups_fit_a_quarter_of_the_tile():
    size = _torch_topk._group_size
    assert [size(k, 32768) for k in (1, 10, 31, 32, 63, 64, 100, 127, 128, 1000)] == [256] * 3 + [128] * 2 + [
        64
    ] * 3 + [0] * 2
    assert size(10, 11 * 256 * 4) == 256 and size(10, 11 * 256 * 4 - 1) == 128 and size(0, 255) == 0


@pytest.mark.parametrize("side", ["proponents", "opponents"])
@pytest.mark.parametrize(
    "k, group, widths",
    [
        (1, 4, [37, 40, 23]),  # tails of 1, 0 and 3 columns
        (3, 4, [61, 16, 50]),  # a tile of exactly k + 1 groups
        (6, 8, [59, 64, 57]),  # k + 1 = 7 groups of 7 in a tile (3 columns of tail), 8 and 7
        (9, 2, [21, 20, 33]),  # k + 1 = 10 groups of 10, 10 and 16 (tails of 1, 0, 1 column)
        (12, 3, [40, 39, 60]),  # k + 1 = 13 groups of 13 (tail 1), 13, 20
    ],
)
@pytest.mark.parametrize("spread", [1, 3, 50])
def test_grouped_selection_of_tied_integer_scores_is_the_stable_order(
    rng, groups_of, topk, side, k, group, widths, spread
):
    """Many exact ties (integers in [-spread, spread]: at the groups' cut and at the candidates' cut),
    -0.0 among the zeros, several tiles, each one taking the grouped path, against a stable sort."""
    calls = groups_of(group)
    scores = integer_scores(rng, 23, sum(widths), spread)
    scores[0] = 1.0  # one value throughout
    scores[1] = np.where(np.arange(scores.shape[1]) % 2, 0.0, -0.0)
    scores[2, ::group] = 7.0  # every group's extreme is 7 (proponents)...
    scores[3, group - 1 :: group] = -7.0  # ... or -7 (opponents), at each group's last column
    got = run_tiles(scores, widths, k, side)
    assert calls == [(k + 1, group)] * len(widths)
    check_against_numpy(got, scores, k, side)


@pytest.mark.parametrize("side", ["proponents", "opponents"])
def test_ties_at_the_groups_cut_need_no_flag_when_the_kept_worst_is_unique(groups_of, topk, side):
    """k = 1, groups of 3. Row 0: maxima 9, 5, 5, 5: two groups are kept, the 9 and one 5, the others
    left out; the worst kept (5) is unique, the row is not tied and its best is 9. Row 1: maxima 5, 5, 5,
    5: two 5s kept, tied (selected again: the first 5). Row 2: the best (9) only in the tail. Row 3:
    -0.0 and 0.0 the best, in two groups: tied. Opponents: the scores negated (the same indices)."""
    calls = groups_of(3)
    scores = np.array(
        [
            [1, 5, 2, 4, 5, 1, 9, 0, 1, 5, 3, 3, 1],
            [1, 5, 2, 4, 5, 1, 2, 0, 5, 5, 3, 3, 1],
            [1, 5, 2, 4, 5, 1, 2, 0, 5, 5, 3, 3, 9],
            [-1, -0.0, -2, -4, -5, 0.0, -2, -3, -5, -5, -3, -3, -1],
        ],
        dtype=np.float32,
    )
    scores = scores if side == "proponents" else -scores
    running = _torch_topk.RunningTopK(1, side, 4, torch.device("cpu"))
    found = running.candidates(torch.from_numpy(scores), 40)
    assert calls == [(2, 3)]
    assert found.tied.tolist() == [False, True, False, True]
    assert np.abs(found.values.numpy()).max(1).tolist() == [9, 5, 9, 0]
    running.merge(found)
    result = running.result()
    assert result.indices.tolist() == [[46], [41], [52], [41]]
    check_against_numpy(run_tiles(scores, [13], 1, side), scores, 1, side)


@pytest.mark.parametrize("side", ["proponents", "opponents"])
@pytest.mark.parametrize("layout", ["row-strided", "column-major"])
def test_grouped_selection_of_a_strided_tile(rng, groups_of, side, layout):
    """A tile that is a slice of wider rows, or a transposed (column-major) tensor: the groups are a
    view of it all the same."""
    calls = groups_of(4)
    scores = integer_scores(rng, 9, 70, 2)
    wide = torch.from_numpy(np.concatenate([scores, scores], axis=1))
    tile = wide[:, 3 : 3 + 70] if layout == "row-strided" else torch.from_numpy(scores.T.copy()).t()
    assert not tile.is_contiguous()
    exact = scores if layout == "column-major" else wide.numpy()[:, 3 : 3 + 70]
    running = _torch_topk.RunningTopK(5, side, 9, torch.device("cpu"))
    running.merge(running.candidates(tile, 0))
    assert calls == [(6, 4)]
    check_against_numpy(running.result(), exact, 5, side)


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("kind", ["plain", "cosine", "factored"])
def test_grouped_selection_gives_the_cpu_kernel_results(rng, small_cuts, groups_of, topk, k, kind):
    """tracin.top_k on "torch:cpu" through the grouped path (groups of 4 columns in tiles of 32, 32,
    16 and 32, 28, k + 1 <= 8 groups) against the C++ kernel and a stable sort of the exact scores."""
    calls = groups_of(4)
    n, normalize = 300, kind == "cosine"
    t, x, exact = sets(rng, kind, n, 11, [0.5, -2.0])
    ours = tracin.top_k(t, x, k=k, side="both", device="torch:cpu", normalize=normalize)
    kernel = tracin.top_k(t, x, k=k, side="both", device="cpu", normalize=normalize)
    assert calls and set(calls) == {(k + 1, 4)}
    for got, want, side in zip(ours, kernel, ("proponents", "opponents"), strict=True):
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.indices, stable_order(exact, k, side))
        np.testing.assert_array_equal(got.values, want.values)


@pytest.mark.parametrize("side", ["proponents", "opponents"])
@pytest.mark.parametrize("k, groups", [(1, [128, 256, 256]), (3, [64, 128, 256]), (9, [0, 0, 64])])
def test_default_group_sizes_on_wide_tiles(rng, monkeypatch, side, k, groups):
    """_group_size as it is: tiles of 1100, 2100 and 4096 columns (tails of up to 76 columns) of tied
    integers, then of tie-free floats (no row tied); against a stable sort."""
    calls: list[int] = []
    tied_rows: list[int] = []
    grouped, cut = _torch_topk._grouped_topk, _torch_topk._cut_in_tie

    def counted(scores, count, extremes, side):
        calls.append(extremes.group)
        return grouped(scores, count, extremes, side)

    def counted_cut(values, side):
        tied = cut(values, side)
        tied_rows.append(int(tied.sum()))
        return tied

    monkeypatch.setattr(_torch_topk, "_grouped_topk", counted)
    monkeypatch.setattr(_torch_topk, "_cut_in_tie", counted_cut)
    widths = [1100, 2100, 4096]
    assert [_torch_topk._group_size(k, w) for w in widths] == groups
    scores = integer_scores(rng, 7, sum(widths), 40)
    check_against_numpy(run_tiles(scores, widths, k, side), scores, k, side)
    assert calls == [g for g in groups if g] and sum(tied_rows) > 0
    tied_rows.clear()
    free = rng.standard_normal((7, sum(widths))).astype(np.float32)
    check_against_numpy(run_tiles(free, widths, k, side), free, k, side)
    assert tied_rows == [0, 0, 0]


@pytest.mark.parametrize("side", ["proponents", "opponents", "both"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("row", [3, 9])
def test_a_score_beyond_float32_is_found_by_the_groups_extremes_in_a_group_or_the_tail(
    rng, monkeypatch, groups_of, side, sign, row
):
    """Tiles of 10 train rows, groups of 4 (two whole groups, a tail of 2): the block's NaN / Inf
    check comes from the groups' extremes (tile_extremes), with no pass of its own over the scores;
    a score of +-Inf from finite rows (train row 3: in a group; row 9: in the tail) is the overflow
    error, whichever side is selected (an amax alone would miss -Inf)."""
    monkeypatch.setattr(_tunables, "DEVICE_TILE_BYTES", 10 * 4 * 4)
    monkeypatch.setattr(_tunables, "DEVICE_RESIDENT_TILE_BYTES", 10 * 4 * 4)
    calls = groups_of(4)
    test = rng.standard_normal((3, 4)).astype(np.float32)
    train = rng.standard_normal((20, 4)).astype(np.float32)
    assert tracin.top_k(test, train, k=1, side=side, device="torch:cpu") is not None and calls
    test[1], train[row] = 1e20, sign * 1e20  # finite rows, a score of +-4e40
    with pytest.raises(ValueError, match="overflowed float32 although every input is finite"):
        tracin.top_k(test, train, k=1, side=side, device="torch:cpu")


def test_keys_order_scores_one_ulp_apart_on_both_sides_of_zero():
    """Adjacent float32 values (one unit in the last place apart) keep their order in the keys for
    negative scores as for positive ones, for either side (opponents negate the scores)."""
    up = np.nextafter(np.float32(1.0), np.float32(2.0))
    values = torch.tensor([[-up, -1.0, 1.0, up]], dtype=torch.float32)
    indices = torch.tensor([[0, 1, 2, 3]])
    for side, expected in (("proponents", [3, 2, 1, 0]), ("opponents", [0, 1, 2, 3])):
        _, order = _torch_topk.best(values, indices, 4, side)
        assert order[0].tolist() == expected, side


@pytest.mark.parametrize(("k", "r"), [(1, 522), (3, 1100)])
@pytest.mark.parametrize("side", ["proponents", "opponents"])
def test_grouped_candidates_with_a_tail_keep_the_columns_of_every_chosen_group(k, r, side):
    """Tiles of whole groups plus a tail (522 = 8 x 64 + 10; 1100 = 16 x 64 + 76): every candidate is the
    score of its column, whichever chosen group or the tail holds it, and the k best of each row (tie-free
    random scores) are selected."""
    scores = torch.from_numpy(np.random.default_rng(5).standard_normal((60, r)).astype(np.float32))
    assert _torch_topk._group_size(k, r) == 64
    running = _torch_topk.RunningTopK(k, side, 60, torch.device("cpu"))
    found = running.candidates(scores, 100)
    assert found.values.shape == (60, k + 1)  # each candidate, the (k + 1)-th too, is its column's score
    np.testing.assert_array_equal(scores.gather(1, found.indices - 100).numpy(), found.values.numpy())
    running.merge(found)
    got = running.result()
    order = np.argsort((-1 if side == "proponents" else 1) * scores.numpy(), axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(got.indices, order + 100)
    np.testing.assert_array_equal(got.values, np.take_along_axis(scores.numpy(), order, 1))
