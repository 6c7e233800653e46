"""Faster log-likelihood scoring for the harness: each shared context runs once.

lm-evaluation-harness scores a multiple-choice example as one request per choice, each
``context + choice`` run through the model from scratch, and takes a log-softmax over the whole
vocabulary at *every* position of the batch. For a small model on a CPU that is most of the
cost: the same context runs once per choice (7 times on intent_recognition), and a 49k-word
vocabulary makes the logits of the context positions (thrown away) as expensive as the model.

:class:`PrefixSharingLM` keeps the harness's interface and results, and scores instead each
distinct context once, keeping its attention cache and the logits of its last position only,
then all of its continuations together on top of that cache; contexts of similar length are
batched together, so that the weights are read once for many of them. Requests too long for
the model (which the harness truncates from the left) go through the harness's own code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdsprune.utils import cache_keyword, cache_of

# Log-probabilities of one batch of continuations are rows x tokens x vocab floats; keep them
# near this many bytes (as perplexity batches do).
_LOGIT_BUDGET_BYTES = 1 << 29


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
            vocab = self.model.config.get_text_config().vocab_size
            batch_size = override_bs or (
                self.batch_size if isinstance(self.batch_size, int) else 16
            )
            for batch in _batches(groups, requests, batch_size, vocab):
                scores = score_groups(
                    self.model,
                    [
                        (list(context), [requests[i][2] for i in members])
                        for context, members in batch
                    ],
                    self.device,
                )
                for (_, members), group_scores in zip(batch, scores, strict=True):
                    for index, score in zip(members, group_scores, strict=True):
                        results[index] = score
                        self.cache_hook.add_partial("loglikelihood", requests[index][0], score)
                    bar.update(len(members))
            bar.close()
            return results

    return PrefixSharingLM


def _batches(groups: dict, requests, contexts_per_batch: int, vocab: int):
    """Groups in batches of similar context length (longest first, as the harness orders them,
    so memory problems show at once): at most ``contexts_per_batch`` contexts, and log-probs
    of the continuations within the byte budget."""
    batch: list = []
    rows = longest = 0
    for context, members in sorted(groups.items(), key=lambda item: -len(item[0])):
        conts = [requests[i][2] for i in members]
        new_rows, new_longest = rows + len(conts), max(longest, *(len(c) for c in conts))
        too_big = new_rows * new_longest * vocab * 4 > _LOGIT_BUDGET_BYTES
        if batch and (len(batch) == contexts_per_batch or too_big):
            yield batch
            batch, new_rows, new_longest = [], len(conts), max(len(c) for c in conts)
        batch.append((context, members))
        rows, longest = new_rows, new_longest
    if batch:
        yield batch


@torch.no_grad()
def score_groups(
    model, groups: list[tuple[list[int], list[list[int]]]], device
) -> list[list[tuple[float, bool]]]:
    """For each (context, continuations) group, for each continuation: (sum of its token
    log-probabilities after the context, whether each of its tokens is the greedy choice), as
    the harness's loglikelihood returns them.

    The contexts run once, as one left-padded batch (so that they all end at the last
    position, the only one whose logits are computed: it predicts each continuation's first
    token). Every continuation minus its last token then runs on a copy of its context's
    cache, all of them in one right-padded batch; right padding needs no mask, since a
    causal model never looks ahead. Position ids follow the unpadded sequences, so the
    results equal the harness's up to floating-point rounding.
    """
    lengths = torch.tensor([len(context) for context, _ in groups], device=device)
    width = int(lengths.max())
    ids = torch.zeros(len(groups), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(groups), width, dtype=torch.long, device=device)
    for row, (context, _) in enumerate(groups):
        ids[row, width - len(context) :] = torch.tensor(context, device=device)
        mask[row, width - len(context) :] = 1
    out = model(
        ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
    )
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # groups x vocab
    owners = [g for g, (_, conts) in enumerate(groups) for _ in conts]
    continuations = [cont for _, conts in groups for cont in conts]
    rest = _continuation_logprobs(model, out, mask, lengths, owners, continuations, device)
    scores: list[list[tuple[float, bool]]] = [[] for _ in groups]
    for row, (owner, continuation) in enumerate(zip(owners, continuations, strict=True)):
        target = torch.tensor(continuation, device=device)
        steps = first[owner][None]
        if len(continuation) > 1:
            steps = torch.cat([steps, rest[row, : len(continuation) - 1]])
        total = steps.gather(1, target[:, None]).sum().item()
        scores[owner].append((total, bool((steps.argmax(dim=-1) == target).all())))
    return scores


def _continuation_logprobs(model, out, mask, lengths, owners, continuations, device):
    """Log-probabilities after each continuation's tokens but its last, on its context's
    cache (None when every continuation is one token long)."""
    longest = max(len(c) for c in continuations)
    if longest == 1:
        return None
    index = torch.tensor(owners, device=device)
    cache = cache_of(out)
    cache.batch_select_indices(index)
    batch = torch.zeros(len(continuations), longest - 1, dtype=torch.long, device=device)
    for row, continuation in enumerate(continuations):
        batch[row, : len(continuation) - 1] = torch.tensor(continuation[:-1], device=device)
    steps = torch.arange(longest - 1, device=device)
    logits = model(
        batch,
        attention_mask=torch.cat([mask[index], torch.ones_like(batch)], dim=1),
        position_ids=lengths[index, None] + steps,
        use_cache=False,
        **{cache_keyword(model): cache},
    ).logits
    return F.log_softmax(logits.float(), dim=-1)
