"""Layer errors of the exact N:M group search against SDS's magnitude-projected adjustment.

Real SmolLM2-135M layers: the calibration windows are run through the dense model up to the
chosen blocks, each layer's Gram matrix is collected, then every layer is pruned with
SparseGPT at 2:4, adjusted (projected gradient, the SDS default), and refined with 1 and 3
sweeps of the group search. Prints and writes the relative output error after each step.

    python benchmarks/group_search.py --out benchmarks/results/group-search-2-4.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from run_record import write_run_record

from sdsprune.data import load_corpus, sample_calibration
from sdsprune.engine import StatsCollector, capture_block_inputs
from sdsprune.linalg import relative_error
from sdsprune.models import decoder_blocks, load_model
from sdsprune.models.blocks import block_linears
from sdsprune.pruners import SparsityPattern, get_pruner
from sdsprune.sds import SDSConfig, adjust
from sdsprune.sds.groups import refine_groups


def layer_rows(block: torch.nn.Module, index: int, stream, pattern) -> list[dict]:
    linears = block_linears(block)
    stats = StatsCollector(linears, "gram")
    with stats.hooks():
        block(stream.hidden, *stream.block_args[index], **stream.block_kwargs[index])
    stats.finalize()
    rows = []
    for name, layer in linears.items():
        dense, layer_stats = layer.weight.detach().float(), stats.for_layer(name)
        gram = layer_stats.gram
        pruned = get_pruner("sparsegpt").prune(dense, layer_stats, pattern).weight
        adjusted = adjust(pruned, dense, gram, pattern, "row", SDSConfig())
        start = time.perf_counter()
        one = refine_groups(adjusted, dense, gram, pattern, 1)
        seconds = time.perf_counter() - start
        three = refine_groups(adjusted, dense, gram, pattern, 3)
        errors = [relative_error(dense, w, gram) for w in (pruned, adjusted, one, three)]
        rows.append(
            {
                "layer": f"{index}.{name}",
                "sparsegpt": errors[0],
                "adjusted": errors[1],
                "group_search_1": errors[2],
                "group_search_3": errors[3],
                "ratio_1_sweep": errors[2] / errors[1],
                "ratio_3_sweeps": errors[3] / errors[1],
                "seconds_1_sweep": round(seconds, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="2,14")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    wanted = {int(b) for b in args.blocks.split(",")}
    loaded = load_model("smollm2-135m")
    windows = sample_calibration(
        load_corpus("wiki", "calib"), loaded.tokenizer, args.nsamples, args.seqlen, 0
    )
    stream = capture_block_inputs(loaded.model, windows, torch.device("cpu"), args.nsamples)
    pattern = SparsityPattern.parse("2:4")
    rows = []
    for index, block in enumerate(decoder_blocks(loaded.model)[: max(wanted) + 1]):
        if index in wanted:
            rows += layer_rows(block, index, stream, pattern)
        out = block(stream.hidden, *stream.block_args[index], **stream.block_kwargs[index])
        stream.hidden = out[0] if isinstance(out, tuple | list) else out
    if args.out:
        write_run_record(args.out, __file__, args, layers=rows)


if __name__ == "__main__":
    main()
