"""The two ways a prompt meets a packed bitmask layer, against dense torch, per token count.

A call with more tokens than the decode kernel takes (a prompt) is multiplied either straight
from the packed form (``sparse_mm``: float32, work proportional to the weights kept) or by
rebuilding the dense rows for torch's GEMM, each thread its own (``tiled_mm``). This times
both against ``torch.mm`` on the dense weight, on the seven linears of one decoder block of
the default model (SmolLM2-135M: q and o 576x576, k and v 192x576, gate and up 1536x576,
down 576x1536) with random weights at each sparsity, the three paths interleaved in every
round (medians; ratios > 1: faster than dense). It is what ``bitmask_linear`` chooses
between (``SPARSE_MM_MAX_KEPT``, ``SPARSE_MM_MIN_TOKENS``).

    python benchmarks/prompt_paths.py --tokens 9,12,16,20,24,28,32,64,128,512 \
        --out benchmarks/results/prompt-paths-split.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from sparse_cpu import cpu_name

from sdsprune.inference.bitmask import extension, pack_bitmask
from sdsprune.inference.tiled import tile_rows

BLOCK = [(576, 576)] * 2 + [(192, 576)] * 2 + [(1536, 576)] * 2 + [(576, 1536)]


def layer_paths(weight: torch.Tensor, x: torch.Tensor, ext) -> dict:
    """The three ways to multiply x by this layer, as calls."""
    in_features = weight.shape[1]
    packed = pack_bitmask(weight)
    rows = tile_rows(in_features, torch.float32)
    return {
        "dense": lambda: torch.mm(x, weight.t()),
        "sparse_mm": lambda: ext.sparse_mm(x, *packed, in_features),
        "tiled_mm": lambda: ext.tiled_mm(x, *packed, in_features, rows),
    }


def random_mask(shape: tuple[int, int], sparsity: str, generator) -> torch.Tensor:
    """Kept entries: each independently with probability 1 - sparsity (``"0.5"``), or N kept
    of every M consecutive inputs, at random positions (``"2:4"``)."""
    if ":" not in sparsity:
        return torch.rand(shape, generator=generator) >= float(sparsity)
    n, m = (int(v) for v in sparsity.split(":"))
    kept = torch.rand(shape[0], shape[1] // m, m, generator=generator).argsort(-1) < n
    return kept.reshape(shape)


def block_seconds(tokens: int, sparsity: str, repeats: int, ext) -> dict[str, float]:
    """Seconds for the block's seven layers under each path (sum of per-layer medians)."""
    totals = {"dense": 0.0, "sparse_mm": 0.0, "tiled_mm": 0.0}
    generator = torch.Generator().manual_seed(0)
    for out_features, in_features in BLOCK:
        weight = torch.randn(out_features, in_features, generator=generator)
        weight *= random_mask((out_features, in_features), sparsity, generator)
        x = torch.randn(tokens, in_features, generator=generator)
        paths = layer_paths(weight, x, ext)
        assert torch.allclose(paths["sparse_mm"](), paths["dense"](), rtol=1e-4, atol=1e-3)
        samples = {name: [] for name in paths}
        for _ in range(repeats + 1):  # the first round warms up
            for name, run in paths.items():
                start = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - start)
        for name, values in samples.items():
            totals[name] += statistics.median(values[1:])
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="16,32,64,128,512")
    parser.add_argument("--sparsities", default="0.5,0.6,0.7,2:4")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ext = extension()
    if isinstance(ext, str):
        raise SystemExit(ext)
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for sparsity in args.sparsities.split(","):
            seconds = block_seconds(tokens, sparsity, args.repeats, ext)
            row = {
                "tokens": tokens,
                "sparsity": sparsity,
                "dense_ms": round(seconds["dense"] * 1e3, 3),
                "sparse_mm_vs_dense": round(seconds["dense"] / seconds["sparse_mm"], 3),
                "tiled_mm_vs_dense": round(seconds["dense"] / seconds["tiled_mm"], 3),
            }
            print(row, flush=True)
            rows.append(row)
    report = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "rows": rows}
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
