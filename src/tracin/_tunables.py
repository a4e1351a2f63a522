"""Tunable constants of the scoring loop, the gradient store and the device backends, each documented
here once with the evidence for it.

Figures quoted are from the 2-core AMD EPYC benchmark machine (benchmarks/results/*.json), except those of
the DEVICE_* entries, which were measured on an NVIDIA H200 (benchmarks/results/gpu_tiles.json).
The C++ kernel's own constants (tile sizes, packing budgets) are in csrc/src/tunables.hpp; the
distributed scheduler's shard sizes are in distributed/_shards.py (its largest shard is STORE_CHUNK_BYTES).
"""

AUTO_PROGRESS_MACS = 5e11
"""progress=None shows a bar at once, and cuts the train side into pieces so that it moves, for a call
of at least this many multiply-adds (shorter calls get a bar only after _progress.AUTO_DELAY_S
seconds, moving once per train chunk unless AUTO_RATE estimates them longer than that: a piece
costs about 10 ms of kernel overhead, top_k at m=256, d=128, n=1e6 took 1.07 s in one call and
2.06 s in 100 pieces, 2 shared cores).

benchmarks/results/kernel.json, case "top10": 5.12e10 multiply-adds in 0.51 s (202 GFLOP/s, about
1e11 multiply-adds/s on 2 threads), so the threshold is about 5 s of kernel time there.
"""

AUTO_RATE = 2.5e10
"""Kernel multiply-adds per second per thread assumed to tell whether a call below AUTO_PROGRESS_MACS will
outlast _progress.AUTO_DELAY_S (then its train side is cut, AUTO_STEPS below, so that the delayed bar
moves). Conservative: top_k at m=512, d=1024, n=200,000 (1.05e11 multiply-adds) on 1 thread of the
2-core machine took 2.2-2.9 s of CPU time (4e10/s), 4.2-6.7 s of wall time with the machine shared
(kernel.json "top10": 5e10/s per thread at d=128). In 7 pieces it took 2.2-3.1 s of CPU time. Row-wise work
(self_influence) runs slower per multiply-add, so its estimate is short and it is rarely cut.
"""

AUTO_STEPS = 20
"""...into at most this many pieces (one kernel call each), and only as many as keep the estimated cost
of the extra calls (PIECE_S, MERGE_S) within AUTO_OVERHEAD of the call's estimated time: 7 pieces at
4.2 s (the AUTO_RATE example, k=10), 20 from 9.5 s for scores (no merge)."""

AUTO_OVERHEAD = 0.02
"""The share of a call's estimated time that the extra calls of AUTO_STEPS may cost."""

PIECE_S = 0.01
"""Estimated seconds of one extra kernel call (AUTO_PROGRESS_MACS: 100 pieces of top_k added 0.99 s)."""

MERGE_S = 4e-8
"""Estimated seconds per candidate top_k merges after an extra piece (a stable argsort of int64 keys of
the (m, 2k) best of both pieces per side, two sorted runs): 0.037 s for 512 x 2,000 candidates, 0.28 s
for 512 x 20,000, 0.050 s for 1,000 x 2,000 (25-36 ns each; a lexsort took 265-342 ns)."""

BAR_STEPS = 100
"""With a bar, the train side of a long call is scored in up to this many pieces (one kernel call
each), so the bar moves in steps of about 1%; a short call, or a top_k whose extra calls would cost
more than scoring.py's overhead budget (selection and merging at large k), gets fewer. Results do
not depend on the cut (tests/test_scoring.py)."""

MIN_PIECE_ROWS = 4096
"""...but no piece is smaller than this many train rows: each kernel call packs the test side
again and has a fixed cost. benchmarks/results/kernel.json, group "n" (top-10, m=256, d=128):
70 GFLOP/s at n=10,000 against 189 at n=1,000,000, so small calls lose up to two thirds of the
speed. The piece size itself has not been benchmarked. The floor applies to every cut of the train side:
a bar's pieces (progress=True at any size, or a call of at least AUTO_PROGRESS_MACS) and the automatic
cut of a shorter call that AUTO_RATE estimates to outlast _progress.AUTO_DELAY_S (AUTO_STEPS).
"""

BAR_SHARE = 0.25
"""With a bar (progress=True, or automatic for long work), the train side is cut into as many pieces as
keep the estimated cost of the extra pieces (scoring._estimated_seconds) within this share of the call's
estimated time, or within BAR_S, whichever is more (up to BAR_STEPS): at k=5e4, m=16, n=2e6, 100
pieces took 179 s against 3.2 s in one call; at k=10, 98 pieces 0.50 s against 0.10 s (2 shared cores)."""

BAR_S = 0.05
"""...seconds that the extra pieces of a bar may always add: a short call's bar moves in a few steps."""

SELECT_S = 7e-7
"""Estimated seconds per test row, side and unit of k that top_k's candidate selection takes in each
kernel call for k above 64 (csrc/src/topk.hpp: buffers of about 2k candidates per row and thread,
cut back to k when full), on top of the multiply-adds (AUTO_RATE), whatever the threads and nearly
whatever the piece's rows: m=16, d=16, both sides, k=5e4 took 1.2-1.6 s against 0.1 s at k=10 for
n=2e6 and 2.4 s against 1.2 s for n=2.5e7; k=5000 0.3 s against 0.1 s (n=2e6); 10 calls of 2e5 rows
at k=5e4 0.6 s each (2 shared cores)."""

