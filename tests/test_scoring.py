"""Prefix-shared scoring gives the harness's own log-likelihoods, faster."""

from __future__ import annotations

import pytest
from conftest import byte_tokenizer, tiny_model

pytest.importorskip("lm_eval")


def _requests(contexts, continuations):
    return [
        ((f"c{i}", f"x{j}"), context, continuation)
        for i, context in enumerate(contexts)
        for j, continuation in enumerate(continuations)
    ]


@pytest.mark.parametrize("arch", ["llama", "opt", "gemma3_text"])
def test_prefix_sharing_matches_the_harness(arch):
    from lm_eval.models.huggingface import HFLM

    from sdsprune.evaluate.scoring import prefix_sharing_lm_class

    model, tokenizer = tiny_model(arch, seed=1), byte_tokenizer()
    contexts = [list(range(5, 25)), [7, 3, 9], list(range(40, 52))]  # 20, 3 and 12 tokens
    continuations = [[11], [12, 13, 14], [15, 16], [200, 3, 4, 5, 6, 7]]
    requests = _requests(contexts, continuations)
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu")
    fast = prefix_sharing_lm_class()(
        pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu"
    )
    expected = harness._loglikelihood_tokens(requests, disable_tqdm=True)
    got = fast._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in expected]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in expected], abs=1e-4)


def test_requests_longer_than_the_model_go_through_the_harness(monkeypatch):
    from sdsprune.evaluate import scoring

    model, tokenizer = tiny_model("llama"), byte_tokenizer()
    fast = scoring.prefix_sharing_lm_class()(
        pretrained=model, tokenizer=tokenizer, batch_size=2, device="cpu", max_length=16
    )
    shared = []
    real = scoring.score_continuations
    monkeypatch.setattr(
        scoring,
        "score_continuations",
        lambda *args: shared.append(args[2]) or real(*args),
    )
    requests = _requests([list(range(5, 25)), [1, 2, 3]], [[7], [8, 9]])
    scores = fast._loglikelihood_tokens(requests, disable_tqdm=True)
    assert len(scores) == 4 and all(score is not None for score in scores)
    assert shared == [[[7], [8, 9]]]  # only the short context was shared; the long one truncated
