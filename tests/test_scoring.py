"""Prefix-shared scoring gives the harness's own log-likelihoods, faster."""

from __future__ import annotations

import pytest
from conftest import byte_tokenizer, tiny_model

pytest.importorskip("lm_eval")

CONTEXTS = [list(range(5, 25)), [7, 3, 9], list(range(40, 52)), [9], list(range(60, 90))]
CONTINUATIONS = [[11], [12, 13, 14], [15, 16], [200, 3, 4, 5, 6, 7]]


def _requests(contexts, continuations):
    """Every context with every continuation, except that the second context gets two (groups
    of different sizes in one batch)."""
    return [
        ((f"c{i}", f"x{j}"), context, continuation)
        for i, context in enumerate(contexts)
        for j, continuation in enumerate(continuations)
        if i != 1 or j < 2
    ]


def _models(arch: str, batch_size: int, **kwargs):
    from lm_eval.models.huggingface import HFLM

    from sdsprune.evaluate.scoring import prefix_sharing_lm_class

    model, tokenizer = tiny_model(arch, seed=1), byte_tokenizer()
    options = dict(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
    return HFLM(**options, **kwargs), prefix_sharing_lm_class()(**options, **kwargs)


@pytest.mark.parametrize("arch", ["llama", "opt", "gemma3_text"])
@pytest.mark.parametrize("batch_size", [2, 16])
def test_prefix_sharing_matches_the_harness(arch, batch_size):
    harness, fast = _models(arch, batch_size)
    requests = _requests(CONTEXTS, CONTINUATIONS)
    expected = harness._loglikelihood_tokens(requests, disable_tqdm=True)
    got = fast._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in expected]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in expected], abs=1e-4)


def test_batches_respect_the_context_count_and_the_logit_budget(monkeypatch):
    from sdsprune.evaluate import scoring

    groups = {tuple(range(n)): [n] for n in (3, 9, 5, 7)}
    requests = {n: (None, None, [1] * n) for n in (3, 9, 5, 7)}  # continuation of n tokens
    batches = list(scoring._batches(groups, requests, 3, vocab=10))
    assert [[len(c) for c, _ in batch] for batch in batches] == [[9, 7, 5], [3]]
    monkeypatch.setattr(scoring, "_LOGIT_BUDGET_BYTES", 2 * 9 * 10 * 4)  # two rows of 9 tokens
    batches = list(scoring._batches(groups, requests, 3, vocab=10))
    assert [[len(c) for c, _ in batch] for batch in batches] == [[9, 7], [5, 3]]


def test_requests_longer_than_the_model_go_through_the_harness(monkeypatch):
    from sdsprune.evaluate import scoring

    harness, fast = _models("llama", 2, max_length=16)
    shared = []
    real = scoring.score_groups
    monkeypatch.setattr(
        scoring,
        "score_groups",
        lambda model, groups, device: shared.append(groups) or real(model, groups, device),
    )
    requests = _requests([list(range(5, 25)), [1, 2, 3]], [[7], [8, 9]])
    scores = fast._loglikelihood_tokens(requests, disable_tqdm=True)
    expected = harness._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [s for s, _ in scores] == pytest.approx([s for s, _ in expected], abs=1e-4)
    assert shared == [[([1, 2, 3], [[7], [8, 9]])]]  # the long context was left to the harness
