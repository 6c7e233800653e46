"""Sparse CPU inference grid: dense against ``auto`` for pruned checkpoints of one model.

For every checkpoint (label=folder), dtype and thread count, one ``sdsprune bench`` run
(``run_bench``: dense and ``auto`` loaded side by side, prefill and eager decode at each
batch size, interleaved repeats, medians; plus decoding with the blocks' linears skipped,
which gives each row its bytes ceiling). Each run is written to
``OUT/<label>-<dtype>-t<threads>.json`` and skipped when that file exists, so an interrupted
grid resumes; ``OUT/results.md`` is rewritten from every JSON in the folder after each run.

Example (the README's table; about 4 minutes a run on 2 cores, nothing else running)::

    python benchmarks/sparse_cpu.py --checkpoint 50%=runs/sgpt-50 --checkpoint 70%=runs/sgpt-70 \\
        --checkpoint 2:4=runs/sgpt-24 --dtypes float32,bfloat16 --threads 2,1 \\
        --out benchmarks/results/sparse-cpu

With ``--decode-modes eager,fused,static --llamacpp f32,bf16,q8_0`` every run also times
the fast paths (``fused``: a static KV cache and the step as one C++ loop over the blocks,
what ``load(..., backend="auto")`` gives ``generate()`` by default; ``static``: the same
cache and a compiled step, ``decode="compiled"``) and llama.cpp on GGUFs of the same
checkpoint (the dense model's speed there: llama.cpp computes the zeros), and
``OUT/decode.md`` holds the table a CPU user decides from: every decode path against
torch's dense eager decode and against llama.cpp, with the bytes a step reads and the floor
they give (about 8 minutes a run). ``--backends dense,auto,bitmask`` also times every pruned
layer packed (what ``load`` gives a model that decodes through the fused step; the bench's
``auto`` races its layers for eager calls)::

    python benchmarks/sparse_cpu.py --checkpoint dense=<dense folder> --checkpoint 50%=... \\
        --decode-modes eager,fused --llamacpp f32,bf16,q8_0 --batch-sizes 1,8 \\
        --dtypes float32,bfloat16 --out benchmarks/results/cpu-decode
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from sdsprune.bench import BenchSettings, run_bench, write_json
from sdsprune.inference.native import cpu_capability
from sdsprune.utils import torch_threads


def cpu_name() -> str:
    """The CPU's model name and whether it computes bfloat16 natively (AVX512-BF16 / AMX)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "?"
    )
    native_bf16 = "avx512_bf16" in info or "amx_bf16" in info
    return f"{name} ({cpu_capability()}, bf16 {'native' if native_bf16 else 'emulated'})"


def run_one(
    label: str,
    folder: Path,
    dtype: str,
    threads: int,
    settings,
    out: Path,
    backends: tuple[str, ...] = ("dense", "auto"),
) -> None:
    target = out / f"{label.replace(':', 'of').replace('%', '')}-{dtype}-t{threads}.json"
    if target.exists():
        print(f"kept {target}")
        return
    print(f"bench {label} {dtype} {threads} thread(s)", flush=True)
    load_before = os.getloadavg()
    with torch_threads(threads):
        report = run_bench(
            folder, backends=list(backends), dtype=dtype, settings=settings, progress=print
        )
    report["label"], report["cpu"] = label, cpu_name()
    # other processes' load shows here: timings are ratios within the run, but llama.cpp's
    # threads spin while they wait, so it loses more than torch on a loaded machine
    report["load_average"] = {"before": load_before, "after": os.getloadavg()}
    write_json(report, target)


def rows_of(report: dict) -> list[dict]:
    """One table row per batch: auto's decode (in the run's first decode mode, what
    ``load`` gives by default) and prefill against dense, with the ceiling: Amdahl from the
    linears' measured share for eager decoding, the step's bytes ratio for the fused step."""
    mode = report["settings"]["decode_modes"][0]
    results = {
        (r["backend"], r["workload"], r["batch"]): r
        for r in report["results"]
        if r.get("mode", "eager") == mode or r["workload"] == "prefill"
    }
    backends = report["backends"]
    rows = []
    for batch in report["settings"]["batch_sizes"]:
        decode, prefill = results[("auto", "decode", batch)], results[("auto", "prefill", batch)]
        dense_decode = results[("dense", "decode", batch)]
        if mode == "eager":
            ceiling = (report.get("ceiling") or {}).get("speedup", {}).get("auto", {})
            ceiling = ceiling.get(batch, ceiling.get(str(batch)))
        else:
            ceiling = (report.get("streaming") or {}).get("bytes_ratio", {}).get("auto")
        rows.append(
            {
                "label": report["label"],
                "dtype": report["dtype"],
                "threads": report["threads"],
                "batch": batch,
                "mode": mode,
                "kernels": backends["auto"]["kernels"],
                "dense_ms": dense_decode["value"],
                "auto_ms": decode["value"],
                "decode_speedup": decode["speedup_vs_dense"],
                "decode_verdict": decode["verdict"],
                "ceiling": ceiling,
                "prefill_speedup": prefill["speedup_vs_dense"],
                "prefill_verdict": prefill["verdict"],
                "memory_ratio": backends["auto"]["weights_mib"] / backends["dense"]["weights_mib"],
                "dense_mib": backends["dense"]["weights_mib"],
                "auto_mib": backends["auto"]["weights_mib"],
                "same_tokens": backends["auto"].get("same_greedy_tokens_as_dense"),
            }
        )
    return rows


