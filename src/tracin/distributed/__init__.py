"""tracin's scoring functions and gradient exports on a Dask cluster (pip install 'tracin[distributed]').

top_k, self_influence, aggregate: the arguments of tracin's own (on the CPU kernel only: device None
or "cpu", precision "float32", no whitening) plus client= (a distributed.Client; None: the default
client, else a LocalCluster on this machine), shards= (row shards of the store side) and
worker_timeout= (seconds to wait for a cluster's first worker; None, the default: no limit). Tasks
open their shard of a GradientStore by path, run the C++ kernel on it and send back only (m, k)
results (or one value per row), merged on the cluster with merge_top_k: the answers are identical
bit for bit to the single-machine functions when every worker's kernel runs the same instruction set
(tracin.detect_isa(): avx512, avx2 or generic, chosen per CPU at run time;
client.run(tracin.detect_isa) shows the workers') as the process compared with. Workers with another
instruction set keep the scale-aware error bound, but scores may differ in the last bits (and top_k
may order near-ties differently); full-gradient aggregate is the same bits on every instruction set.
Every worker must see the store at the same path (a shared file system, or an identical copy on each
machine whose files keep their modification times: cp -p, rsync -a). A store changed since it was
opened (re-created, or a data file removed, resized or rewritten in place, even at the same size) is
a StoreChangedError, from the client's check before the call or from a task whose worker finds a
data file of another size or modification time than the client recorded. A client whose scheduler
died is a ConnectionError naming it (once Dask gives up reconnecting); a call under way when it dies
fails with TaskFailedError saying so. A script that lets client=None start a LocalCluster must call
from under `if __name__ == "__main__":` (the worker processes are spawned and import the script).
Every worker must run the client's tracin version: before any task is sent, a call asks each worker
for tracin.__version__ (with a standard-library function that any worker can run) and raises a
RuntimeError naming those that cannot import tracin or run another version, which would fail to read
the tasks (Dask drops such a worker and the call waits, silently). Workers that join later are not
asked (an adaptive cluster's new ones; all of them when a scoring call with worker_timeout=None starts
on a cluster with none: with worker_timeout, or in an export, the first worker, waited for, is):
client.run(pkgutil.resolve_name, "tracin:__version__") shows theirs. An in-memory side holding NaN or
Inf is refused on the client, with the error tracin's own function raises, before anything is sent.

export_gradients("torch" | "jax", *args, store=path, client=None, shards=None, ...) runs the
adapter's export as row ranges written by the tasks into one store (see its docstring).

A task whose workers keep dying (out of memory, killed) fails the call with TaskFailedError (a
RuntimeError) naming its shard; an error the task itself raises is raised as it is, at once, the
other shards dropped. A NaN/Inf or float32-overflow ValueError names the rows (in the caller's sets)
that the first shard to fail found, and that shard's rows: other shards may hold more, and tracin's
own function in one process may name other rows first (it meets the rows in another order). A call of
one shard raises the error as that function does in one process.

Warnings a task raises on its worker (the adapter's, the model's, the data's, the kernel's) are not
shown there: they travel back with its result and are warned on the client when the call returns,
once each however many tasks raised them, in the same category and at the worker's line (the
client's filters by category and module apply), the message prefixed with the call, the first shard
that raised it, its worker and how many shards did ("(from 12 of 40 shards)"); those of a failed
task are in a note on its error. A task sends back the first 100 distinct ones (by category and
message) and counts (up to 10,000) the others. A task rerun after its worker died shows only the
warnings of the rows it computes again: Dask's rerun resumes after the blocks written before, whose
warnings died with the worker (as those of the rows an earlier, interrupted call wrote are not
raised again).
"""

try:
    import distributed as _distributed  # noqa: F401
except ImportError as e:
    raise ImportError(
        "tracin.distributed needs Dask: pip install 'tracin[distributed]' (or pip install 'dask[distributed]')"
    ) from e

from ._api import aggregate, self_influence, top_k
from ._export import export_gradients
from ._run import TaskFailedError

__all__ = ["TaskFailedError", "aggregate", "export_gradients", "self_influence", "top_k"]
