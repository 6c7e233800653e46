"""Deployment benchmark: compact export sizes and dense-vs-sparse inference speed.

For each pruned checkpoint folder (any pruner; only the zeros matter):

1. export it in the sparse format at each dtype (keep, float16, bfloat16), check that the
   weights come back bit-identical (``sdsprune.load``) and that the re-densified export loads
   with ``from_pretrained`` to the same weights, and record the size ratios;
2. run ``sdsprune bench`` on the float32 sparse export (dense, csr, bsr, auto on CPU).

Writes ``OUT/results.json`` and ``OUT/results.md``. Example (about 15 minutes on 2 cores)::

    python benchmarks/bench_inference.py --pruned 50%=/tmp/pruned-50 \\
        --pruned 2:4=/tmp/pruned-24 --out runs/deploy --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from sdsprune.bench import BenchSettings, run_bench, workload_label, write_json
from sdsprune.export import export_checkpoint, load_state_dict

DTYPES = ("keep", "float16", "bfloat16")


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Every tensor of ``a`` present in ``b`` with identical dtype, shape and bits."""
    for name, tensor in a.items():
        other = b.get(name)
        if other is None or other.dtype != tensor.dtype or other.shape != tensor.shape:
            return False
        if tensor.is_floating_point():
            ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
            tensor, other = tensor.contiguous().view(ints), other.contiguous().view(ints)
        if not torch.equal(tensor, other):
            return False
    return True


def export_and_verify(label: str, source: Path, out: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM

    import sdsprune

    rows = []
    for dtype in DTYPES:
        target = out / f"{label.replace(':', 'of').replace('%', '')}-{dtype}"
        start = time.perf_counter()
        report = export_checkpoint(source, target, format="sparse", dtype=dtype, overwrite=True)
        report["export_seconds"] = round(time.perf_counter() - start, 1)
        expected = load_state_dict(source, None if dtype == "keep" else getattr(torch, dtype))
        report["load_bit_identical"] = same_bits(expected, sdsprune.load(target).model.state_dict())
        dense = target.with_name(target.name + "-dense")
        export_checkpoint(target, dense, format="dense", overwrite=True)
        model = AutoModelForCausalLM.from_pretrained(dense, dtype="auto")
        report["from_pretrained_bit_identical"] = same_bits(expected, model.state_dict())
        del model
        shutil.rmtree(dense)
        rows.append({"label": label, **report})
        print(json.dumps({k: report[k] for k in ("dtype", "pruned_ratio", "total_ratio")}))
    return rows


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} x{count}" for name, count in counts.items()) or "none"


def markdown(sizes: list[dict], benches: dict[str, dict]) -> str:
    lines = [
        "## Export sizes (sparse format vs the dense checkpoint in the same dtype)",
        "",
        "| checkpoint | dtype | patterns | pruned layers | all tensors | file vs fp32 source | "
        "round trip |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sizes:
        ok = row["load_bit_identical"] and row["from_pretrained_bit_identical"]
        lines.append(
            f"| {row['label']} | {row['dtype']} | {_counts(row['patterns'])} | {row['pruned_ratio']:.4f}x | "
            f"{row['total_ratio']:.4f}x | {row['file_ratio_to_source']:.4f}x | "
            f"{'bit-identical' if ok else 'MISMATCH'} |"
        )
    for label, report in benches.items():
        s = report["settings"]
        lines += [
            "",
            f"## Inference, {label} ({report['device']}, {report['dtype']}, "
            f"{report['threads']} threads, prompt {s['prompt_tokens']}, decode "
            f"{s['decode_tokens']} tokens, {s['repeats']} repeats, medians)",
            "",
            "| backend | kernels | workload | batch | median | IQR | vs dense | verdict | vs eager |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in report["results"]:
            kernels = report["backends"][row["backend"]]["kernels"]
            kernels = ", ".join(f"{name} {count}" for name, count in kernels.items())
            low, high = row["iqr"]
            versus_eager = (
                f"{row['speedup_vs_eager']:.2f}x ({row['verdict_vs_eager']})"
                if "speedup_vs_eager" in row
                else ""
            )
            lines.append(
                f"| {row['backend']} | {kernels} | {workload_label(row)} | {row['batch']} | "
                f"{row['value']} {row['unit']} | {low}-{high} | {row['speedup_vs_dense']:.2f}x | "
                f"{row['verdict']} | {versus_eager} |"
            )
        for name, why in report["skipped"].items():
            lines.append(f"\nskipped {name}: {why}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruned", action="append", default=[], help="LABEL=FOLDER")
    parser.add_argument("--out", default="runs/deploy")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--decode", default="eager", help="decode modes: eager, static or both")
    parser.add_argument("--skip-export", action="store_true")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--render", help="only rewrite the markdown of this results.json")
    args = parser.parse_args()
    if args.render:
        results = json.loads(Path(args.render).read_text())
        md = Path(args.render).with_suffix(".md")
        md.write_text(markdown(results["sizes"], results["bench"]))
        print(md.read_text())
        return
    if args.threads:
        # On a shared, oversubscribed machine one thread is far steadier: with two, every
        # parallel region waits whenever the other thread is descheduled.
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = BenchSettings(
        repeats=args.repeats,
        prompt_tokens=args.prompt_tokens,
        decode_tokens=args.decode_tokens,
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
        decode_modes=tuple(args.decode.split(",")),
    )
    sizes, benches = [], {}
    for item in args.pruned:
        label, folder = item.split("=", 1)
        if not args.skip_export:
            sizes += export_and_verify(label, Path(folder), out)
        target = out / f"{label.replace(':', 'of').replace('%', '')}-keep"
        benches[label] = run_bench(
            target if target.exists() else folder, settings=settings, progress=print
        )
        write_json({"sizes": sizes, "bench": benches}, out / "results.json")
    (out / "results.md").write_text(markdown(sizes, benches))
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
