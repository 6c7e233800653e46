"""The GPU check: the CUDA, bf16, offload and 2:4 paths, measured once on a real GPU.

Run by ``scripts/gpu_check.sh`` (which sets the machine up first); under 8 minutes on one
GPU. On the bundled default model (SmolLM2-135M) and corpus, with the same calibration
windows everywhere:

1. prune with SparseGPT and SDS(SparseGPT) at 2:4 on CUDA in bfloat16 and evaluate the
   perplexity; in parallel, a CPU process does the same in float32 (the reference);
2. SparseGPT 2:4 on CUDA in float32 too (isolates device from dtype differences), and once
   more in bf16 with the activations offloaded to CPU (must give identical weights);
3. export the SDS bf16 checkpoint in the sparse format, load it with the 2:4
   ``semi-structured`` backend and ``auto``, and print ``sdsprune bench``'s table;
4. report peak GPU memory of every step, and of every stage of each prune next to the
   stage's time, beside what the memory plan predicted.

Pass/fail, stated up front: every GPU perplexity within ``--tolerance`` (default 5%,
relative) of the CPU float32 one of the same method, in fp32 as in bf16 (a 2:4 SparseGPT's
perplexity moves with the order of float sums alone: 85.81 on two CPU threads, 86.66 on
one, 88.72 on the H200 in fp32, so a tighter fp32 bar flags rounding, not a defect),
offloaded weights bit-identical to resident ones, SDS better than SparseGPT on the GPU,
and a bench table that ran. Exit status 1 when a check fails; 0 with a one-line message on
a machine without a CUDA GPU; 3 with one line on stderr when ``nvidia-smi`` lists a GPU but
torch cannot use it (a CPU-only build of torch, the usual case: install a CUDA build with
``SDSPRUNE_TORCH_INDEX=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

MODEL = "smollm2-135m"
PATTERN = "2:4"
EXIT_TORCH_WITHOUT_CUDA = 3  # gpu_check.sh stops at once on it (no test run after it)
CUDA_INDEX_EXAMPLE = "https://download.pytorch.org/whl/cu128"


def nvidia_gpu_listed() -> bool:
    """Whether ``nvidia-smi -L`` lists a GPU: the machine has one, whatever torch says."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return False
    try:
        listed = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def torch_cannot_use_the_gpu() -> str:
    """One line: why torch cannot use the GPU ``nvidia-smi`` lists, and what to do about it.

    A check that printed "nothing to check" and exited 0 here passed on a GPU machine whose
    torch was a CPU build (what pip's configured index serves on the project's machines).
    """
    install = (
        f"SDSPRUNE_TORCH_INDEX={CUDA_INDEX_EXAMPLE} bash scripts/setup.sh "
        "(the cuXXX index your driver supports: nvidia-smi shows its CUDA version)"
    )
    if torch.version.cuda is None:
        return (
            f"gpu_check: nvidia-smi lists a GPU but torch {torch.__version__} has no CUDA "
            f"(a CPU-only build): install a CUDA build with {install}"
        )
    return (
        f"gpu_check: nvidia-smi lists a GPU but torch {torch.__version__} (CUDA "
        f"{torch.version.cuda}) cannot use it: check CUDA_VISIBLE_DEVICES and that the driver "
        f"supports CUDA {torch.version.cuda}, or install another build with {install}"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu-check", help="results folder")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--max-chunks", type=int, default=20)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument(
        "--cpu-reference",
        metavar="JSON",
        help="read the CPU float32 reference from this file (written by --write-cpu-reference "
        "on any machine with the same settings) instead of computing it beside the GPU run",
    )
    parser.add_argument(
        "--write-cpu-reference",
        metavar="JSON",
        help="only compute the CPU float32 reference and write it to this file",
    )
    args = parser.parse_args(argv)
    if args.cpu_reference and not Path(args.cpu_reference).is_file():
        parser.error(f"--cpu-reference {args.cpu_reference}: no such file")
    return args


def calibration(args) -> torch.Tensor:
    import sdsprune

    loaded = sdsprune.load_model(MODEL, device="cpu", dtype="float32")
    corpus = sdsprune.load_corpus("wiki", "calib")
    return sdsprune.sample_calibration(corpus, loaded.tokenizer, args.nsamples, args.seqlen, 0)


