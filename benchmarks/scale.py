"""Scale benchmark: a Llama-3-8B-shaped model on the CPU, measured per block, extrapolated.

The model has Llama-3-8B's block shapes (hidden 4096, MLP 14336, GQA 32/8 heads) with
random weights and only ``--blocks`` decoder blocks (vocabulary 32000: the embeddings are
outside what is measured). Each configuration runs in its own process, so peak memory is
its own: SparseGPT, SDS fused sd and SDS fused kd, in bf16 and fp32, on
``--windows`` x ``--seqlen`` random calibration tokens. Per block it reports the time of
each stage (capture, statistics pass, solve, SDS re-fit, output pass), peak RSS above the
process's baseline (model built, before pruning) next to the memory plan's estimate, and
extrapolates to 32 blocks x 128 x 2048 tokens (8B) and 80 blocks (70B):

    passes scale with tokens and with the block's linear weights (70B: 3.9x an 8B block),
    the re-fit likewise but over at most 16 windows (8 -> 128 windows: 2x, not 16x),
    solves do not depend on tokens and scale with out x in² per layer (70B: 7.9x).

Full run (hours on a 2-core machine)::

    python benchmarks/scale.py --out benchmarks/results/scale-cpu

A rerun into the same folder keeps the rows measured there and runs only the missing
ones, so the full run can be split (``--configs sparsegpt --dtypes float32``, ...). Without
``--dtypes``, bf16 runs only where the CPU computes it natively (the measured bf16/fp32
matmul ratio goes to ``bf16-check.json``).

Check that it works (minutes)::

    python benchmarks/scale.py --blocks 1 --windows 2 --seqlen 512 --out /tmp/scale-small
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from llama3_shapes import llama_3_8b_config

from sdsprune.methods import SDS, SparseGPT
from sdsprune.runinfo import resident_bytes

# SDS as an 8B run does it: the adjustment is skipped above 3B parameters (adjust=auto);
# this 2-block model is smaller, so that is said explicitly.
CONFIGS = {
    "sparsegpt": SparseGPT(),
    "sds-sd": SDS(base=SparseGPT(), data_mode="sd", adjust="never"),
    "sds-kd": SDS(base=SparseGPT(), data_mode="kd", adjust="never"),
}
DTYPES = ("bfloat16", "float32")
PASSES = ("capture", "stats_pass", "output_pass")
STAGES = (*PASSES, "solve", "refine")  # refine: SDS's block re-fit (Adam over a few windows)
SEQLEN_8B, WINDOWS_8B = 2048, 128
# Above this bf16/fp32 matmul time ratio the CPU has no native bf16 (AVX2 only: ~100x), and a
# bf16 row would take days while measuring the emulation, not the pruner: skipped by default.
MAX_BF16_SLOWDOWN = 8.0
TOKENS_8B = WINDOWS_8B * SEQLEN_8B


def layer_shapes(hidden: int, intermediate: int, kv_width: int) -> list[tuple[int, int]]:
    """(out, in) of a Llama block's seven linear layers."""
    return [
        (hidden, hidden),  # q
        (kv_width, hidden),  # k
        (kv_width, hidden),  # v
        (hidden, hidden),  # o
        (intermediate, hidden),  # gate
        (intermediate, hidden),  # up
        (hidden, intermediate),  # down
    ]


LLAMA_8B = layer_shapes(4096, 14336, 1024)
LLAMA_70B = layer_shapes(8192, 28672, 1024)  # 64 query heads, 8 KV heads of 128
# forwards scale with the weights a token meets; solves with out x in² per layer
PASS_FACTOR_70B = sum(o * i for o, i in LLAMA_70B) / sum(o * i for o, i in LLAMA_8B)
SOLVE_FACTOR_70B = sum(o * i * i for o, i in LLAMA_70B) / sum(o * i * i for o, i in LLAMA_8B)