def markdown(reports: list[dict]) -> str:
    cpus = sorted({r.get("cpu", "?") for r in reports})
    lines = [
        f"CPU: {', '.join(cpus)}. Dense and `auto` in the same run, each as `sdsprune.load` "
        "gives it; decode ms/token (median) in the run's decode mode (fused: the step as one "
        "C++ loop; eager: transformers' loop); prefill: one prompt per sequence; ceiling: "
        "the decode speedup the bytes allow (fused: dense's step bytes over auto's; eager: "
        "Amdahl with the linears' share measured in the run).",
        "",
        "| checkpoint | dtype | threads | batch | decode | auto kernels | dense decode ms "
        "| auto decode ms | decode vs dense | ceiling | prefill vs dense "
        "| weights MiB (vs dense) | greedy = dense |",
        "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows = [row for report in reports for row in rows_of(report)]
    for row in sorted(rows, key=lambda r: (r["label"], r["dtype"], -r["threads"], r["batch"])):
        kernels = ", ".join(f"{k} {v}" for k, v in row["kernels"].items())
        ceiling = f"{row['ceiling']:.2f}x" if row["ceiling"] else ""
        lines.append(
            f"| {row['label']} | {row['dtype']} | {row['threads']} | {row['batch']} "
            f"| {row['mode']} | {kernels} "
            f"| {row['dense_ms']:.1f} | {row['auto_ms']:.1f} "
            f"| {row['decode_speedup']:.2f}x ({row['decode_verdict']}) | {ceiling} "
            f"| {row['prefill_speedup']:.2f}x ({row['prefill_verdict']}) "
            f"| {row['auto_mib']:.0f} ({row['memory_ratio']:.2f}x) | {row['same_tokens']} |"
        )
    return "\n".join(lines) + "\n"


PEERS = ("llama.cpp f32", "llama.cpp bf16", "llama.cpp q8_0")


def decode_rows(report: dict) -> list[dict]:
    """Per decode path and batch: ms/token and its ratios to dense eager and to each
    llama.cpp precision timed in the same run (batch 1 only for llama.cpp)."""
    decode = {
        (r["backend"], r["mode"], r["batch"]): r["seconds"]["median"]
        for r in report["results"]
        if r["workload"] == "decode"
    }
    prefill = {
        (r["backend"], r["batch"]): r["seconds"]["median"]
        for r in report["results"]
        if r["workload"] == "prefill"
    }
    streaming = report.get("streaming") or {}
    first_mode = report["settings"]["decode_modes"][0]
    rows = []
    for (backend, mode, batch), seconds in sorted(decode.items()):
        if backend in PEERS and mode != first_mode:
            continue  # one row per llama.cpp precision (timed again in each mode)
        # torch's dense eager decode where the run timed it, else dense through the same path
        dense = decode.get(("dense", "eager", batch)) or decode.get(("dense", mode, batch))
        # llama.cpp as timed in the same mode's rounds
        peers = {p: decode[(p, mode, batch)] / seconds for p in PEERS if (p, mode, batch) in decode}
        rows.append(
            {
                "label": report["label"],
                "dtype": report["dtype"],
                "threads": report["threads"],
                "batch": batch,
                "path": backend if backend in PEERS else f"{backend} {mode}",
                "ms": seconds * 1e3,
                "vs_dense_eager": dense / seconds if dense else None,
                "vs_peers": peers,
                "prefill_vs_dense": prefill[("dense", batch)] / prefill[(backend, batch)]
                if (backend, batch) in prefill
                else None,
                "mib": streaming.get("decode_weights_mib", {}).get(backend),
                "floor_ms": streaming.get("floor_ms_per_token", {}).get(backend),
            }
        )
    return rows


def decode_markdown(reports: list[dict]) -> str:
    cpus = sorted({r.get("cpu", "?") for r in reports})
    bandwidths = sorted(
        {(r.get("streaming") or {}).get("bandwidth_gib_s") for r in reports} - {None}
    )
    lines = [
        f"CPU: {', '.join(cpus)}; threads as in each row (llama.cpp runs with the same count). "
        "One `bench` run per checkpoint and dtype: dense and `auto` in torch, eager decode "
        "(transformers' dynamic cache), fused (static cache + the step as one C++ loop over "
        'the blocks, what `load(..., backend="auto")` gives `generate()`), static (static '
        'cache + compiled step, `decode="compiled"`) where timed, and llama.cpp on GGUFs of the '
        "same checkpoint (it computes the zeros: the dense model's speed). ms/token medians "
        f"of the run; ratios > 1 mean faster. MiB: weights a batch-1 step reads; floor: "
        f"those bytes at the bandwidth the streaming kernel measured in the run "
        f"({', '.join(f'{b}' for b in bandwidths)} GiB/s). {_loads(reports)}",
        "",
        "| checkpoint | dtype | threads | batch | decode path | ms/token "
        "| vs torch dense (eager if timed) "
        "| vs llama.cpp f32 | vs llama.cpp bf16 | vs llama.cpp q8_0 | prefill vs dense "
        "| MiB read | floor ms |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [row for report in reports for row in decode_rows(report)]
    for row in sorted(
        rows, key=lambda r: (r["label"], r["dtype"], -r["threads"], r["batch"], r["path"])
    ):
        peers = [_ratio(row["vs_peers"].get(p)) for p in PEERS]
        prefill = _ratio(row["prefill_vs_dense"])
        mib = f"{row['mib']:.0f}" if row["mib"] else ""
        floor = f"{row['floor_ms']:.1f}" if row["floor_ms"] else ""
        lines.append(
            f"| {row['label']} | {row['dtype']} | {row['threads']} | {row['batch']} | {row['path']} "
            f"| {row['ms']:.1f} | {_ratio(row['vs_dense_eager'])} | {' | '.join(peers)} "
            f"| {prefill} | {mib} | {floor} |"
        )
    return "\n".join(lines) + "\n"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value else ""


def _loads(reports: list[dict]) -> str:
    """The 1-minute load averages seen around the runs (other processes on the machine)."""
    seen = [
        value
        for r in reports
        for value in (
            r.get("load_average", {}).get("before"),
            r.get("load_average", {}).get("after"),
        )
        if value
    ]
    if not seen:
        return ""
    low, high = min(v[0] for v in seen), max(v[0] for v in seen)
    return f"Load average (1 min) around the runs: {low:.1f}-{high:.1f} on {os.cpu_count()} cores."


def summary_markdown(reports: list[dict]) -> str:
    """The short table (the README's): batch 1 at the default thread count, per checkpoint
    and dtype, auto's decode against dense torch and llama.cpp at the same precision."""
    threads = max(r["threads"] for r in reports)
    lines = [
        f"CPU: {', '.join(sorted({r.get('cpu', '?') for r in reports}))}; {threads} threads, "
        "batch 1, prompt 128 tokens, 16 decoded tokens; ratios within each run.",
        "",
        "| checkpoint | dtype | decode ms/token | vs dense (torch) | vs llama.cpp, same dtype "
        "| bytes ceiling | prompt vs dense | weights vs dense |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    peer_of = {"float32": "llama.cpp f32", "bfloat16": "llama.cpp bf16"}
    chosen = [r for r in reports if r["threads"] == threads]
    for report in sorted(
        chosen, key=lambda r: (r["dtype"] != "float32", r["label"] != "dense", r["label"])
    ):
        row = next(row for row in rows_of(report) if row["batch"] == 1)
        peer = next(
            (d for d in decode_rows(report) if d["path"].startswith("auto") and d["batch"] == 1),
            None,
        )
        versus_peer = _ratio((peer or {}).get("vs_peers", {}).get(peer_of.get(row["dtype"], "")))
        lines.append(
            f"| {row['label']} | {row['dtype']} | {row['auto_ms']:.1f} "
            f"| {row['decode_speedup']:.2f}x | {versus_peer} | {_ratio(row['ceiling'])} "
            f"| {row['prefill_speedup']:.2f}x | {row['memory_ratio']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def summarise(out: Path) -> Path:
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    reports = [r for r in reports if "label" in r]
    path = out / "results.md"
    path.write_text(markdown(reports))
    if any(r.get("peers") or "static_decode" in r or "fused_decode" in r for r in reports):
        (out / "decode.md").write_text(decode_markdown(reports))
    if reports:
        (out / "summary.md").write_text(summary_markdown(reports))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True, help="LABEL=FOLDER")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--threads", default=str(torch.get_num_threads()))
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--decode-modes", default="auto")
    parser.add_argument("--llamacpp", default="", help="GGUF precisions, e.g. f32,bf16,q8_0")
    parser.add_argument(
        "--backends",
        default="dense,auto",
        help="torch backends (bitmask: every pruned layer packed, as `load` serves the fused step)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    backends = tuple(args.backends.split(","))
    settings = BenchSettings(
        repeats=args.repeats,
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
        decode_modes=tuple(args.decode_modes.split(",")),
        llamacpp=tuple(p for p in args.llamacpp.split(",") if p),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for threads in (int(t) for t in args.threads.split(",")):
        for dtype in args.dtypes.split(","):
            for spec in args.checkpoint:
                label, folder = spec.split("=", 1)
                run_one(label, Path(folder), dtype, threads, settings, args.out, backends)
                print(f"table: {summarise(args.out)}", flush=True)


if __name__ == "__main__":
    main()