def run_method(args, windows, method, device, dtype, out: Path | None = None, **extra):
    """Prune (or only evaluate, for ``dense``) and return perplexity, time and memory
    (``extra``: more of the prune's ``RunOptions``)."""
    import sdsprune

    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    stages, peak = {}, None
    if method == "dense":  # no stage meter here: CUDA's own counter covers the whole step
        loaded = sdsprune.load_model(MODEL, device=device, dtype=dtype)
        report = sdsprune.evaluate_model(
            loaded, seqlen=args.eval_seqlen, max_chunks=args.max_chunks, progress=False
        )
        ppl, plan, weights = report["results"][0]["perplexity"], None, None
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if on_gpu else None
    else:
        options = sdsprune.RunOptions(
            device=device,
            dtype=dtype,
            out=out,
            overwrite=True,
            evaluate=("wiki",),
            eval_seqlen=args.eval_seqlen,
            max_chunks=args.max_chunks,
            progress=False,
            **extra,
        )
        result = sdsprune.prune(MODEL, method, sparsity=PATTERN, calibration=windows, run=options)
        ppl = result.report["evaluation"][0]["perplexity"]
        plan = result.report["plan"]["device_peak"] / 2**20
        weights = {k: v.detach().cpu() for k, v in result.model.model.state_dict().items()}
        stages = report_stages(result.report)
        peak = run_peak_mib(result.report)
    row = {
        "method": method,
        "device": device,
        "dtype": dtype,
        "perplexity": ppl,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_gpu_mib": None if peak is None else round(peak, 1),
        "planned_peak_mib": None if plan is None else round(plan, 1),
        "stages": stages,
    }
    print(f"gpu_check: {method} on {device} in {dtype}: {json.dumps(row)}", flush=True)
    return row, weights


def run_peak_mib(report: dict) -> float | None:
    """The prune's peak GPU memory: the largest stage peak the report's stage meter kept.

    Not CUDA's counter read after the run: every stage resets it on entry, so it holds only
    what came after the last stage began. Nor the report's process-wide ``peak_cuda_mib``:
    this script runs several prunes in one process, and that one keeps the largest of them.
    """
    peaks = [
        stage["peak_cuda_mib"]
        for stage in report["memory"]["stages"].values()
        if stage.get("peak_cuda_mib") is not None
    ]
    return max(peaks) if peaks else None


def report_stages(report: dict) -> dict[str, dict]:
    """Every stage time of the report, with that stage's peak GPU memory, what was already
    allocated when it began, and the plan's per-block device peak beside them (the GPU run
    is where the plan meets a GPU)."""
    peaks = report["memory"]["stages"]
    plan = round(report["plan"]["device_peak"] / 2**20, 1)
    return {
        name: {
            "seconds": seconds,
            "peak_gpu_mib": peaks.get(name, {}).get("peak_cuda_mib"),
            "at_entry_gpu_mib": peaks.get(name, {}).get("entry_cuda_mib"),
            "planned_peak_mib": plan,
        }
        for name, seconds in report["timings"].items()
    }


def cpu_reference(args) -> None:
    """The float32 CPU results, written as JSON (run as a separate process)."""
    windows = calibration(args)
    rows = [
        run_method(args, windows, method, "cpu", "float32")[0]
        for method in ("dense", "sparsegpt", "sds")
    ]
    Path(args.write_cpu_reference).write_text(json.dumps(rows, indent=2))


def start_cpu_reference(args, argv: list[str], out: Path) -> subprocess.Popen | None:
    """The CPU float32 reference, computed by a CPU process while the GPU works, unless
    ``--cpu-reference`` gives it (a GPU lease too short for both)."""
    if args.cpu_reference:
        return None
    return subprocess.Popen(
        [sys.executable, __file__, *argv, "--write-cpu-reference", str(out / "cpu.json")],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )


def finish_cpu_reference(args, reference: subprocess.Popen | None, out: Path) -> dict:
    """The reference rows by method; empty when its process failed."""
    if reference is not None and reference.wait() != 0:
        return {}
    source = Path(args.cpu_reference) if args.cpu_reference else out / "cpu.json"
    return {r["method"]: r for r in json.loads(source.read_text())}