def llama_8b_shaped(blocks: int, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    config = llama_3_8b_config(
        num_hidden_layers=blocks, vocab_size=32000, max_position_embeddings=8192
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def run_one(name: str, dtype: str, args) -> dict:
    """One configuration in this process: prune, then report per-block stage times."""
    import sdsprune
    from sdsprune.models import LoadedModel

    model = llama_8b_shaped(args.blocks, getattr(torch, dtype))
    tokenizer = _tokenizer()
    windows = torch.randint(0, 32000, (args.windows, args.seqlen), generator=torch.Generator())
    baseline = resident_bytes() / 2**20
    start = time.perf_counter()
    result = sdsprune.prune(
        LoadedModel(model, tokenizer, "llama-3-8b-shaped", None),
        CONFIGS[name],
        sparsity="2:4",
        calibration=windows,
        run=sdsprune.RunOptions(device="cpu", progress=False),
    )
    seconds = time.perf_counter() - start
    timings = result.report["timings"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    per_block = {stage: timings.get(stage, 0.0) / args.blocks for stage in STAGES}
    return {
        "config": name,
        "dtype": dtype,
        "blocks": args.blocks,
        "tokens": args.windows * args.seqlen,
        "windows": args.windows,
        "seconds": round(seconds, 1),
        "per_block_seconds": {k: round(v, 2) for k, v in per_block.items()},
        "peak_above_baseline_mib": round(peak - baseline, 1),
        "stage_peak_above_baseline_mib": stage_peaks(result.report, baseline),
        "planned_peak_mib": round(result.report["plan"]["device_peak"] / 2**20, 1),
        "batch": result.report["plan"]["batch"],  # lowered by the plan when 4 would not fit
        "threads": torch.get_num_threads(),
    }


def stage_peaks(report: dict, baseline: float) -> dict[str, float]:
    """Each block stage's peak resident memory above the baseline (which the plan's per-block
    estimate is compared with): says which stage an under-estimate belongs to."""
    stages = report["memory"].get("stages", {})
    return {
        stage: round(stages[stage]["peak_rss_mib"] - baseline, 1)
        for stage in STAGES
        if "peak_rss_mib" in stages.get(stage, {})
    }


def _tokenizer():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import byte_tokenizer  # in-memory, no downloads; only its BOS rule is read

    return byte_tokenizer()


def extrapolate(row: dict) -> dict:
    """Minutes for a whole 8B and 70B run from the measured per-block times.

    The re-fit runs forwards and backwards like a pass, but over at most ``block_windows``
    windows (16 by default): from 8 to 128 windows its tokens double, not grow 16x.
    """
    times = row["per_block_seconds"]
    passes = sum(times[stage] for stage in PASSES) * TOKENS_8B / row["tokens"]
    refit_windows = SDS().block_windows
    windows = row.get("windows", row["tokens"] // SEQLEN_8B)
    refine = times.get("refine", 0.0) * (
        min(refit_windows, WINDOWS_8B) / min(refit_windows, windows)
    )
    eight = 32 * (passes + refine + times["solve"])
    seventy = 80 * ((passes + refine) * PASS_FACTOR_70B + times["solve"] * SOLVE_FACTOR_70B)
    return {"8b_minutes": round(eight / 60, 1), "70b_minutes": round(seventy / 60, 1)}


def table(rows: list[dict]) -> str:
    lines = [
        "| config | dtype | batch | capture s | stats pass s | solve s | re-fit s "
        "| output pass s | peak MiB (plan) | 8B min | 70B min |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        t, e = row["per_block_seconds"], row["extrapolated"]
        lines.append(
            f"| {row['config']} | {row['dtype']} | {row['batch']} | {t['capture']} "
            f"| {t['stats_pass']} "
            f"| {t['solve']} | {t.get('refine', 0.0)} | {t['output_pass']} "
            f"| {row['peak_above_baseline_mib']:.0f} ({row['planned_peak_mib']:.0f}) "
            f"| {e['8b_minutes']} | {e['70b_minutes']} |"
        )
    return "\n".join(lines)


def stage_table(rows: list[dict]) -> str:
    """Peak memory above the baseline per stage (rows measured before it was recorded: -)."""
    lines = [
        "| config | dtype | " + " | ".join(f"{stage} MiB" for stage in STAGES) + " | plan MiB |",
        "|---|---|" + "---:|" * (len(STAGES) + 1),
    ]
    for row in rows:
        peaks = row.get("stage_peak_above_baseline_mib", {})
        cells = [f"{peaks[stage]:.0f}" if stage in peaks else "-" for stage in STAGES]
        lines.append(
            f"| {row['config']} | {row['dtype']} | {' | '.join(cells)} "
            f"| {row['planned_peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def row_key(row: dict) -> tuple[str, str, int, int]:
    return row["config"], row["dtype"], row["blocks"], row["tokens"]


def bf16_slowdown() -> float:
    """How many times slower a block-sized bf16 matmul is than fp32 on this CPU."""

    def seconds(dtype: torch.dtype) -> float:
        inputs, weight = torch.randn(256, 4096, dtype=dtype), torch.randn(4096, 1024, dtype=dtype)
        inputs @ weight  # warm-up: the first call picks and loads the kernel
        start = time.perf_counter()
        inputs @ weight
        return time.perf_counter() - start

    return seconds(torch.bfloat16) / seconds(torch.float32)


def dtypes_to_run(args) -> list[str]:
    """The requested dtypes; by default bf16 only where the CPU computes it natively."""
    if args.dtypes is not None:
        return args.dtypes.split(",")
    slowdown = bf16_slowdown()
    check = {"bf16_over_fp32_matmul": round(slowdown, 1), "threads": torch.get_num_threads()}
    (Path(args.out) / "bf16-check.json").write_text(json.dumps(check, indent=2))
    if slowdown <= MAX_BF16_SLOWDOWN:
        return list(DTYPES)
    print(
        f"bfloat16: skipped: a bf16 matmul is {slowdown:.0f}x slower than fp32 on this CPU "
        "(no native bf16); pass --dtypes bfloat16 to run it anyway",
        flush=True,
    )
    return ["float32"]


def measured_rows(path: Path) -> list[dict]:
    """Rows an earlier (interrupted or partial) run wrote: the full run takes hours on a
    small machine, so it may be done one configuration at a time and is resumed, not redone."""
    return json.loads(path.read_text()) if path.exists() else []


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument(
        "--dtypes", help=f"comma list of {', '.join(DTYPES)} (default: bf16 where native)"
    )
    parser.add_argument("--out", required=True, help="folder for scale.json and scale.md")
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(*args.one, args)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = measured_rows(out / "scale.json")
    common = ["--blocks", str(args.blocks), "--windows", str(args.windows)]
    common += ["--seqlen", str(args.seqlen), "--out", str(out)]
    measured = {row_key(row) for row in rows}
    for dtype in dtypes_to_run(args):
        for name in args.configs.split(","):
            if (name, dtype, args.blocks, args.windows * args.seqlen) in measured:
                print(f"{name} {dtype}: already measured in {out / 'scale.json'}", flush=True)
                continue
            command = [sys.executable, __file__, *common, "--one", name, dtype]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return done.returncode
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["extrapolated"] = extrapolate(row)
            rows.append(row)
            print(f"{name} {dtype}: {row['seconds']} s", flush=True)
            # written after every configuration: a long run killed late keeps what it measured
            (out / "scale.json").write_text(json.dumps(rows, indent=2))
            (out / "scale.md").write_text(f"{table(rows)}\n\n{stage_table(rows)}\n")
    print(table(rows))
    print(stage_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
