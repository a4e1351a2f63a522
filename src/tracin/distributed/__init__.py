"""tracin's scoring functions on a Dask cluster (pip install 'tracin[distributed]').

Same arguments as tracin.top_k / self_influence / aggregate plus client= (a distributed.Client;
None: the default client, else a LocalCluster on this machine) and shards= (row shards of the
store side). Tasks open their shard of a GradientStore by path, run the C++ kernel on it and send
back only (m, k) results (or one value per row), merged on the cluster with merge_top_k: the
answers are identical bit for bit to the single-machine functions. Every worker must see the store
at the same path (a shared file system, or an identical copy on each machine). A script that
lets client=None start a LocalCluster must call from under `if __name__ == "__main__":` (the
worker processes are spawned and import the script).
"""

try:
    import distributed as _distributed  # noqa: F401
except ImportError as e:
    raise ImportError("tracin.distributed needs Dask: pip install 'tracin[distributed]' "
                      "(or pip install 'dask[distributed]')") from e

from ._api import aggregate, self_influence, top_k

__all__ = ["aggregate", "self_influence", "top_k"]
