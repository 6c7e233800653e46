"""N:M masks by in-group rank against top-k, alone and inside SDS's adjustment.

SDS's adjustment re-selects the layer's N:M mask at every one of its steps, so the mask is
computed 50 times a layer. Both ways give the same mask (tested); this times them on the
default model's layer shapes and on Llama-3-8B's, interleaved (medians of ``--repeats``), so
the ratios hold on a busy machine. The adjustment is timed whole (its matmuls included) with
each mask, so its ratio is what a user sees of the change.

    python benchmarks/mask_speed.py --out benchmarks/results/mask-speed.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from bench_nm24_layers import interleaved_medians
from run_record import write_run_record

from sdsprune.pruners import SparsityPattern, patterns
from sdsprune.sds import SDSConfig, adjust

# (name, out, in)
SHAPES = {
    "135m-q_proj": (576, 576),
    "135m-k_proj": (192, 576),
    "135m-up_proj": (1536, 576),
    "135m-down_proj": (576, 1536),
    "8b-q_proj": (4096, 4096),
    "8b-down_proj": (4096, 14336),
}


def by_top_k(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = scores.shape
    return patterns.lowest_k_mask(scores.reshape(rows, cols // m, m), n).reshape(rows, cols)


def adjust_with(mask: Callable, dense, gram, start, config) -> Callable[[], object]:
    def run() -> object:
        original = patterns.nm_mask
        patterns.nm_mask = mask
        try:
            return adjust(start, dense, gram, SparsityPattern.parse("2:4"), "layer", config)
        finally:
            patterns.nm_mask = original

    return run


def measure(out: int, width: int, repeats: int, adjust_repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(out, width, generator=g) * 0.02
    scores = dense.abs()
    ranked = patterns.nm_mask
    row = {}
    mask_s = interleaved_medians(
        {"rank": lambda: ranked(scores, 2, 4), "top_k": lambda: by_top_k(scores, 2, 4)}, repeats
    )
    row["mask_ms"] = {k: round(v * 1e3, 2) for k, v in mask_s.items()}
    row["mask_speedup"] = round(mask_s["top_k"] / mask_s["rank"], 2)
    if adjust_repeats:
        tokens = torch.randn(2 * width, width, generator=g)
        gram = tokens.T @ tokens / tokens.shape[0]
        start = dense.masked_fill(ranked(scores, 2, 4), 0.0)
        config = SDSConfig()
        adjust_s = interleaved_medians(
            {
                "rank": adjust_with(ranked, dense, gram, start, config),
                "top_k": adjust_with(by_top_k, dense, gram, start, config),
            },
            adjust_repeats,
            warmup=0,  # seconds a call: the first is as warm as the rest
        )
        row["adjust_s"] = {k: round(v, 3) for k, v in adjust_s.items()}
        row["adjust_speedup"] = round(adjust_s["top_k"] / adjust_s["rank"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--adjust-repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = {}
    for name, (out, width) in SHAPES.items():
        adjust_repeats = args.adjust_repeats if name.startswith("135m") else 0
        rows[name] = measure(out, width, args.repeats, adjust_repeats)
        print(name, rows[name], flush=True)
    if args.out:
        write_run_record(args.out, __file__, args, shapes=rows)


if __name__ == "__main__":
    main()
