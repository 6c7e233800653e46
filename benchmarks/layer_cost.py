"""Cost of SDS's per-layer steps on Llama-3-8B-shaped layers, against SparseGPT's.

Random weights and a random positive definite second-moment matrix of the right size (the
costs do not depend on the values). Each step is timed once in the same process, so the
ratios are comparable even on a busy machine; the adjustment and the group search are timed
for a few iterations and extrapolated linearly (every iteration is the same matmul).

    python benchmarks/layer_cost.py --out benchmarks/results/layer-cost-8b.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch
from run_record import write_run_record

from sdsprune.pruners import SparsityPattern, get_pruner
from sdsprune.pruners.base import InputStats
from sdsprune.sds import SDSConfig, adjust, redense
from sdsprune.sds.groups import refine_groups
from sdsprune.sds.solver import fit_objective

# (name, out, in) of Llama-3-8B's linear layers; gate/up share q's input width
SHAPES = {"8b-down_proj": (4096, 14336), "8b-up_proj": (14336, 4096), "8b-q_proj": (4096, 4096)}


def random_gram(width: int, seed: int) -> torch.Tensor:
    """XᵀX/N for correlated random features (N = 2 x width tokens)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width // 8, generator=g) / width**0.5
    tokens = torch.randn(2 * width, width // 8, generator=g) @ mixing.T
    tokens += 0.1 * torch.randn(2 * width, width, generator=g)
    return tokens.T @ tokens / tokens.shape[0]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(out: int, width: int, probe_iters: int, config: SDSConfig) -> dict:
    pattern = SparsityPattern.parse("2:4")
    gram = random_gram(width, seed=0)
    dense = torch.randn(out, width, generator=torch.Generator().manual_seed(1)) * 0.02
    stats = InputStats(count=2 * width, gram=gram)
    pruner = get_pruner("sparsegpt")
    sparsegpt_s, outcome = timed(lambda: pruner.prune(dense, stats, pattern))
    redense_s, _ = timed(lambda: redense(dense, outcome.weight, gram, gram, config))
    probe = replace(config, adjust_iters=probe_iters)
    adjust_probe_s, adjusted = timed(
        lambda: adjust(outcome.weight, dense, gram, pattern, "row", probe, check_every=probe_iters)
    )
    objective_s, _ = timed(lambda: fit_objective(adjusted, gram, dense @ gram))
    group_s, _ = timed(lambda: refine_groups(adjusted, dense, gram, pattern, 1))
    # the probe evaluated the objective twice (start, end); a real run every 10 steps
    per_iter = (adjust_probe_s - 2 * objective_s) / probe_iters
    adjust_s = per_iter * config.adjust_iters + (config.adjust_iters // 10 + 1) * objective_s
    sds_layer_s = 2 * sparsegpt_s + redense_s + adjust_s
    return {
        "shape": [out, width],
        "sparsegpt_s": round(sparsegpt_s, 2),
        "redense_closed_s": round(redense_s, 2),
        "adjust_per_iter_s": round(per_iter, 3),
        f"adjust_{config.adjust_iters}_iters_s (extrapolated)": round(adjust_s, 1),
        "group_sweep_s": round(group_s, 2),
        "adjust_vs_sparsegpt": round(adjust_s / sparsegpt_s, 2),
        "adjust_share_of_sds_layer_steps": round(adjust_s / sds_layer_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--probe-iters", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = SDSConfig()
    rows = {}
    for name in args.shapes.split(","):
        rows[name] = measure(*SHAPES[name], args.probe_iters, config)
        print(name, json.dumps(rows[name]), flush=True)
    if args.out:
        write_run_record(args.out, __file__, args, results=rows)


if __name__ == "__main__":
    main()
