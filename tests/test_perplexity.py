import math

import pytest
import torch
from conftest import tiny_model

from sdsprune import SdspruneError, load_corpus, perplexity
from sdsprune.evaluate import perplexity_of_chunks


def hand_perplexity(model, chunks):
    """exp of the mean, over chunks, of each chunk's mean token NLL, one token at a time."""
    chunk_means = hand_chunk_nll(model, chunks)
    return math.exp(sum(chunk_means) / len(chunk_means))


def hand_chunk_nll(model, chunks) -> list[float]:
    chunk_means = []
    for chunk in chunks:
        logits = model(input_ids=chunk[None]).logits[0]
        nlls = [
            -torch.log_softmax(logits[t], dim=-1)[chunk[t + 1]].item()
            for t in range(len(chunk) - 1)
        ]
        chunk_means.append(sum(nlls) / len(nlls))
    return chunk_means


@torch.no_grad()
def test_perplexity_matches_hand_computation():
    model = tiny_model("llama")
    chunks = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    result = perplexity_of_chunks(model, chunks, progress=False, batch_size=2)
    assert result.perplexity == pytest.approx(hand_perplexity(model, chunks), rel=1e-5)
    assert (result.chunks, result.seqlen, result.tokens) == (3, 16, 48)
    # Each chunk's mean NLL is kept, in order, for paired comparisons of two models.
    assert result.chunk_nll == pytest.approx(hand_chunk_nll(model, chunks), rel=1e-5)


@torch.no_grad()
def test_batching_does_not_change_the_result():
    model = tiny_model("opt")
    chunks = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(1))
    one = perplexity_of_chunks(model, chunks, batch_size=1, progress=False).perplexity
    many = perplexity_of_chunks(model, chunks, batch_size=4, progress=False).perplexity
    assert one == pytest.approx(many, rel=1e-5)


def test_corpus_is_cut_into_whole_chunks(tokenizer, tmp_path):
    path = tmp_path / "e.txt"
    path.write_text("abcdefghij" * 10)  # 100 byte tokens -> 3 chunks of 32
    model = tiny_model("llama")
    result = perplexity(model, tokenizer, load_corpus(str(path)), seqlen=32, progress=False)
    assert result.chunks == 3 and result.tokens == 96
    capped = perplexity(
        model, tokenizer, load_corpus(str(path)), seqlen=32, max_chunks=2, progress=False
    )
    assert capped.chunks == 2


def test_seqlen_limits(tokenizer, tmp_path):
    path = tmp_path / "e.txt"
    path.write_text("short")
    model = tiny_model("llama")
    with pytest.raises(SdspruneError, match="maximum context"):
        perplexity(model, tokenizer, load_corpus(str(path)), seqlen=4096, progress=False)
    with pytest.raises(SdspruneError, match="fewer than one chunk"):
        perplexity(model, tokenizer, load_corpus(str(path)), seqlen=64, progress=False)
