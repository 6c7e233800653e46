"""High-level functions behind the CLI commands, usable from a notebook."""

from __future__ import annotations

from sdsprune.data import load_corpus
from sdsprune.errors import SdspruneError
from sdsprune.evaluate.perplexity import evaluate_corpora
from sdsprune.models import LoadedModel, load_model
from sdsprune.runinfo import library_versions


def check_counts(**counts: int | None) -> None:
    """Options that count something (chunks, batch size, threads) must be at least 1: 0 or
    a negative number would otherwise mean "all", an empty run or a crash inside torch."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise SdspruneError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")


def evaluate_model(
    model: str | LoadedModel,
    *,
    datasets: list[str] | tuple[str, ...] = ("wiki",),
    seqlen: int = 2048,
    max_chunks: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` (a spec or an already loaded model) on each corpus."""
    check_counts(max_chunks=max_chunks, batch_size=batch_size)
    corpora = [load_corpus(name, "eval") for name in datasets]  # fail fast on a bad name
    loaded = (
        model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
    )
    results = evaluate_corpora(
        loaded.model,
        loaded.tokenizer,
        corpora,
        seqlen=seqlen,
        max_chunks=max_chunks,
        batch_size=batch_size,
        progress=progress,
    )
    return {"model": loaded.spec, "results": results, "versions": library_versions()}
