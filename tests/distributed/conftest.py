"""One real LocalCluster (two single-threaded worker processes on loopback) shared by these tests,
a cluster of its own for a test that kills a worker, and small gradient stores with their float64
NumPy references."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster, get_worker

import tracin
from store_files import write_with_nonfinite

ALLOWED_FAILURES = 1  # a task may lose one worker and be rerun; the second death fails it


@contextmanager
def own_client(n_workers: int = 2) -> Iterator[Client]:
    """A client of a LocalCluster of its own, for a test that kills a worker: on a loaded machine the
    nanny's new worker can take minutes to arrive, and the other tests share their cluster."""
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}),
        LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        yield c


def read_on_workers(batches: list, on_worker: Callable[[], object]) -> object:
    """Re-iterable batches (a local class: cloudpickled by value) that the client reads as they are, while a
    Dask worker reading them runs on_worker() instead (raising, ending the process), as data in a per-machine
    cache, a file missing there or a native reader crashing there would."""

    class OnWorkers:
        def __len__(self) -> int:
            return len(batches)

        def __iter__(self):
            try:
                get_worker()
            except ValueError:  # the client
                return iter(batches)
            return on_worker()

    return OnWorkers()


@pytest.fixture(scope="session")
def client() -> Iterator[Client]:
    with own_client() as c:
        yield c


def write_store(
    path: Path, matrices: list[np.ndarray], weights: list[float] | None, overwrite: bool = False, **open_kw
) -> tracin.GradientStore:
    """A finished store holding `matrices` (one (n, d_c) float32 array per checkpoint); NaN / Inf
    values, which writers refuse, are planted into its files (for the NaN tests of scoring)."""
    writer = tracin.GradientStore.create(
        path, len(matrices[0]), [m.shape[1] for m in matrices], weights, overwrite=overwrite
    )
    for c, m in enumerate(matrices):
        write_with_nonfinite(writer, c, 0, m)
    writer.finalize()
    return tracin.GradientStore.open(path, **open_kw)


def exact_scores(test: list[np.ndarray], train: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """float64 (m, n): sum_c w_c T_c X_c^T."""
    return sum(
        w * (t.astype(np.float64) @ x.astype(np.float64).T) for t, x, w in zip(test, train, weights, strict=True)
    )


def exact_top_k(scores: np.ndarray, k: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, indices) of the k best per row: by score (descending for proponents), then index."""
    key = -scores if side == "proponents" else scores
    cols = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((cols, key), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), order


@pytest.fixture(scope="session")
def tied(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 1000-row store of small integers (many tied scores, all exact in float32), two checkpoints
    with weights 0.5 and 2, a 9-row in-memory test side, and the exact scores."""
    rng = np.random.default_rng(7)
    dims, weights = [6, 3], [0.5, 2.0]
    train = [rng.integers(-2, 3, (1000, d)).astype(np.float32) for d in dims]
    test = [rng.integers(-2, 3, (9, d)).astype(np.float32) for d in dims]
    store = write_store(tmp_path_factory.mktemp("tied") / "store", train, weights)
    return {
        "store": store,
        "test": tracin.Gradients(test, weights),
        "test_arrays": test,
        "train": train,
        "scores": exact_scores(test, train, weights),
    }


@pytest.fixture(scope="session")
def floats(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Random float32 gradients: a 3000-row train store, a 40-row test store with small row chunks
    (several test chunks), their arrays and the float64 scores."""
    rng = np.random.default_rng(11)
    dims, weights = [48, 16], [0.1, 0.03]
    train = [rng.standard_normal((3000, d)).astype(np.float32) for d in dims]
    test = [rng.standard_normal((40, d)).astype(np.float32) for d in dims]
    root = tmp_path_factory.mktemp("floats")
    row_bytes = sum(dims) * 4
    return {
        "store": write_store(root / "train", train, weights),
        "test_store": write_store(root / "test", test, weights, chunk_bytes=7 * row_bytes),
        "train": train,
        "test": test,
        "weights": weights,
        "scores": exact_scores(test, train, weights),
    }
