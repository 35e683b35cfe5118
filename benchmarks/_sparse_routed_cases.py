"""Routed sparse attention cases for bench_sparse.py: BiFormer, HiP and PSA through flex, each against
dense SDPA on the same inputs (bidirectional for the 2D map, causal for the sequences).

``cases(quick)`` returns rows in the format bench_sparse.py documents. Block density counts the flex
blocks (128 x 128, or region-aligned query blocks) the kernel visits, relative to the dense block grid
of the same (Tq, S); ideal density is the fraction of (query, key) pairs the mask allows (for PSA a pooled
key counts as one pair). Mask estimation (routing, hierarchy, levels) is inside ``run``, as in use. Each case also carries
"reference" (the fp32 definition on the same inputs) so a run can check flex's output, and "kernel"
(flex alone on a prebuilt block mask, so the mask estimation cost shows); bench_sparse.py ignores both.

    python benchmarks/_sparse_routed_cases.py --quick   # these rows alone, without bench_sparse.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gatelab.ops.biformer import biformer
from gatelab.ops.biformer.flex import biformer_block_mask
from gatelab.ops.biformer.routing import route, routed_regions, to_regions
from gatelab.ops.common.flex_blocks import run_flex
from gatelab.ops.hip import hip, hip_select, token_mask
from gatelab.ops.hip.flex import hip_block_mask
from gatelab.ops.psa import psa, psa_levels, pyramid, pyramid_mask
from gatelab.ops.psa.flex import psa_flex_inputs


def _visited_fraction(block_mask, T: int, S: int) -> float:
    """Visited (q block, kv block) pairs of a BlockMask relative to a dense 128 x 128 grid over (T, S)."""
    q_block, kv_block = block_mask.BLOCK_SIZE
    visited = float(block_mask.kv_num_blocks.float().sum()) * q_block * kv_block
    denominator = block_mask.kv_num_blocks.shape[0] * block_mask.kv_num_blocks.shape[1]
    return visited / (denominator * (-(-T // 128) * 128) * (-(-S // 128) * 128))


def _sdpa(q, k, v, causal):
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def biformer_case(side: int, regions: int, topk: int, H: int = 4, D: int = 64) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, side, side, H, D) for _ in range(3))
    grid = (regions, regions)
    block_mask = biformer_block_mask(q, k, grid=grid, topk=topk)
    routed = routed_regions(route(q, k, grid, topk), regions * regions)
    qs, ks, vs = (x.flatten(1, 2).transpose(1, 2).contiguous() for x in (q, k, v))  # (B, H, N, D)
    qr, kr, vr = (to_regions(x, grid).flatten(1, 2) for x in (q, k, v))  # (B, N, H, D) region-major
    N = side * side
    return {
        "name": f"biformer 2D {side}x{side} regions={regions}x{regions} topk={topk}",
        "run": lambda: biformer(q, k, v, regions=regions, topk=topk, backend="flex"),
        "dense": _sdpa(qs, ks, vs, causal=False),
        "block_density": _visited_fraction(block_mask, N, N),
        "ideal_density": float(routed.float().mean()),
        "notes": "flex, region-major tokens; dense = bidirectional SDPA",
        "reference": lambda: biformer(q, k, v, regions=regions, topk=topk, backend="reference"),
        "kernel": lambda: run_flex(qr, kr, vr, block_mask, D**-0.5),
    }


def hip_case(T: int, topk: int, block_size_q: int, block_size_k: int, H: int = 4, D: int = 64) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, T, H, D) for _ in range(3))
    options = dict(
        topk=topk, block_size_q=block_size_q, block_size_k=block_size_k, sinks=4, window=64, causal=True
    )
    block_mask = hip_block_mask(q, k, scale=D**-0.5, **options)
    selected = hip_select(
        q, k, topk=topk, block_size_q=block_size_q, block_size_k=block_size_k, causal=True, scale=D**-0.5
    )
    mask = token_mask(
        selected, T, T, block_size_q=block_size_q, block_size_k=block_size_k, causal=True, sinks=4, window=64
    )
    qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    return {
        "name": f"hip T={T} topk={topk} bq={block_size_q} bk={block_size_k}",
        "run": lambda: hip(q, k, v, backend="flex", **options),
        "dense": _sdpa(qs, ks, vs, causal=True),
        "block_density": _visited_fraction(block_mask, T, T),
        "ideal_density": float(mask.float().mean()),
        "notes": "flex, sinks=4 window=64; dense = causal SDPA",
        "reference": lambda: hip(q, k, v, backend="reference", **options),
        "kernel": lambda: run_flex(q, k, v, block_mask, D**-0.5),
    }


def psa_case(
    T: int, block_size_q: int, block_size_k: int, budget=(0.25, 0.15, 0.15, 0.15), H: int = 4, D: int = 64
):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, T, H, D) for _ in range(3))
    options = dict(budget=budget, block_size_q=block_size_q, block_size_k=block_size_k, causal=True)
    k_all, v_all, block_mask, score_mod = psa_flex_inputs(q, k, v, scale=D**-0.5, **options)
    level = psa_levels(q, k, scale=D**-0.5, **options)
    _, _, token_level, token_block, _ = pyramid(k, v, block_size_k)
    mask = pyramid_mask(level, T, T, token_level, token_block, block_size_q=block_size_q, causal=True)
    qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    return {
        "name": f"psa T={T} bq={block_size_q} bk={block_size_k} budget={budget}",
        "run": lambda: psa(q, k, v, backend="flex", **options),
        "dense": _sdpa(qs, ks, vs, causal=True),
        "block_density": _visited_fraction(block_mask, T, T),
        "ideal_density": float(mask.float().sum(-1).mean()) / T,
        "notes": "flex over full + pooled keys; dense = causal SDPA",
        "reference": lambda: psa(q, k, v, backend="reference", **options),
        "kernel": lambda: run_flex(q, k_all, v_all, block_mask, D**-0.5, score_mod=score_mod),
    }


def cases(quick: bool) -> list[dict]:
    if quick:
        return [biformer_case(16, 4, 4), hip_case(512, 4, 64, 32), psa_case(512, 64, 64)]
    return [biformer_case(64, 8, 4), hip_case(4096, 8, 64, 64), psa_case(4096, 64, 64)]


def main() -> None:
    import argparse

    from gatelab.benchmarking import print_table, time_side_by_side, write_results
    from gatelab.testing import rel_rms

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with torch.no_grad():
        for case in cases(args.quick):
            error = rel_rms(
                case["run"](), case["reference"]()
            )  # flex (compiled when large) vs the fp32 definition
            fns = {"sparse": case["run"], "kernel": case["kernel"], "dense": case["dense"]}
            ms = {name: 1e3 * t for name, t in time_side_by_side(fns, repeats=args.repeats, warmup=1).items()}
            rows.append(
                {
                    "name": case["name"],
                    "sparse ms": ms["sparse"],
                    "flex kernel ms": ms["kernel"],
                    "dense SDPA ms": ms["dense"],
                    "dense/sparse": ms["dense"] / ms["sparse"],
                    "dense/kernel": ms["dense"] / ms["kernel"],
                    "block density": case["block_density"],
                    "ideal density": case["ideal_density"],
                    "rel RMS vs ref": error,
                }
            )
    print_table("routed sparse attention (flex) vs dense SDPA, forward", rows, list(rows[0]))
    path = write_results("sparse_routed_cases", rows, meta={"quick": args.quick, "repeats": args.repeats})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