def bench_semi_structured(folder: Path, out: Path) -> dict:
    """Export the 2:4 checkpoint sparse, then ``sdsprune bench`` dense / semi-structured / auto."""
    import sdsprune
    from sdsprune.bench import BenchSettings, render_table, run_bench
    from sdsprune.cli import _console

    sparse = out / "sds-bf16-sparse"
    sdsprune.export_checkpoint(folder, sparse, dtype="bfloat16", overwrite=True)
    report = run_bench(
        sparse,
        backends=["dense", "semi-structured", "auto"],
        device="cuda",
        dtype="bfloat16",
        settings=BenchSettings(repeats=5, batch_sizes=(1, 8), prompt_tokens=512),
    )
    _console().print(render_table(report))
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    kernels = report["backends"].get("semi-structured", {}).get("kernels")
    return kernels or report["skipped"].get("semi-structured", "not loaded")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.write_cpu_reference:
        cpu_reference(args)
        return 0
    if not torch.cuda.is_available():
        if nvidia_gpu_listed():  # a GPU is there but torch cannot use it: a failed check
            print(torch_cannot_use_the_gpu(), file=sys.stderr)
            return EXIT_TORCH_WITHOUT_CUDA
        print(
            f"gpu_check: no CUDA GPU visible to torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda or 'none'}): nothing to check here"
        )
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check on {torch.cuda.get_device_name()} (torch {torch.__version__})", flush=True)
    reference = start_cpu_reference(args, argv, out)
    windows = calibration(args)
    rows, checks = [], []
    rows.append(run_method(args, windows, "dense", "cuda", "bfloat16")[0])
    sgpt, sgpt_weights = run_method(
        args, windows, "sparsegpt", "cuda", "bfloat16", out / "sparsegpt-bf16"
    )
    sds, _ = run_method(args, windows, "sds", "cuda", "bfloat16", out / "sds-bf16")
    fp32, _ = run_method(args, windows, "sparsegpt", "cuda", "float32")
    offloaded, off_weights = run_method(
        args, windows, "sparsegpt", "cuda", "bfloat16", offload_activations="on"
    )
    offloaded["method"] = "sparsegpt (offloaded)"
    rows += [sgpt, sds, fp32, offloaded]
    same = all(torch.equal(sgpt_weights[k], off_weights[k]) for k in sgpt_weights)
    checks.append(("offloaded activations give bit-identical weights", same))
    checks.append(("SDS beats SparseGPT on the GPU", sds["perplexity"] < sgpt["perplexity"]))
    try:
        kernels = bench_semi_structured(out / "sds-bf16", out)
        loaded = isinstance(kernels, dict) and kernels.get("semi-structured", 0) > 0
        checks.append((f"2:4 semi-structured backend used ({kernels})", loaded))
    except Exception as exc:  # report, do not hide: the check fails with the reason
        checks.append((f"2:4 bench ran ({type(exc).__name__}: {exc})", False))
    cpu = finish_cpu_reference(args, reference, out)
    if not cpu:
        checks.append(("CPU float32 reference ran", False))
    for row in rows:
        base = cpu.get(row["method"].split(" ")[0])
        if base is None:
            continue
        row["vs_cpu_fp32"] = round(row["perplexity"] / base["perplexity"] - 1, 4)
        label = f"{row['method']} {row['dtype']} within {args.tolerance:.0%} of CPU fp32"
        checks.append((label, abs(row["vs_cpu_fp32"]) <= args.tolerance))
    print_summary(rows, list(cpu.values()), checks)
    summary = {"gpu": torch.cuda.get_device_name(), "rows": rows, "cpu": list(cpu.values())}
    summary["checks"] = [{"check": c, "passed": ok} for c, ok in checks]
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    return 0 if all(ok for _, ok in checks) else 1


def print_summary(rows: list[dict], cpu: list[dict], checks: list[tuple[str, bool]]) -> None:
    print(
        f"{'run':<24}{'device':<7}{'dtype':<10}{'PPL':>9}{'vs CPU':>9}{'s':>7}"
        f"{'peak MiB':>10}{'plan MiB':>10}"
    )
    for row in [*cpu, *rows]:
        vs = row.get("vs_cpu_fp32")
        print(
            f"{row['method']:<24}{row['device']:<7}{row['dtype']:<10}{row['perplexity']:>9.2f}"
            f"{'' if vs is None else f'{vs:+.1%}':>9}{row['seconds']:>7}"
            f"{row['peak_gpu_mib'] or '':>10}{row['planned_peak_mib'] or '':>10}"
        )
    print_stages([*cpu, *rows])
    for check, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {check}")


def print_stages(rows: list[dict]) -> None:
    """Each prune's stage times with the stage's peak GPU memory and the plan's figure."""
    for row in rows:
        if not row.get("stages"):
            continue
        print(f"stages of {row['method']} ({row['device']}, {row['dtype']}):")
        for name, stage in row["stages"].items():
            peak, plan = stage["peak_gpu_mib"], stage["planned_peak_mib"]
            entry = stage.get("at_entry_gpu_mib")
            print(
                f"  {name:<26}{stage['seconds']:>9.2f} s"
                f"{'' if peak is None else f'{peak:>10.1f} MiB':>14}"
                f"{'' if entry is None else f'  (at entry {entry:.1f})'}"
                f"{'' if peak is None else f'  (plan {plan:.1f} MiB)'}"
            )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