STORE_CHUNK_BYTES = 256 * 2**20
"""Default bytes of train rows a GradientStore maps for one kernel call (GradientStore.open's
chunk_bytes, store._store.DEFAULT_CHUNK_BYTES), and the largest default shard of a distributed call
(distributed._shards.MAX_SHARD_BYTES: one shard, one kernel call). benchmarks/results/store.json and
store_4gib.json (64 test rows, both sides, top-10, float16 rows of 2 x 4096): scoring the store from disk
takes 1.02x (1 GiB, warm) to 1.30x (4 GiB, cold) the in-memory time, with a peak RSS of 293 MiB
against 1057 / 4129 MiB in memory.
"""

DEVICE_TILE_BYTES = 256 * 2**20
"""Device backends (tracin.backends.torch_device): bytes of train rows (as stored on the host, all
checkpoints together) per tile of rows that stream from the host, which is also the unit of one
host-to-device copy and of each of the two pinned staging buffers. Large enough that one copy runs
near the link's bandwidth; two staging buffers (pinned host memory) and two device buffers take
1 GiB at most (less for a train set smaller than a tile). On an H200 (top_k, m=1000, n=1,000,000,
d=512; benchmarks/results/gpu_tiles.json, 2026-12-04, two sweeps): 256 MiB tiles took 78.6-99.0 ms
for a store streamed at top-10 (64 MiB: 98.7-125.9), where each tile is a store chunk
(STORE_CHUNK_BYTES) and the host's copies, not the GEMMs, set the pace.
"""

DEVICE_RESIDENT_TILE_BYTES = 2**30
"""Device backends: bytes of train rows per tile (float32 on the device, all checkpoints together)
when every train block is on the device already: the tiles are views of the caller's float32 rows,
so their size costs no memory (half-precision rows are widened per tile: a float32 copy of twice a
tile's bytes); it sets the GEMMs' width. On an H200 (top_k, m=1000, n=1,000,000, d=512, the
rows on the device, probes of 2026-12-04, median of 3): cuBLAS picks a slower float32 kernel for
1000 x 131,072 products (3.32 ms each, 25.6 ms for 1M rows) than for 262,144 or more columns
(21.1-21.3 ms for 1M rows; the whole product at once: 21.2-23.4). 256 MiB tiles with 2^27 scores
per block took 32.3 ms at top-10, 47.1 at top-1000 and 35.5 for both sides at top-10; 512 MiB with
2^28: 26.9, 37.4, 29.3; 1 GiB with 2^28: 26.6, 32.8, 28.9 (512 test rows per block: the top-1000
selection over 524,288 columns costs less per score than over 262,144). In the sweeps of
benchmarks/results/gpu_tiles.json since: 1 GiB with 2^28 took 27.0-28.0 ms at top-10 and 34.4-35.8
at top-1000, 256 MiB with 2^27 32.9-33.4 and 46.9-47.6.
"""

DEVICE_TEST_BYTES = 2**30
"""Device backends: bytes of test rows (float32 on the device, all checkpoints together) per test chunk,
which the generic loop uploads once and scores against every train piece; a larger test set is cut
into chunks of this size (as a store's row_chunks() cuts it for the CPU kernel), each meeting the
whole train side again; not a test set of float32 tensors already on the device, for plain scores
(used in place: no device memory to bound). top_k's chunks also count its running selection,
12 bytes x min(k, train rows) x sides per row (scoring._device_test_rows), on-device test sets too.
Bounds the test side's device memory whatever m is: the chunk, plus for
cosine scores one block's scaled copy (each block is replaced by its copy in turn) and float64
squared row norms of 32 MiB slices. 1 GiB is 32,768 rows at d=8192: then a GEMM does m/2 = 16,384 flops per
byte of train rows uploaded, far above what a GPU needs (about 2,000 at 50 TFLOP/s over 25 GB/s), so
re-streaming the train side per chunk stays hidden behind the compute up to d of about 65,536.
Not yet measured on a GPU: rerun benchmarks/gpu.py.
"""

DEVICE_SUM_DEPTH = 1024
"""Device backends: most columns per float32 GEMM (torch_device._gemm). A wider block is multiplied in
slices of this many columns whose results are added in float64, so that the error stays within the
numerical contract whatever d is: BLAS and cuBLAS sum each dot product in one float32 chain, and
same-sign rows (products 1 + eps/256, every eps of a fine grid in [0.005, 0.12]) missed the bound on
torch:cpu from about 3000 columns for test sets of a few rows (matrix-vector path: 1.5x at 4096, and
so at any d in slices of 4096; 64 test rows 0.25x), 5x at 2^20 in one GEMM; at most 0.39x in slices of
1024 (0.19x of 512). Costs one float64 add of the score block per slice; blocks of d <= 1024 are one
GEMM as before. Not yet measured on a GPU."""

DEVICE_TILE_SCORES = 2**28
"""Device backends: scores per score block (test rows x train rows of a tile, float32: 1 GiB); the
test side is cut into blocks of DEVICE_TILE_SCORES // tile rows (a tile holds at most
DEVICE_TILE_SCORES rows, whatever its bytes). At most twice this many scores
exist at once (top_k merges a block's candidates, which keep its scores, after the next block is
made), plus, for rows cut inside a tie, copies of those rows, and, for small k on wide tiles, the
candidates of the block being selected (_torch_topk._group_size: at most a quarter of its scores,
freed once its k + 1 best are picked). This bounds the device memory of top_k whatever m and n are
(the full (m, n) matrix is never held: about 2.5 GiB of score blocks at most), and keeps each GEMM
large (m=512 x 524,288 rows or m=1000 x 262,144 at d=512). On an H200 (see DEVICE_RESIDENT_TILE_BYTES):
2^29 scores per block with 512 MiB tiles took the time of 2^28 (26.9 ms at top-10); earlier, with
256 MiB tiles, 2^26 took 1.03-1.07x the time of 2^27 (streamed: 0.98-1.04x), and with 64 MiB tiles,
2^23 took 1.3-2.5x the time of 2^25.
"""
