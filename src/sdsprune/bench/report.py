"""What a benchmark reports: one summary row per backend, workload, decode mode and batch
(medians, speedups against dense and verdicts), the JSON file, and the table and notes the
command prints."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from sdsprune.bench.peers import PEER_PREFIX, PeerContender
from sdsprune.ownership import write_file_atomic
from sdsprune.stats import rank_test_p

MIN_SAMPLES_FOR_VERDICT = 4
VERDICT_LEVEL = 2 / 70  # complete separation of 4 samples against 4, by chance


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    if len(ordered) >= 2:
        p25, _, p75 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        p25 = p75 = ordered[0]
    return {
        "median": statistics.median(ordered),
        "p25": p25,
        "p75": p75,
        "min": ordered[0],
        "max": ordered[-1],
    }


def _verdict(backend: list[float], dense: list[float]) -> str:
    """ "faster"/"slower" when a two-sided Mann-Whitney rank test tells the samples apart at
    level VERDICT_LEVEL, else "no clear difference", whatever the medians say.

    The level is that of complete separation of 4 samples against 4 (2/70), the rule this
    replaces: "every sample of one beats every sample of the other" has a level that falls
    with the repeats (2/252 at 5, 2e-8 at 15), so more repeats made a real difference harder
    to see (at 15 repeats, one slow sample in either set hid a 1.4x decode speedup).
    """
    if min(len(backend), len(dense)) < MIN_SAMPLES_FOR_VERDICT:
        return "too few repeats"
    if rank_test_p(backend, dense) > VERDICT_LEVEL:
        return "no clear difference"
    return "faster" if statistics.median(backend) < statistics.median(dense) else "slower"


def summarise(contenders: list, prompt_tokens: int) -> list[dict]:
    """One row per contender (torch backend, dense first, or llama.cpp peer), workload,
    decode mode and batch; speedups against this run's dense samples of the same workload
    and mode only. Static decode rows also compare with the same backend's eager decode: for
    dense, that is the overhead cut alone."""
    dense = contenders[0]
    peer = next((c for c in contenders if c.name.startswith(PEER_PREFIX)), None)
    rows = []
    for contender in contenders:
        for key, samples in contender.samples.items():
            workload, mode, batch = key
            stats, base = _stats(samples), _stats(dense.samples[key])
            row = {
                "backend": contender.name,
                "workload": workload,
                "mode": mode,
                "batch": batch,
                "seconds": {k: round(v, 6) for k, v in stats.items()},
                "samples": [round(s, 6) for s in samples],
                "speedup_vs_dense": round(base["median"] / stats["median"], 3),
                "verdict": (
                    "baseline" if contender is dense else _verdict(samples, dense.samples[key])
                ),
                **_rates(workload, batch * prompt_tokens, stats),
            }
            eager = contender.samples.get(("decode", "eager", batch))
            if mode != "eager" and eager and not isinstance(contender, PeerContender):
                row["speedup_vs_eager"] = round(statistics.median(eager) / stats["median"], 3)
                row["verdict_vs_eager"] = _verdict(samples, eager)
            if peer is not None and key in peer.samples:
                row["speedup_vs_peer"] = round(
                    statistics.median(peer.samples[key]) / stats["median"], 3
                )
                row["peer"] = peer.name
            if getattr(contender, "peak_cuda_mib", None) is not None:
                row["peak_cuda_mib"] = round(contender.peak_cuda_mib, 1)
            rows.append(row)
    return rows


def _rates(workload: str, prefill_tokens: int, stats: dict) -> dict:
    """Human units: prefill tokens per second, decode milliseconds per token (with IQR)."""
    if workload == "prefill":
        rate = [prefill_tokens / stats[k] for k in ("median", "p75", "p25")]
        return {
            "unit": "tokens/s",
            "value": round(rate[0], 1),
            "iqr": [round(rate[1], 1), round(rate[2], 1)],
        }
    ms = [stats[k] * 1e3 for k in ("median", "p25", "p75")]
    return {"unit": "ms/token", "value": round(ms[0], 3), "iqr": [round(ms[1], 3), round(ms[2], 3)]}


def write_json(report: dict, path: str | Path, *, overwrite: bool = True) -> Path:
    """Write the report atomically (a temporary file moved into place); without
    ``overwrite`` an existing file is left as it is and the write is refused."""
    return write_file_atomic(path, json.dumps(report, indent=1) + "\n", overwrite=overwrite)


def workload_label(row: dict) -> str:
    """ "prefill", or "decode" with its mode ("decode static"); rows of reports written
    before decode modes existed are eager."""
    if row["workload"] == "prefill":
        return "prefill"
    return f"decode {row.get('mode', 'eager')}"


def render_table(report: dict):
    """A rich table of the report: one row per backend, workload (and decode mode), batch.

    "vs dense" compares with dense in the same mode; with static decoding a "vs eager"
    column compares each backend's static with its eager decoding (dense's: the overhead cut).
    """
    from rich.table import Table

    settings = report["settings"]
    title = (
        f"{Path(report['model']).name}: {report['device']} {report['dtype']}, "
        f"{report['threads']} threads, prompt {settings['prompt_tokens']} tokens, "
        f"decode {settings['decode_tokens']} tokens, {settings['repeats']} repeats (medians)"
    )
    table = Table(title=title)
    versus_eager = any("speedup_vs_eager" in row for row in report["results"])
    peer = next((row["peer"] for row in report["results"] if "peer" in row), None)
    columns = ["backend", "kernels", "workload", "batch", "median", "IQR", "vs dense", "verdict"]
    columns += (["vs eager"] if versus_eager else []) + ([f"vs {peer}"] if peer else [])
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("backend", "kernels", "workload") else "right"
        )
    for row in report["results"]:
        kernels = {**report["backends"], **report.get("peers", {})}[row["backend"]]["kernels"]
        low, high = row["iqr"]
        cells = [
            row["backend"],
            ", ".join(f"{k} {v}" for k, v in kernels.items()),
            workload_label(row),
            str(row["batch"]),
            f"{row['value']:.1f} {row['unit']}"
            if row["unit"] == "tokens/s"
            else f"{row['value']:.2f} {row['unit']}",
            f"{low:.1f}-{high:.1f}" if row["unit"] == "tokens/s" else f"{low:.2f}-{high:.2f}",
            f"{row['speedup_vs_dense']:.2f}x",
            row["verdict"],
        ]
        if versus_eager:  # its verdict is in the JSON, and dense's in the notes
            cells.append(f"{row['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in row else "")
        if peer:
            cells.append(f"{row['speedup_vs_peer']:.2f}x" if "speedup_vs_peer" in row else "")
        table.add_row(*cells)
    return table


def render_notes(report: dict) -> list[str]:
    """Lines that belong under the table: skipped backends, memory, output agreement."""
    notes = [f"skipped {name}: {why}" for name, why in report["skipped"].items()]
    notes += _static_notes(report)
    fused = report.get("fused_decode", {}).get("skipped", {})
    notes += [f"fused decode skipped for {k}: {v}" for k, v in fused.items()]
    for name, info in report["backends"].items():
        static = "".join(
            f", {mode} vs eager decode: max |logit diff| {check['max_abs_logit_diff']}, "
            + ("same greedy tokens" if check["same_greedy_tokens"] else "greedy tokens DIFFER")
            for mode in ("static", "fused")
            if (check := info.get(f"{mode}_vs_eager"))
        )
        greedy = info.get("same_greedy_tokens_as_dense")
        agreement = (
            ""
            if greedy is None
            else (", same greedy tokens" if greedy else ", greedy tokens DIFFER")
        )
        notes.append(
            f"{name}: weights {info['weights_mib']} MiB (block linears "
            f"{info.get('linear_weights_mib', '?')} MiB), load {info['load_seconds']} s, "
            f"max |logit - dense| {info['max_abs_logit_diff_vs_dense']} (prompt), "
            f"{info.get('max_abs_decode_logit_diff_vs_dense', '?')} (decode)"
            f"{agreement}{static}"
        )
        for kernel, by_tokens in info.get("layer_speedups", {}).items():
            probes = ", ".join(
                f"{ratio}x at {tokens} tokens" for tokens, ratio in by_tokens.items()
            )
            notes.append(f"  {name}: per-layer {kernel} vs dense (median over layers): {probes}")
    for name, info in report["backends"].items():
        if name != "dense" and set(info["kernels"]) == {"dense"}:
            notes.append(
                f"{name} runs dense everywhere: its 'vs dense' column is this run's noise floor"
            )
    notes += _peer_notes(report.get("peers", {}))
    notes += _ceiling_notes(report.get("ceiling"))
    notes += _streaming_notes(report.get("streaming"))
    memory = ", ".join(f"{k} {v}" for k, v in report["memory"].items())
    notes.append(f"process peak memory (all backends together): {memory}")
    return notes


def _peer_notes(peers: dict) -> list[str]:
    return [
        f"{name}: GGUF {info['gguf_mib']} MiB, written and loaded in {info['load_seconds']} s, "
        + (
            "same greedy tokens as dense"
            if info["same_greedy_tokens_as_dense"]
            else "greedy tokens differ from dense torch's"
        )
        for name, info in peers.items()
    ]


def _streaming_notes(streaming: dict | None) -> list[str]:
    if not streaming:
        return []
    floors = ", ".join(
        f"{name} {mib} MiB -> {streaming['floor_ms_per_token'][name]} ms"
        for name, mib in streaming["decode_weights_mib"].items()
    )
    notes = [
        f"weights a batch-1 decode step reads, and the time to read them at "
        f"{streaming['bandwidth_gib_s']} GiB/s (streaming kernel, this run): {floors}"
    ]
    ratios = ", ".join(f"{name} {x:.2f}x" for name, x in streaming.get("bytes_ratio", {}).items())
    if ratios:
        notes.append(
            f"  dense's bytes over each backend's (the ceiling of a step that only reads weights): {ratios}"
        )
    return notes


def _ceiling_notes(ceiling: dict | None) -> list[str]:
    """The bytes ceiling of each backend's eager decode speedup (see :func:`bytes_ceilings`)."""
    if not ceiling:
        return []
    shares = ", ".join(f"{share:.0%} at batch {b}" for b, share in ceiling["linear_share"].items())
    notes = [f"block linears' share of a dense eager decode step: {shares}"]
    for name, by_batch in ceiling["speedup"].items():
        bounds = ", ".join(f"{x:.2f}x at batch {b}" for b, x in by_batch.items())
        notes.append(f"  {name}: bytes ceiling of the decode speedup {bounds}")
    return notes


def _static_notes(report: dict) -> list[str]:
    """How static decoding ran (compiled or why not, what was skipped) and dense's
    static/eager ratio: the per-token overhead cut alone, apart from any sparse speedup."""
    static = report.get("static_decode")
    if static is None:
        return []
    notes = []
    if static["fallback"]:
        notes.append(
            f"static decode: torch.compile failed ({static['fallback']}); every backend "
            "decoded with the static KV cache uncompiled"
        )
    elif static["compile_seconds"]:
        seconds = ", ".join(f"{k} {v} s" for k, v in static["compile_seconds"].items())
        notes.append(
            f"static decode: static KV cache + torch.compile ({static['compile_backend']}), "
            f"compiled in {seconds}"
        )
    notes += [f"static decode skipped for {k}: {v}" for k, v in static["skipped"].items()]
    cuts = [
        f"{row['speedup_vs_eager']:.2f}x at batch {row['batch']} ({row['verdict_vs_eager']})"
        for row in report["results"]
        if row["backend"] == "dense" and "speedup_vs_eager" in row
    ]
    if cuts:
        notes.append(
            f"dense static vs eager decode (the overhead cut alone): {', '.join(cuts)}; "
            "'vs dense' compares backends within one mode"
        )
    return notes
