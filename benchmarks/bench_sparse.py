"""Sparse attention speed: block density vs ideal density of each mask, and time vs dense-mask SDPA.

    python benchmarks/bench_sparse.py            # full cases
    python benchmarks/bench_sparse.py --quick    # small shapes, a smoke run

Writes benchmarks/results/bench_sparse.json and prints a table (medians of several repeats, every ratio
measured side by side in one run).

Extra cases: if ``benchmarks/_sparse_routed_cases.py`` exists, its ``cases(quick: bool) -> list[dict]`` is
called and each dict becomes a row. The format of one case:

    {
        "name": str,                     # row label, e.g. "biformer 2D 64x64 topk=4"
        "run": Callable[[], Tensor],     # the sparse forward, inputs already built and captured (no grad)
        "dense": Callable[[], Tensor] | None,   # the dense-mask SDPA forward it is timed against, or None
        "block_density": float | None,   # fraction of (q block, kv block) pairs visited
                                         #   (gatelab.ops.common.flex.block_density(block_mask))
        "ideal_density": float | None,   # fraction of (query, key) pairs the mask allows
                                         #   (gatelab.ops.common.flex.ideal_density(dense_bool_mask))
        "notes": str,                    # optional, e.g. "compiled flex, tile-major 8x16"
    }

Each ``run``/``dense`` is called once to warm up (compilation happens there and is not timed), then
timed; the row reports both medians and dense / sparse.
"""
