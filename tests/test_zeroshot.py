"""Zero-shot scoring through lm-evaluation-harness, checked by hand on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import byte_tokenizer, tiny_model

from sdsprune.errors import SdspruneError
from sdsprune.evaluate import bigbench, zeroshot
from sdsprune.evaluate.zeroshot import evaluate_tasks
from sdsprune.models import LoadedModel

pytest.importorskip("lm_eval")

TASK = {
    "name": "toy",
    "examples": [
        {"input": f"Is {word} a fruit?", "target_scores": {"yes": int(fruit), "no": int(not fruit)}}
        for word, fruit in [
            ("apple", True),
            ("stone", False),
            ("pear", True),
            ("chair", False),
            ("plum", True),
            ("cloud", False),
        ]
    ]
    + [
        {
            "input": "Pick the longest answer.",
            "target_scores": {"a": 0, "bbbbbbbb": 1, "ccc": 0},
        }
    ],
}


@pytest.fixture
def toy_cache(tmp_path, monkeypatch):
    """Put a small task where bigbench:winowhy is looked up, so nothing is downloaded."""
    monkeypatch.setenv("SDSPRUNE_CACHE", str(tmp_path))
    source = bigbench.task_cache() / "winowhy" / "task.json"
    source.parent.mkdir(parents=True)
    source.write_text(json.dumps(TASK))
    return source


def _choice_logprob(model, tokenizer, context: str, choice: str) -> float:
    """Sum of log p(choice tokens | context): the harness's loglikelihood, by hand.

    The harness moves the context's trailing whitespace into the continuation before
    tokenizing; with a byte-level tokenizer each byte is one token.
    """
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + choice
    ctx = tokenizer(stripped, add_special_tokens=False).input_ids
    cont = tokenizer(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return sum(logprobs[p, token].item() for p, token in zip(positions, cont, strict=True))


def _hand_correct(model, tokenizer, doc: dict) -> tuple[int, int]:
    """Whether the top choice by total and by per-byte log-likelihood is a gold one."""
    lls = [_choice_logprob(model, tokenizer, doc["query"], c) for c in doc["choices"]]
    normed = [ll / len(c) for ll, c in zip(lls, doc["choices"], strict=True)]
    acc = max(range(len(lls)), key=lls.__getitem__) in doc["gold"]
    acc_norm = max(range(len(normed)), key=normed.__getitem__) in doc["gold"]
    return int(acc), int(acc_norm)


def _hand_scores(model, tokenizer, docs: list[dict]) -> tuple[float, float]:
    correct = [_hand_correct(model, tokenizer, doc) for doc in docs]
    return tuple(sum(column) / len(docs) for column in zip(*correct, strict=True))


@pytest.mark.parametrize("style", bigbench.PROMPT_STYLES)
def test_harness_scores_match_a_hand_computation(toy_cache, style):
    model, tokenizer = tiny_model("llama", seed=3), byte_tokenizer()
    report = evaluate_tasks(
        LoadedModel(model, tokenizer, "tiny", None),
        ["bigbench:winowhy"],
        prompt_style=style,
        batch_size=4,
        progress=False,
    )
    (row,) = report["tasks"]
    assert report["prompt_style"] == style
    docs = bigbench.convert_task(TASK, style=style)
    acc, acc_norm = _hand_scores(model, tokenizer, docs)
    assert row["task"] == "bigbench:winowhy"
    assert row["examples"] == row["total"] == len(docs)
    assert row["acc"] == pytest.approx(acc)
    assert row["acc_norm"] == pytest.approx(acc_norm)
    assert row["chance"] == pytest.approx((6 * 0.5 + 1 / 3) / 7)
    assert row["majority"] is None  # the last example has other answers than yes/no
    assert row["acc_stderr"] is not None


def test_limit_scores_a_seeded_subset(toy_cache):
    model, tokenizer = tiny_model("llama", seed=3), byte_tokenizer()
    report = evaluate_tasks(
        model, ["bigbench:winowhy"], tokenizer=tokenizer, limit=3, seed=5, progress=False
    )
    (row,) = report["tasks"]
    docs = bigbench.convert_task(TASK)
    subset = [docs[i] for i in bigbench.subsample(len(docs), 3, seed=5)]
    acc, acc_norm = _hand_scores(model, tokenizer, subset)
    assert (row["examples"], row["total"]) == (3, 7)
    assert (row["acc"], row["acc_norm"]) == (pytest.approx(acc), pytest.approx(acc_norm))
    assert report["limit"] == 3 and report["seed"] == 5
    # Each scored example is kept, by document index, for paired comparisons.
    indices = bigbench.subsample(len(docs), 3, seed=5)
    hand = [_hand_correct(model, tokenizer, docs[i]) for i in indices]
    assert row["per_example"] == {
        "doc_id": indices,
        "acc": [a for a, _ in hand],
        "acc_norm": [n for _, n in hand],
    }


def test_composite_task_reports_subtasks_and_their_mean(tmp_path, monkeypatch):
    monkeypatch.setenv("SDSPRUNE_CACHE", str(tmp_path))
    for leaf in ("one_sentence", "one_sentence_no_prompt", "two_sentences"):
        path = bigbench.task_cache() / "cause_and_effect" / leaf / "task.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(TASK))
    report = evaluate_tasks(
        tiny_model("llama"),
        ["bigbench:cause_and_effect"],
        tokenizer=byte_tokenizer(),
        limit=2,
        progress=False,
    )
    names = [row["task"] for row in report["tasks"]]
    assert names == [
        "bigbench:cause_and_effect/one_sentence",
        "bigbench:cause_and_effect/one_sentence_no_prompt",
        "bigbench:cause_and_effect/two_sentences",
        "bigbench:cause_and_effect",
    ]
    mean = report["tasks"][-1]
    assert mean["acc"] == pytest.approx(sum(r["acc"] for r in report["tasks"][:3]) / 3)
    assert mean["examples"] == 6 and len(mean["subtasks"]) == 3


def test_in_memory_model_needs_its_tokenizer():
    with pytest.raises(SdspruneError, match="tokenizer"):
        evaluate_tasks(tiny_model("llama"), ["bigbench:winowhy"], progress=False)


def test_bad_names_fail_before_any_work():
    with pytest.raises(SdspruneError, match="unknown BIG-bench"):
        evaluate_tasks("no-such-model", ["bigbench:nonsense"])
    with pytest.raises(SdspruneError, match="no tasks"):
        evaluate_tasks("no-such-model", [])
    with pytest.raises(SdspruneError, match="--limit"):
        evaluate_tasks("no-such-model", ["bigbench:winowhy"], limit=0)
    with pytest.raises(SdspruneError, match="prompt style"):
        evaluate_tasks("no-such-model", ["bigbench:winowhy"], prompt_style="listed")


def test_standard_task_offline_names_the_missing_dataset(offline_harness):
    """Standard harness tasks need the hub; offline that is one clear error, before loading."""
    offline_harness({"piqa": "baber/piqa"})
    with pytest.raises(SdspruneError, match=r"unreachable.*cache: piqa \(baber/piqa\); offline"):
        evaluate_tasks("no-such-model", ["piqa"])
    with pytest.raises(SdspruneError, match="unknown task"):
        evaluate_tasks("no-such-model", ["no_such_task"])


def test_paper_suite_offline_is_one_line_naming_every_missing_dataset(offline_harness):
    datasets = {name: f"org/{name}-data" for name in zeroshot.PAPER_SUITE}
    asked = offline_harness(datasets)
    with pytest.raises(SdspruneError) as error:
        evaluate_tasks("no-such-model", ["paper"])  # fails before loading the model
    message = str(error.value)
    assert "\n" not in message and message.startswith("offline: 7 task(s) need datasets")
    for name in ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge"):
        assert f"{name} (org/{name}-data)" in message
    assert "openbookqa (org/openbookqa-data)" in message and "--tasks offline" in message
    assert asked == list(zeroshot.PAPER_SUITE)


def test_suites_expand_to_their_tasks_once():
    assert zeroshot.expand_suites(["bigbench:winowhy", "offline", "bigbench:social_iqa"]) == [
        "bigbench:winowhy",
        *zeroshot.OFFLINE_SUITE,
    ]
    assert zeroshot.expand_suites(["paper"])[:2] == ["boolq", "rte"]
    assert len(zeroshot.OFFLINE_SUITE) >= 5


TASK_ARGS = ("--tasks", "bigbench:winowhy", "--limit", "3", "--json")


def test_cli_eval_tasks_prints_json(toy_cache, tiny_model_dir):
    """`sdsprune eval MODEL --tasks ...` skips perplexity unless --dataset is given (the toy
    task comes from the SDSPRUNE_CACHE the fixture set, which the subprocess inherits)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "sdsprune", "eval", str(tiny_model_dir), *TASK_ARGS],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    (row,) = report["tasks"]
    assert (row["task"], row["examples"], row["total"]) == ("bigbench:winowhy", 3, 7)
    assert report["perplexity"] == []
