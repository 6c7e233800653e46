"""The ``sdsprune`` command line: a thin layer over the public Python API."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sdsprune.cli_flags import flag_presets, method_from_flags, with_method_flags
from sdsprune.data import DEFAULT_CALIB, DEFAULT_CALIB_SEED, DEFAULT_CALIB_SEQLEN, DEFAULT_NSAMPLES
from sdsprune.errors import SdspruneError
from sdsprune.evaluate.bigbench import DEFAULT_PROMPT_STYLE
from sdsprune.evaluate.zeroshot import DEFAULT_SEED as DEFAULT_TASK_SEED
from sdsprune.methods import OWL, SDS, SparseGPT, format_method, method_choices, parse_settings

app = typer.Typer(
    name="sdsprune",
    help="Prune Hugging Face causal LMs in one shot (magnitude, Wanda, SparseGPT) and improve "
    "them with the Sparse-Dense-Sparse (SDS) method.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Prune causal LMs in one shot and improve them with SDS (run a command with --help)."""


ModelArg = Annotated[
    str,
    typer.Argument(
        help="Bundled alias (smollm2-135m, gemma3-270m), local Hugging Face folder, .gguf file "
        "or hub id."
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
DtypeOpt = Annotated[
    str, typer.Option(help="auto (float32 on CPU, bfloat16 on GPU), float32, float16, bfloat16.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
CalibOpt = Annotated[
    str, typer.Option(help="Calibration corpus (wiki, news, c4, wikitext2, ptb, file).")
]
NsamplesOpt = Annotated[int, typer.Option(help="Calibration windows.")]
CalibSeqlenOpt = Annotated[int, typer.Option(help="Tokens per calibration window.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the calibration sampling.")]
TaskSeedOpt = Annotated[int, typer.Option(help="Seed of the bigbench --limit subset.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing --out folder.")]
EvalSeqlenOpt = Annotated[
    int | None, typer.Option(help="Evaluation chunk length (default: --seqlen).")
]
PromptStyleOpt = Annotated[
    str,
    typer.Option(
        help="bigbench: prompts: cloze (answers not listed, as the harness scores base models) "
        "or bigbench (BIG-bench's own format, choices listed in the prompt)."
    ),
]
MaxChunksOpt = Annotated[int | None, typer.Option(help="Evaluate only the first K chunks.")]


def _console() -> Console:
    """Rich lays tables out for 80 columns when stdout is not a terminal, which truncates
    task names in logs and CI output; a file or pipe has no width, so give it room."""
    return Console() if sys.stdout.isatty() else Console(width=160)


@app.command("eval")
def eval_command(
    model: ModelArg = "smollm2-135m",
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated corpora: wiki, news, wikitext2, ptb, c4, or .txt/.jsonl files "
            "(default: wiki, or none when --tasks is given)."
        ),
    ] = None,
    seqlen: Annotated[int, typer.Option(help="Tokens per evaluation chunk.")] = 2048,
    max_chunks: Annotated[
        int | None, typer.Option(help="Evaluate only the first K chunks (default: all).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Chunks (perplexity) or requests (tasks) per forward pass."),
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated zero-shot tasks: bigbench:NAME (offline; social_iqa, winowhy, "
            "goal_step_wikihow, cause_and_effect, ...) or lm-eval tasks (piqa, arc_easy, "
            "hellaswag, ...; these need the Hugging Face hub); suites: paper (the papers' 7 "
            "tasks, needs the hub), offline (bundled BIG-bench tasks)."
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(help="Score at most N examples per task (bigbench: a seeded random subset)."),
    ] = None,
    seed: TaskSeedOpt = DEFAULT_TASK_SEED,
    prompt_style: PromptStyleOpt = DEFAULT_PROMPT_STYLE,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Perplexity on corpora and/or zero-shot accuracy on tasks (lm-evaluation-harness)."""
    from sdsprune.api import check_counts, evaluate_model
    from sdsprune.evaluate.zeroshot import check_task_names, evaluate_tasks
    from sdsprune.models import load_model

    check_counts(max_chunks=max_chunks, batch_size=batch_size)
    task_list = _split_list(tasks) if tasks else []
    corpora = _split_list(dataset) if dataset else ([] if task_list else ["wiki"])
    check_task_names(task_list, prompt_style)
    loaded = load_model(model, device=device, dtype=dtype)
    report = None
    if corpora:
        report = evaluate_model(
            loaded, datasets=corpora, seqlen=seqlen, max_chunks=max_chunks, batch_size=batch_size
        )
    zeroshot = None
    if task_list:
        zeroshot = evaluate_tasks(
            loaded,
            task_list,
            limit=limit,
            seed=seed,
            prompt_style=prompt_style,
            batch_size=batch_size or 16,
        )
    if as_json:
        if zeroshot is None:
            print(json.dumps(report if len(report["results"]) != 1 else _flatten(report)))
        else:
            combined = {**zeroshot, "perplexity": report["results"] if report else []}
            print(json.dumps(combined))
        return
    if report is not None:
        _print_perplexity_table(report, model)
    if zeroshot is not None:
        _print_task_table(zeroshot, model)


def _print_perplexity_table(report: dict, model: str) -> None:
    table = Table(title=f"perplexity of {model}")
    for column in ("dataset", "perplexity", "chunks", "seqlen", "tokens", "seconds"):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for row in report["results"]:
        table.add_row(
            row["dataset"],
            f"{row['perplexity']:.3f}",
            str(row["chunks"]),
            str(row["seqlen"]),
            str(row["tokens"]),
            f"{row['seconds']:.1f}",
        )
    _console().print(table)


def _print_task_table(report: dict, model: str) -> None:
    """Accuracies with their standard errors next to the blind baselines, so that "above
    chance" is visible and a constant answer on an unbalanced task is not mistaken for skill."""
    table = Table(title=f"zero-shot accuracy of {model}")
    table.add_column("task", overflow="fold")  # in a narrow terminal: wrapped, never cut
    for column in ("acc", "acc_norm", "chance", "majority", "examples", "seconds"):
        table.add_column(column, justify="right")
    for row in report["tasks"]:
        table.add_row(
            row["task"],
            _percent(row["acc"], row["acc_stderr"]),
            _percent(row["acc_norm"], row["acc_norm_stderr"]),
            _percent(row["chance"]),
            _percent(row["majority"]),
            f"{row['examples']}/{row['total']}",
            f"{row['seconds']:.1f}",
        )
    _console().print(table)
    seconds = sum(row["seconds"] for row in report["tasks"] if not row["subtasks"])
    limit = f", at most {report['limit']} examples per task (seed {report['seed']})"
    _console().print(
        f"{len(report['tasks'])} task(s) in {seconds:.0f} s{limit if report['limit'] else ''}, "
        f"{report['prompt_style']} prompts; accuracies in %, ± one standard error; chance: "
        "uniform random guess, majority: always the most frequent correct answer"
    )


def _percent(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return ""
    return f"{100 * value:.1f}" + ("" if stderr is None else f" ± {100 * stderr:.1f}")


@app.command("prune")
@with_method_flags()
def prune_command(
    model: ModelArg = "smollm2-135m",
    method: Annotated[
        str,
        typer.Option(
            help=f"{method_choices()}; options in brackets, e.g. 'dsnot\\[initial=sparsegpt]', "
            "'sds\\[schedule=staged]:wanda' (the flags below set the same options)."
        ),
    ] = format_method(SparseGPT()),
    sparsity: Annotated[
        str, typer.Option(help="Fraction of zeros (0.5) or N:M, N zeros of every M inputs (2:4).")
    ] = "0.5",
    calib: CalibOpt = DEFAULT_CALIB,
    nsamples: NsamplesOpt = DEFAULT_NSAMPLES,
    seqlen: CalibSeqlenOpt = DEFAULT_CALIB_SEQLEN,
    seed: SeedOpt = DEFAULT_CALIB_SEED,
    out: Annotated[
        str | None, typer.Option(help="Save the pruned checkpoint and report into this folder.")
    ] = None,
    overwrite: OverwriteOpt = False,
    eval_dataset: Annotated[
        str | None, typer.Option("--eval", help="Evaluate perplexity afterwards on these corpora.")
    ] = None,
    eval_seqlen: EvalSeqlenOpt = None,
    max_chunks: MaxChunksOpt = None,
    low_memory: Annotated[
        bool,
        typer.Option(
            help="Keep only one block's weights in memory: read each block from the "
            "safetensors checkpoint when its turn comes, write it to --out, drop it."
        ),
    ] = False,
    state_dir: Annotated[
        str | None,
        typer.Option(help="Save the run's state here after every block (for --resume)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run from its --state-dir.")
    ] = False,
    error_report: Annotated[
        bool,
        typer.Option(
            help="Measure each layer's relative output error for the report (Wanda and "
            "magnitude: about 20% of their prune time; free for SparseGPT and SDS)."
        ),
    ] = True,
    offload_activations: Annotated[
        str,
        typer.Option(
            help="Keep the calibration activations in CPU memory, one batch at a time on the "
            "GPU: auto (when the memory plan says the GPU would not hold them), on, off."
        ),
    ] = "auto",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
    **method_settings,
) -> None:
    """Prune a model in one shot (magnitude, Wanda, SparseGPT, ADMM, DSnoT, Pruner-Zero) or
    with SDS.

    Under torchrun (torchrun --nproc-per-node K -m sdsprune prune ...) the calibration
    windows are split across the K processes; rank 0 saves and prints.
    """
    from sdsprune.options import Calibration, RunOptions
    from sdsprune.prune import prune

    run = RunOptions(
        device=device,
        dtype=dtype,
        out=out,
        overwrite=overwrite,
        evaluate=tuple(_split_list(eval_dataset)) if eval_dataset else (),
        eval_seqlen=eval_seqlen,
        max_chunks=max_chunks,
        low_memory=low_memory,
        state_dir=state_dir,
        resume=resume,
        measure_errors=error_report,
        offload_activations=offload_activations,
    )
    result = prune(
        model,
        method_from_flags(method, method_settings),
        sparsity=sparsity,
        calibration=Calibration(corpus=calib, nsamples=nsamples, seqlen=seqlen, seed=seed),
        run=run,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun only rank 0 reports
    report = {k: v for k, v in result.report.items() if not k.startswith("_")}
    if as_json:
        print(json.dumps({key: report[key] for key in report if key != "layers"}))
        return
    _print_prune_summary(report, result.out)


def _print_prune_summary(report: dict, out) -> None:
    config, summary = report["config"], report["summary"]
    label = config["method"] + (f" (base {config['base']})" if config.get("base") else "")
    table = Table(title=f"{config['model']}: {label} at {config['sparsity']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("layers pruned", str(summary["pruned_layers"]))
    table.add_row("sparsity of pruned layers", f"{summary['sparsity']:.4f}")
    if summary["mean_rel_error"] is not None:
        table.add_row("mean relative output error", f"{summary['mean_rel_error']:.4f}")
    if "owl" in report:  # every block's value is in the JSON report
        values = [block["sparsity"] for block in report["owl"]["blocks"]]
        table.add_row("OWL block sparsities", f"{min(values):.3f} .. {max(values):.3f}")
    for stage, value in report.get("sds", {}).get("stage_mean_rel_error", {}).items():
        table.add_row(f"  after {stage.replace('_', ' ')}", f"{value:.4f}")
    for result in report.get("evaluation", []):
        table.add_row(
            f"perplexity {result['dataset']} ({result['chunks']}x{result['seqlen']})",
            f"{result['perplexity']:.3f}",
        )
    table.add_row("prune time (s)", f"{report['timings']['prune_total']:.1f}")
    table.add_row("peak RSS (MiB)", f"{report['memory']['peak_rss_mib']:.0f}")
    if out is not None:
        table.add_row("saved to", str(out))
    _console().print(table)


@app.command("compare")
@with_method_flags((OWL,), switch=False)
def compare_command(
    model: ModelArg = "smollm2-135m",
    methods: Annotated[
        str,
        typer.Option(
            help=f"Comma-separated: dense, {method_choices()} (sds = sds:sparsegpt); a +owl "
            "suffix adds OWL rows (e.g. sparsegpt+owl, sds:sparsegpt+owl; unstructured "
            "sparsities only); options in brackets separated by ';' as in prune's --method."
        ),
    ] = "dense,wanda,sparsegpt,sds:wanda,sds:sparsegpt",
    sparsity: Annotated[
        str, typer.Option(help="Comma-separated sparsities: fractions (0.5) or N:M (2:4).")
    ] = "2:4,0.5",
    calib: CalibOpt = DEFAULT_CALIB,
    nsamples: NsamplesOpt = DEFAULT_NSAMPLES,
    seqlen: CalibSeqlenOpt = DEFAULT_CALIB_SEQLEN,
    seed: SeedOpt = DEFAULT_CALIB_SEED,
    dataset: Annotated[
        str, typer.Option(help="Comma-separated evaluation corpora (none: empty string).")
    ] = "wiki",
    eval_seqlen: EvalSeqlenOpt = None,
    max_chunks: MaxChunksOpt = None,
    tasks: Annotated[
        str | None, typer.Option(help="Comma-separated zero-shot tasks, as in `sdsprune eval`.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most N examples per task.")] = None,
    task_seed: TaskSeedOpt = DEFAULT_TASK_SEED,
    prompt_style: PromptStyleOpt = DEFAULT_PROMPT_STYLE,
    sds: Annotated[
        str | None,
        typer.Option(
            help="SDS settings for every sds:<base> run, as key=value pairs named like prune's "
            "options: e.g. 'schedule=staged,solver=fista,lambda1=0.1,adjust_iters=100'."
        ),
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            help="Accuracy shown in the table and plots: acc_norm (per-byte log-likelihood, "
            "fair to long answers) or acc. Both are stored; changing it recomputes nothing."
        ),
    ] = "acc_norm",
    out: Annotated[
        str | None,
        typer.Option(
            help="Results folder; finished runs in it are reused (default: runs/compare-MODEL)."
        ),
    ] = None,
    keep_models: Annotated[
        bool,
        typer.Option(
            help="Keep each pruned model in the folder (compact sparse checkpoint), so later "
            "runs with other tasks, corpora or evaluation settings prune nothing."
        ),
    ] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
    **method_settings,
) -> None:
    """Compare dense and pruning methods at several sparsities (resumable; table and plots).

    Every method prunes the same calibration windows; the folder gets results.json,
    results.md (a paper-style table) and PNG plots. Finished runs in it are not recomputed.
    """
    from sdsprune.compare import compare, default_out

    folder = out or str(default_out(model))
    owl_settings = flag_presets(method_settings, (OWL,)).get(OWL.name, {})
    results = compare(
        model,
        methods=_split_list(methods),
        sparsities=_split_list(sparsity),
        calib=calib,
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        datasets=[d for d in dataset.split(",") if d.strip()],
        tasks=_split_list(tasks) if tasks else [],
        eval_seqlen=eval_seqlen,
        max_chunks=max_chunks,
        limit=limit,
        task_seed=task_seed,
        prompt_style=prompt_style,
        metric=metric,
        sds=SDS(**parse_settings(SDS, sds)) if sds else None,
        owl=OWL(**owl_settings),
        keep_models=keep_models,
        out=folder,
        device=device,
        dtype=dtype,
    )
    if as_json:
        print(json.dumps(results))
        return
    _print_compare_table(results, folder)


def _print_compare_table(results: dict, folder: str) -> None:
    from sdsprune.compare import mean_accuracy, shown_metric

    settings = results["settings"]
    table = Table(title=f"comparison of {settings['model']} ({folder})")
    columns = ["method", "sparsity", *(f"{d} ppl" for d in settings["datasets"])]
    metric = shown_metric(settings)
    columns += [f"mean {metric} %"] if settings["tasks"] else []
    for column in [*columns, "prune s"]:
        table.add_column(column, justify="left" if column in ("method", "sparsity") else "right")
    for run in results["runs"]:
        cells = [run["label"], run["run"]["sparsity"] or "-"]
        cells += [f"{run['perplexity'][d]:.2f}" for d in settings["datasets"]]
        if settings["tasks"]:
            mean = mean_accuracy(run, metric)
            cells.append("-" if mean is None else f"{100 * mean:.1f}")
        seconds = run["seconds"]["prune"]
        table.add_row(*cells, "-" if seconds is None else f"{seconds:.0f}")
    _console().print(table)
    _console().print(f"wrote {folder}/results.json, results.md and plots (PNG)")


@app.command("export")
def export_command(
    source: Annotated[str, typer.Argument(help="Saved model folder (dense or sparse).")],
    out: Annotated[str, typer.Option(help="Folder to write.")],
    format: Annotated[
        str, typer.Option("--format", help="sparse (compact: values + bitmask or N:M) or dense.")
    ] = "sparse",
    dtype: Annotated[
        str, typer.Option(help="keep, float16, bfloat16 or float32 for the exported tensors.")
    ] = "keep",
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a checkpoint in the compact sparse format, or back to a plain dense one."""
    from sdsprune.export import export_checkpoint

    report = export_checkpoint(source, out, format=format, dtype=dtype, overwrite=overwrite)
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title=f"export {source} -> {out} ({format}, dtype {report['dtype']})")
    table.add_column("what")
    table.add_column("value", justify="right")
    if format == "sparse":
        patterns = ", ".join(f"{k} x{v}" for k, v in report["patterns"].items()) or "none"
        table.add_row(
            "pruned tensors", f"{report['pruned_tensors']} of {report['prunable_tensors']}"
        )
        table.add_row("patterns", patterns)
        if report["pruned_ratio"] is not None:
            table.add_row("pruned layers vs dense (same dtype)", f"{report['pruned_ratio']:.4f}x")
        table.add_row("all tensors vs dense (same dtype)", f"{report['total_ratio']:.4f}x")
    table.add_row("weights file", f"{report['weights_file_bytes'] / 2**20:.1f} MiB")
    table.add_row("vs source weights file", f"{report['file_ratio_to_source']:.4f}x")
    _console().print(table)


@app.command("bench")
def bench_command(
    model_dir: Annotated[str, typer.Argument(help="Saved model folder (dense or sparse).")],
    backends: Annotated[
        str | None,
        typer.Option(
            help=(
                "Comma-separated: dense, nm24, csr, bsr, semi-structured, auto "
                "(default: all usable here)."
            )
        ),
    ] = None,
    repeats: Annotated[int, typer.Option(help="Measured repeats (medians are reported).")] = 5,
    warmup: Annotated[int, typer.Option(help="Unmeasured warm-up rounds.")] = 1,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length for prefill.")] = 128,
    decode_tokens: Annotated[int, typer.Option(help="Tokens decoded per measurement.")] = 16,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8",
    decode: Annotated[
        str,
        typer.Option(
            help="Comma-separated decode modes: auto (what sdsprune.load gives: fused where "
            "it can serve the model, else eager), eager (dynamic KV cache), fused (pre-allocated "
            "KV cache and the step as one C++ loop over the blocks; Llama, Mistral, Qwen2 on "
            "CPU), static (pre-allocated KV cache and a torch.compile'd step; compiling takes "
            "minutes per backend). Backends are compared with dense in the same mode."
        ),
    ] = "auto",
    llamacpp: Annotated[
        str,
        typer.Option(
            help="Comma-separated GGUF precisions (f32, bf16, q8_0): also time the checkpoint "
            "in llama.cpp, on the same token ids and threads (batch 1; needs the llamacpp extra)."
        ),
    ] = "",
    threads: Annotated[
        int | None, typer.Option(help="torch CPU threads (default: torch's).")
    ] = None,
    out: Annotated[
        str | None, typer.Option(help="Also write the JSON report to this file.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Prefill throughput and decode latency: dense versus each sparse backend, one run."""
    import torch

    from sdsprune.api import check_counts
    from sdsprune.bench import BenchSettings, render_notes, render_table, run_bench, write_json
    from sdsprune.ownership import check_output_file

    check_counts(threads=threads)
    if out is not None:  # before the minutes of measuring, not at the end
        check_output_file(out, overwrite=overwrite, protected={"the model": model_dir})
    if threads is not None:
        torch.set_num_threads(threads)
    settings = BenchSettings(
        repeats=repeats,
        warmup=warmup,
        prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens,
        batch_sizes=tuple(_split_ints(batch_sizes)),
        decode_modes=tuple(_split_list(decode)),
        llamacpp=tuple(_split_list(llamacpp)) if llamacpp else (),
    )
    report = run_bench(
        model_dir,
        backends=_split_list(backends) if backends else None,
        device=device,
        dtype=dtype,
        settings=settings,
        progress=lambda message: console.print(f"[dim]{message}[/]", highlight=False),
    )
    if out is not None:
        write_json(report, out, overwrite=overwrite)
    if as_json:
        print(json.dumps(report))
        return
    # Redirected to a file, rich would squeeze the table into 80 columns.
    out_console = Console(width=None if sys.stdout.isatty() else 140)
    out_console.print(render_table(report))
    for line in render_notes(report):
        out_console.print(line, highlight=False)


def _split_ints(value: str) -> list[int]:
    try:
        return [int(item) for item in _split_list(value)]
    except ValueError as exc:
        raise SdspruneError(f"expected comma-separated integers, got '{value}'") from exc


def _flatten(report: dict) -> dict:
    """With one corpus, put its numbers at the top level for easy scripting."""
    flat = {key: value for key, value in report.items() if key != "results"}
    flat.update(report["results"][0])
    return flat


def _split_list(value: str) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise SdspruneError("expected a non-empty comma-separated list")
    return items


def _quiet_dependencies() -> None:
    """Keep the terminal for our own progress bars and messages."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


INTERRUPTED = (
    "[bold red]interrupted[/] (no output folder was written; a run with --state-dir "
    "continues with --resume)"
)
_terminated: list[int] = []  # set by SIGTERM, which then unwinds like Ctrl-C


def _terminate(signum, frame) -> None:
    """SIGTERM (a scheduler's stop, ``kill``): clean up exactly as for Ctrl-C."""
    _terminated.append(signum)
    raise KeyboardInterrupt


def _interrupted_exit() -> None:
    console.print(INTERRUPTED)
    sys.exit(143 if _terminated else 130)


def main() -> None:
    """Entry point: one clear line and a non-zero exit for every user error."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        logging.getLogger("sdsprune").setLevel(os.environ.get("SDSPRUNE_LOG", "INFO").upper())
    except ValueError:
        console.print("[bold red]error:[/] SDSPRUNE_LOG must be debug, info, warning or error")
        sys.exit(2)
    _quiet_dependencies()
    _terminated.clear()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except SdspruneError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted_exit()
    except SystemExit as exc:
        if exc.code == 130:  # typer turns Ctrl-C into a silent exit 130: say what happened
            _interrupted_exit()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
