"""Perplexity exactly as the SparseGPT/Wanda reference code computes it."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sdsprune.data.corpora import Corpus, tokenize
from sdsprune.errors import SdspruneError

# Logits of one batch are batch x seqlen x vocab floats; keep them near this many bytes
# (measured on 2 CPU cores: batches beyond ~512 MB of logits get slower, not faster).
_LOGIT_BUDGET_BYTES = 1 << 29


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # tokens evaluated: chunks x seqlen, as the reference counts them
    chunks: int
    seqlen: int
    dataset: str
    # Mean NLL of each chunk, in order: what a paired comparison of two models resamples.
    chunk_nll: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def eval_chunks(ids: torch.Tensor, seqlen: int, max_chunks: int | None) -> torch.Tensor:
    """Cut a token stream into non-overlapping ``seqlen`` chunks; the remainder is dropped."""
    count = ids.numel() // seqlen
    if count == 0:
        raise SdspruneError(
            f"the evaluation text has {ids.numel()} tokens, fewer than one chunk of {seqlen}"
        )
    if max_chunks is not None:
        count = min(count, max_chunks)
    return ids[: count * seqlen].view(count, seqlen)


def check_seqlen(model: nn.Module, seqlen: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if seqlen < 2:
        raise SdspruneError(f"seqlen must be at least 2 (got {seqlen})")
    if limit is not None and seqlen > limit:
        raise SdspruneError(
            f"seqlen {seqlen} exceeds the model's maximum context of {limit} tokens"
        )


def needs_bos_per_window(model: nn.Module) -> bool:
    """Gemma models produce garbage without a BOS token at the start of every sequence."""
    return str(getattr(model.config, "model_type", "")).startswith("gemma")


def with_bos(windows: torch.Tensor, model: nn.Module, tokenizer) -> torch.Tensor:
    """Put BOS first in each window for models that need it (the window keeps its length)."""
    if not needs_bos_per_window(model) or tokenizer.bos_token_id is None:
        return windows
    windows = windows.clone()
    windows[:, 0] = tokenizer.bos_token_id
    return windows


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    corpus: Corpus,
    *,
    seqlen: int = 2048,
    max_chunks: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``corpus`` (reference protocol).

    The stream is tokenized once and cut into ``tokens // seqlen`` chunks; each chunk's
    mean NLL is weighted equally, so PPL = exp(mean of chunk mean-NLLs). Chunks are batched,
    which does not change the result because they are independent.
    """
    check_seqlen(model, seqlen)
    cap = corpus.eval_chunk_cap
    limit = min(x for x in (max_chunks, cap) if x is not None) if (max_chunks or cap) else None
    chunks = with_bos(
        eval_chunks(tokenize(tokenizer, corpus.text), seqlen, limit), model, tokenizer
    )
    return perplexity_of_chunks(
        model, chunks, corpus.name, batch_size=batch_size, progress=progress
    )


def evaluate_corpora(
    model: nn.Module,
    tokenizer,
    corpora: list[Corpus],
    *,
    seqlen: int,
    max_chunks: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Perplexity on each corpus, as dicts with the wall time each took (``seconds``)."""
    results = []
    for corpus in corpora:
        start = time.perf_counter()
        result = perplexity(
            model,
            tokenizer,
            corpus,
            seqlen=seqlen,
            max_chunks=max_chunks,
            batch_size=batch_size,
            progress=progress,
        )
        results.append({**result.to_dict(), "seconds": round(time.perf_counter() - start, 2)})
    return results


@torch.no_grad()
def perplexity_of_chunks(
    model: nn.Module,
    chunks: torch.Tensor,
    dataset: str = "custom",
    *,
    batch_size: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    count, seqlen = chunks.shape
    device = next(model.parameters()).device
    if batch_size is None:
        vocab = model.config.get_text_config().vocab_size
        batch_size = max(1, min(8, _LOGIT_BUDGET_BYTES // (seqlen * vocab * 4)))
    chunk_nll = []
    bar = tqdm(total=count, desc=f"perplexity {dataset}", unit="chunk", disable=not progress)
    for start in range(0, count, batch_size):
        batch = chunks[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        chunk_nll.append(_mean_nll_per_sequence(logits, batch))
        bar.update(batch.shape[0])
    bar.close()
    per_chunk = torch.cat(chunk_nll)
    nll = per_chunk.mean().item()
    if not math.isfinite(nll):
        raise SdspruneError("the model produced NaN/Inf logits during evaluation")
    return PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=count * seqlen,
        chunks=count,
        seqlen=seqlen,
        dataset=dataset,
        chunk_nll=per_chunk.double().tolist(),
    )


def _mean_nll_per_sequence(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # Flattened (tokens x vocab) rows: cross_entropy over a transposed (B, V, L) view is
    # several times slower on CPU, and this loss was a fifth of the evaluation time.
    batch, length, vocab = logits.shape
    shift_logits = logits[:, :-1].reshape(-1, vocab).float()
    nll = F.cross_entropy(shift_logits, ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(batch, length - 1).mean(dim=1).cpu()
