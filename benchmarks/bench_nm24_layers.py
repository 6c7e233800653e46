"""Per-layer speed of the nm24 2:4 CPU kernel against dense, at 1, 2 and all threads.

For every pruned layer shape of the default model (SmolLM2-135M: q/o 576x576, k/v 192x576,
gate/up 1536x576, down 576x1536), each dtype and each token count, dense ``F.linear`` and
``Nm24Linear`` are timed interleaved in one process, round by round, so a burst of load
from elsewhere slows both: the ratio is the result, absolute times only describe the run.
Each timed call goes over ``--copies`` distinct random 2:4 layers of the shape (30, like the
model's 30 blocks), so the weights stream from memory as in a real decode step instead of
sitting in cache after the first call (which would flatter dense, whose weights are larger).

Writes one JSON file: settings, the machine (CPU capability, load average before and
after), one row per (threads, dtype, shape, tokens) and, per (threads, dtype, tokens), the
speedup of one decoder block's seven linears (q, k, v, o, gate, up, down) together::

    python benchmarks/bench_nm24_layers.py --out benchmarks/results/nm24-layers-cpu.json
"""

from __future__ import annotations

import os

# As sdsprune sets it on import, so the threads behave as in a user's run; must come before
# torch loads, and an explicit OMP_WAIT_POLICY=ACTIVE in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from sdsprune.inference.native import cpu_capability
from sdsprune.inference.nm24 import MAX_KERNEL_TOKENS, Nm24Linear, extension

# (out, in) -> the default model's layers of that shape, per decoder block
SMOLLM2_LAYERS = {
    (576, 576): ("q_proj", "o_proj"),
    (192, 576): ("k_proj", "v_proj"),
    (1536, 576): ("gate_proj", "up_proj"),
    (576, 1536): ("down_proj",),
}


def random_2of4_linear(out_features: int, in_features: int, dtype: torch.dtype):
    """A bias-free linear layer keeping the 2 largest of every 4 weights (a 2:4 pattern)."""
    weight = torch.randn(out_features, in_features)
    groups = weight.view(out_features, -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.abs().topk(2, dim=2).indices, True)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_((groups * keep).view_as(weight))
    return linear.to(dtype)


def interleaved_medians(
    contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 3
) -> dict[str, float]:
    """Seconds per call of each contender: median over rounds that time each one in turn."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def time_shape(shape, dtype, token_counts, copies: int, repeats: int) -> list[dict]:
    """Dense vs nm24 for ``copies`` layers of ``shape``, at each token count."""
    linears = [random_2of4_linear(*shape, dtype) for _ in range(copies)]
    kernels = [Nm24Linear(linear) for linear in linears]
    rows = []
    with torch.inference_mode():
        for tokens in token_counts:
            x = torch.randn(tokens, shape[1]).to(dtype)
            contenders = {
                "dense": lambda x=x: [F.linear(x, layer.weight) for layer in linears],
                "nm24": lambda x=x: [kernel(x) for kernel in kernels],
            }
            seconds = interleaved_medians(contenders, repeats)
            dense, nm24 = seconds["dense"] / copies, seconds["nm24"] / copies
            rows.append(
                {
                    "shape": list(shape),
                    "layers": list(SMOLLM2_LAYERS[shape]),
                    "dtype": str(dtype).removeprefix("torch."),
                    "tokens": tokens,
                    "nm24_path": "kernel" if tokens <= MAX_KERNEL_TOKENS else "expand + MKL",
                    "dense_us": round(dense * 1e6, 1),
                    "nm24_us": round(nm24 * 1e6, 1),
                    "speedup": round(dense / nm24, 3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def block_speedups(rows: list[dict]) -> list[dict]:
    """Per (threads, dtype, tokens): dense time / nm24 time of one block's seven linears."""
    totals: dict[tuple, list[float]] = {}
    for row in rows:
        key = (row["threads"], row["dtype"], row["tokens"])
        dense_nm24 = totals.setdefault(key, [0.0, 0.0])
        count = len(row["layers"])
        dense_nm24[0] += count * row["dense_us"]
        dense_nm24[1] += count * row["nm24_us"]
    return [
        {
            "threads": threads,
            "dtype": dtype,
            "tokens": tokens,
            "block_dense_us": round(dense, 1),
            "block_nm24_us": round(nm24, 1),
            "speedup": round(dense / nm24, 3),
        }
        for (threads, dtype, tokens), (dense, nm24) in totals.items()
    ]


def thread_counts(spec: str) -> list[int]:
    """ "1,2,all" -> [1, 2, os.cpu_count()], without repeats."""
    counts = [os.cpu_count() or 1 if item == "all" else int(item) for item in spec.split(",")]
    return list(dict.fromkeys(counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/nm24-layers-cpu.json")
    parser.add_argument("--threads", default="1,2,all")
    parser.add_argument("--tokens", default="1,2,4,8,16,128")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--copies", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--note", default="", help="stored with the results (e.g. machine load)")
    args = parser.parse_args()
    ext = extension()
    if isinstance(ext, str):
        raise SystemExit(f"nothing to measure: {ext}")
    token_counts = [int(t) for t in args.tokens.split(",")]
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    load_before = os.getloadavg()
    start = time.perf_counter()
    rows = []
    for threads in thread_counts(args.threads):
        torch.set_num_threads(threads)
        for dtype in dtypes:
            for shape in SMOLLM2_LAYERS:
                for row in time_shape(shape, dtype, token_counts, args.copies, args.repeats):
                    rows.append({"threads": threads, **row})
    result = {
        "settings": {**vars(args), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "machine": {
            "cpu_capability": cpu_capability(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
            "seconds": round(time.perf_counter() - start, 1),
        },
        "block": block_speedups(rows),
        "layers": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for row in result["block"]:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
