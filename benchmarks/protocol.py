"""Run pruning configurations under a named protocol, one subprocess each, and tabulate.

Each configuration runs in its own process so that its peak memory is its own; finished
rows are kept in the results file and skipped on a rerun (delete the file to start over).

    python benchmarks/protocol.py --suite pruners --out benchmarks/results/pruners.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# name: (calibration windows, window tokens, evaluation chunks of 1024 tokens)
#   cpu-small: the project's CPU protocol (protocol.md); cpu-tiny: quicker, ablations only;
#   paper: 128 x 2048 calibration, every evaluation chunk.
PROTOCOL_SIZES = {"cpu-small": (64, 512, 40), "cpu-tiny": (32, 256, 20), "paper": (128, 2048, None)}


def eval_args(protocol: str) -> list[str]:
    """Perplexity options: wiki eval split, 1024-token chunks (2048 for ``paper``), fp32."""
    _, _, chunks = PROTOCOL_SIZES[protocol]
    if chunks is None:
        return ["--seqlen", "2048"]
    return ["--seqlen", "1024", "--max-chunks", str(chunks), "--dtype", "float32"]


def prune_args(protocol: str, corpora: str = "wiki") -> list[str]:
    nsamples, seqlen, _ = PROTOCOL_SIZES[protocol]
    evaluation = eval_args(protocol)
    evaluation[0] = "--eval-seqlen"
    calibration = ["--nsamples", str(nsamples), "--seqlen", str(seqlen), "--seed", "0"]
    return ["--calib", "wiki", *calibration, "--eval", corpora, *evaluation]


def suite(name: str) -> list[tuple[str, list[str]]]:
    """Rows of (label, extra CLI arguments); ``None`` arguments mean the dense model."""
    rows: list[tuple[str, list[str] | None]] = [("dense", None)]
    if name == "pruners":
        for sparsity in ("0.5", "2:4"):
            for method in ("magnitude", "wanda", "sparsegpt"):
                rows.append((f"{method} {sparsity}", ["--method", method, "--sparsity", sparsity]))
    elif name in ("sds", "all"):
        for sparsity in ("2:4", "0.5"):
            for base in ("sparsegpt", "wanda"):
                sds = ["--method", "sds", "--base", base, "--sparsity", sparsity]
                rows.append((f"{base} {sparsity}", ["--method", base, "--sparsity", sparsity]))
                rows.append((f"sds-{base} {sparsity}", sds))
        if name == "all":
            for sparsity in ("0.5", "2:4"):
                rows.append(
                    (f"magnitude {sparsity}", ["--method", "magnitude", "--sparsity", sparsity])
                )
    elif name == "ablation":
        sds = ["--method", "sds", "--base", "sparsegpt", "--sparsity", "2:4"]
        rows += [
            ("sparsegpt 2:4", ["--method", "sparsegpt", "--sparsity", "2:4"]),
            ("sds (default)", sds),
            ("- residual-sparsity start (re-dense from dense)", [*sds, "--no-residual-start"]),
            ("- proximity (mu 0, closed form = dense)", [*sds, "--mu", "0"]),
            ("data mode dd", [*sds, "--data-mode", "dd"]),
            ("data mode kd", [*sds, "--data-mode", "kd"]),
            (
                "+ L1/L2 0.1 (fista)",
                [
                    *sds,
                    "--solver",
                    "fista",
                    "--lambda1",
                    "0.1",
                    "--lambda2",
                    "0.1",
                    "--redense-iters",
                    "50",
                ],
            ),
            (
                "paper recipe (gd 200 x lr 0.1, gd adjust)",
                [
                    *sds,
                    "--solver",
                    "gd",
                    "--lambda1",
                    "0.1",
                    "--lambda2",
                    "0.1",
                    "--mu",
                    "0",
                    "--adjust-solver",
                    "gd",
                    "--adjust-iters",
                    "200",
                    "--block-epochs",
                    "0",
                ],
            ),
            ("- adjustment", [*sds, "--adjust", "never"]),
            ("- re-dense (adjust only)", [*sds, "--mu", "1e9"]),
            ("staged schedule", [*sds, "--schedule", "staged"]),
        ]
    elif name == "beyond":  # issue 11: each option on top of the paper-parity SDS
        paper = [
            "--method",
            "sds",
            "--base",
            "sparsegpt",
            "--sparsity",
            "2:4",
            "--block-epochs",
            "0",
        ]
        rows += [
            ("sparsegpt 2:4", ["--method", "sparsegpt", "--sparsity", "2:4"]),
            ("sds, layer-wise only (paper parity)", paper),
            ("+ exact group pattern search (1 sweep)", [*paper, "--group-sweeps", "1"]),
            ("+ kd adjustment (dense-input targets)", [*paper, "--adjust-data", "kd"]),
            *(
                (f"+ block re-fit, {epochs} epoch(s)", [*paper, "--block-epochs", str(epochs)])
                for epochs in (1, 2, 3)
            ),
        ]
    else:
        raise SystemExit(f"unknown suite {name}")
    return rows


def run_row(model: str, protocol: str, args: list[str] | None, corpora: str = "wiki") -> dict:
    if args is None:
        cmd = [
            sys.executable,
            "-m",
            "sdsprune",
            "eval",
            model,
            "--dataset",
            corpora,
            *eval_args(protocol),
            "--json",
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "sdsprune",
            "prune",
            model,
            *prune_args(protocol, corpora),
            *args,
            "--json",
        ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    report["command"] = " ".join(cmd[2:])
    return report


def summarise(label: str, report: dict) -> dict:
    if "evaluation" in report:
        ppl = report["evaluation"][0]["perplexity"]
        return {
            "label": label,
            "perplexity": round(ppl, 2),
            "others": {r["dataset"]: round(r["perplexity"], 2) for r in report["evaluation"][1:]},
            "prune_s": report["timings"]["prune_total"],
            "peak_rss_mib": report["memory"]["peak_rss_mib"],
            "mean_rel_error": report["summary"]["mean_rel_error"],
        }
    results = report.get("results", [report])
    return {
        "label": label,
        "perplexity": round(results[0]["perplexity"], 2),
        "others": {r["dataset"]: round(r["perplexity"], 2) for r in results[1:]},
        "prune_s": None,
        "peak_rss_mib": None,
        "mean_rel_error": None,
    }


def print_table(rows: list[dict]) -> None:
    others = sorted({name for row in rows for name in row["others"]})
    extra_head = "".join(f" {name + ' PPL':>10} |" for name in others)
    print(
        f"| {'configuration':<50} | {'PPL':>8} |{extra_head} {'prune s':>8} | {'peak RSS MiB':>12} | {'rel err':>8} |"
    )
    print(
        f"|{'-' * 52}|{'-' * 10}|{'-' * 12 * len(others)}{'|' if others else ''}{'-' * 10}|{'-' * 14}|{'-' * 10}|"
    )
    for row in rows:
        prune_s = f"{row['prune_s']:.1f}" if row["prune_s"] is not None else "-"
        rss = f"{row['peak_rss_mib']:.0f}" if row["peak_rss_mib"] is not None else "-"
        err = f"{row['mean_rel_error']:.4f}" if row["mean_rel_error"] is not None else "-"
        extra = "".join(f" {row['others'].get(name, float('nan')):>10.2f} |" for name in others)
        print(
            f"| {row['label']:<50} | {row['perplexity']:>8.2f} |{extra} {prune_s:>8} | {rss:>12} | {err:>8} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--suite", default="pruners", choices=["pruners", "sds", "ablation", "all", "beyond"]
    )
    parser.add_argument("--corpora", default="wiki", help="evaluation corpora (first: main)")
    parser.add_argument("--protocol", default="cpu-small", choices=list(PROTOCOL_SIZES))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", help="comma-separated labels to run (default: all)")
    args = parser.parse_args()
    done = json.loads(args.out.read_text()) if args.out.exists() else {}
    only = set(args.only.split(",")) if args.only else None
    for label, extra in suite(args.suite):
        if label in done or (only and label not in only):
            continue
        print(f"running {label} ...", file=sys.stderr, flush=True)
        done[label] = run_row(args.model, args.protocol, extra, args.corpora)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(done, indent=1))
    print_table([summarise(label, done[label]) for label, _ in suite(args.suite) if label in done])


if __name__ == "__main__":
    main()
