"""Faster log-likelihood scoring for the harness: each shared context runs once.

lm-evaluation-harness scores a multiple-choice example as one request per choice, each
``context + choice`` run through the model from scratch, and takes a log-softmax over the whole
vocabulary at *every* position of the batch. For a small model on a CPU that is most of the
cost: the same context runs once per choice (7 times on intent_recognition), and a 49k-word
vocabulary makes the logits of the context positions (thrown away) as expensive as the model.

:class:`PrefixSharingLM` keeps the harness's interface and results, and scores instead each
distinct context once, keeping its attention cache and the logits of its last position only,
then all of its continuations together on top of that cache. Requests too long for the model
(which the harness truncates from the left) go through the harness's own code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdsprune.utils import cache_keyword, cache_of


def prefix_sharing_lm_class():
    """The harness model class (built lazily: lm-eval is an optional dependency)."""
    from lm_eval.models.huggingface import HFLM

    class PrefixSharingLM(HFLM):
        """``HFLM`` whose log-likelihood requests sharing a context reuse its computation."""

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            if self.backend != "causal":
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            results: list[tuple[float, bool] | None] = [None] * len(requests)
            groups: dict[tuple[int, ...], list[int]] = {}
            too_long = []
            for index, (_, context, continuation) in enumerate(requests):
                if len(context) + len(continuation) > self.max_length + 1:
                    too_long.append(index)
                else:
                    groups.setdefault(tuple(context), []).append(index)
            if too_long:
                scored = super()._loglikelihood_tokens(
                    [requests[i] for i in too_long], disable_tqdm, override_bs
                )
                for index, score in zip(too_long, scored, strict=True):
                    results[index] = score
            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(requests) - len(too_long),
                disable=disable_tqdm or self.rank != 0,
                desc="Running loglikelihood requests",
            )
            # Longest first, as the harness does: memory problems show at once.
            for context, members in sorted(groups.items(), key=lambda item: -len(item[0])):
                scores = score_continuations(
                    self.model, list(context), [requests[i][2] for i in members], self.device
                )
                for index, score in zip(members, scores, strict=True):
                    results[index] = score
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], score)
                bar.update(len(members))
            bar.close()
            return results

    return PrefixSharingLM


@torch.no_grad()
def score_continuations(
    model, context: list[int], continuations: list[list[int]], device
) -> list[tuple[float, bool]]:
    """For each continuation: (sum of its token log-probabilities after ``context``, whether
    each of its tokens is the greedy choice) — what the harness's loglikelihood returns.

    The context runs once (logits of its last position only: they predict each continuation's
    first token); the continuations minus their last token then run as one right-padded batch
    on the context's cache. Right padding needs no mask: a causal model never looks ahead.
    """
    first = model(torch.tensor([context], device=device), use_cache=True, logits_to_keep=1)
    first_logprobs = F.log_softmax(first.logits[0, -1].float(), dim=-1)
    longest = max(len(c) for c in continuations)
    rest_logprobs = None
    if longest > 1:
        cache = cache_of(first)
        cache.batch_repeat_interleave(len(continuations))
        batch = torch.zeros(len(continuations), longest - 1, dtype=torch.long, device=device)
        for row, continuation in enumerate(continuations):
            batch[row, : len(continuation) - 1] = torch.tensor(continuation[:-1])
        logits = model(batch, use_cache=False, **{cache_keyword(model): cache}).logits
        rest_logprobs = F.log_softmax(logits.float(), dim=-1)
    scores = []
    for row, continuation in enumerate(continuations):
        target = torch.tensor(continuation, device=device)
        steps = first_logprobs[None]
        if len(continuation) > 1:
            steps = torch.cat([steps, rest_logprobs[row, : len(continuation) - 1]])
        total = steps.gather(1, target[:, None]).sum().item()
        greedy = bool((steps.argmax(dim=-1) == target).all())
        scores.append((total, greedy))
    return scores
