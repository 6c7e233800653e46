"""The ``sdsprune`` command line: a thin layer over the public Python API."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sdsprune.errors import SdspruneError

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


@app.command("eval")
def eval_command(
    model: ModelArg = "smollm2-135m",
    dataset: Annotated[
        str,
        typer.Option(
            help="Comma-separated corpora: wiki, wikitext2, ptb, c4, or .txt/.jsonl files."
        ),
    ] = "wiki",
    seqlen: Annotated[int, typer.Option(help="Tokens per evaluation chunk.")] = 2048,
    max_chunks: Annotated[
        int | None, typer.Option(help="Evaluate only the first K chunks (default: all).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Chunks per forward pass (default: by memory).")
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Perplexity of a model on one or more corpora (reference protocol)."""
    from sdsprune.api import evaluate_model

    report = evaluate_model(
        model,
        datasets=_split_list(dataset),
        seqlen=seqlen,
        max_chunks=max_chunks,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
    )
    if as_json:
        print(json.dumps(report if len(report["results"]) != 1 else _flatten(report)))
        return
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
    Console().print(table)


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


def main() -> None:
    """Entry point: one clear line and a non-zero exit for every user error."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("sdsprune").setLevel(os.environ.get("SDSPRUNE_LOG", "INFO"))
    _quiet_dependencies()
    try:
        app()
    except SdspruneError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/] (nothing was written)")
        sys.exit(130)


if __name__ == "__main__":
    main()
