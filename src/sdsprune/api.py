"""High-level functions behind the CLI commands, usable from a notebook."""

from __future__ import annotations

from sdsprune.data import load_corpus
from sdsprune.evaluate.perplexity import evaluate_corpora
from sdsprune.models import LoadedModel, load_model
from sdsprune.runinfo import library_versions


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
