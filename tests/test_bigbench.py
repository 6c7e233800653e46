"""BIG-bench JSON tasks: conversion to harness documents, names, subsampling, fetching."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from sdsprune.errors import SdspruneError
from sdsprune.evaluate import bigbench

FRUIT_TASK = {
    "name": "fruit",
    "task_prefix": "Pick a fruit.",
    "examples": [
        {
            "input": "Which is yellow?",
            "target_scores": {"apple": 0, "banana": 1, "cherry": 0, "date": 0},
        },
        {
            "input": "Which is red?",
            "target_scores": {"apple": 1, "banana": 0, "cherry": 1, "date": 0},
        },
        {
            "input": "Which is yellow?",
            "target_scores": {"apple": 0, "banana": 1, "cherry": 0, "date": 0},
        },
    ],
}


def test_bigbench_style_lists_choices_in_bigbench_order():
    docs = bigbench.convert_task(FRUIT_TASK, style="bigbench")
    # BIG-bench: task_prefix + "\nQ: " + input + choices (RandomState(42) permutation of the
    # sorted choices, identical for every example) + "\nA: "; the duplicate is dropped.
    assert len(docs) == 2
    assert docs[0]["query"] == (
        "Pick a fruit.\nQ: Which is yellow?"
        "\n  choice: banana\n  choice: date\n  choice: apple\n  choice: cherry\nA: "
    )
    assert docs[0]["choices"] == ["apple", "banana", "cherry", "date"]
    assert docs[0]["gold"] == [1]
    assert docs[1]["gold"] == [0, 2]  # every top-scored choice counts as correct
    assert [doc["id"] for doc in docs] == [0, 1]
    assert bigbench.chance_accuracy(docs) == pytest.approx((1 / 4 + 2 / 4) / 2)


def test_cloze_style_scores_answers_without_listing_them():
    listed = bigbench.convert_task(FRUIT_TASK, style="bigbench")
    docs = bigbench.convert_task(FRUIT_TASK)
    assert docs[0]["query"] == "Pick a fruit.\nQ: Which is yellow?\nA: "
    for cloze, bigbench_doc in zip(docs, listed, strict=True):
        assert {**cloze, "query": None} == {**bigbench_doc, "query": None}


def test_majority_baseline_needs_one_answer_set():
    def doc(gold: str) -> dict:
        return {"choices": ["correct", "incorrect"], "gold": [["correct", "incorrect"].index(gold)]}

    docs = [doc("incorrect")] * 3 + [doc("correct")]
    assert bigbench.majority_accuracy(docs) == pytest.approx(0.75)
    # Same answers in another order still form one answer set.
    docs.append({"choices": ["incorrect", "correct"], "gold": [0]})
    assert bigbench.majority_accuracy(docs) == pytest.approx(0.8)
    # Answers that change from example to example have no constant guess.
    assert bigbench.majority_accuracy(bigbench.convert_task(FRUIT_TASK)[:1] + docs) is None


def test_unknown_prompt_style_is_rejected():
    with pytest.raises(SdspruneError, match=r"prompt style 'mcq'.*cloze, bigbench"):
        bigbench.convert_task(FRUIT_TASK, style="mcq")


@pytest.mark.parametrize("style", bigbench.PROMPT_STYLES)
def test_custom_prefixes_without_appended_choices(style):
    task = {
        "task_prefix": "About pronouns.\n",
        "example_input_prefix": "\n",
        "example_output_prefix": "\nThe above reasoning is ",
        "append_choices_to_input": False,
        "examples": [{"input": "It is so.", "target_scores": {"correct": 0, "incorrect": 1}}],
    }
    (doc,) = bigbench.convert_task(task, style=style)
    assert doc["query"] == "About pronouns.\n\nIt is so.\nThe above reasoning is "
    assert doc["choices"] == ["correct", "incorrect"]
    assert doc["gold"] == [1]


def test_example_without_a_correct_choice_is_rejected():
    task = {"examples": [{"input": "?", "target_scores": {"a": 0, "b": 0}}]}
    with pytest.raises(SdspruneError, match="no correct choice"):
        bigbench.convert_task(task)


def test_names_resolve_to_leaf_tasks():
    assert [t.path for t in bigbench.resolve("bigbench:social_iqa")] == ["social_iqa"]
    assert [t.path for t in bigbench.resolve("bigbench:goal_step_wikihow")] == [
        "goal_step_wikihow/goal_inference",
        "goal_step_wikihow/step_inference",
        "goal_step_wikihow/step_ordering",
    ]
    (leaf,) = bigbench.resolve("bigbench:cause_and_effect/two_sentences")
    assert leaf.name == "bigbench:cause_and_effect/two_sentences"
    assert "/" not in leaf.harness_name and ":" not in leaf.harness_name


def test_unknown_name_suggests_close_ones():
    with pytest.raises(SdspruneError, match="did you mean bigbench:social_iqa"):
        bigbench.resolve("bigbench:social_iq")


def test_subsample_is_seeded_sorted_and_bounded():
    first = bigbench.subsample(100, 10, seed=42)
    assert first == bigbench.subsample(100, 10, seed=42)
    assert first == sorted(first) and len(set(first)) == 10
    assert first != list(range(10))  # a random subset, not the first examples
    assert first != bigbench.subsample(100, 10, seed=0)
    assert bigbench.subsample(5, 10, seed=42) == [0, 1, 2, 3, 4]
    assert bigbench.subsample(5, None, seed=42) == [0, 1, 2, 3, 4]


def test_docs_are_converted_once_from_the_cached_task_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SDSPRUNE_CACHE", str(tmp_path))
    task = bigbench.BigbenchTask("social_iqa")
    source = bigbench.task_cache() / "social_iqa" / "task.json"
    source.parent.mkdir(parents=True)
    source.write_text(json.dumps(FRUIT_TASK))
    docs, docs_file = bigbench.load_docs(task)
    listed, listed_file = bigbench.load_docs(task, "bigbench")
    assert len(docs) == 2 and docs_file.exists() and listed_file != docs_file
    source.unlink()  # the JSON lines are reused without the task file
    assert bigbench.load_docs(task) == (docs, docs_file)
    assert bigbench.load_docs(task, "bigbench") == (listed, listed_file)
    config = bigbench.harness_config(task, docs_file, "cloze")
    assert config["dataset_kwargs"]["data_files"]["test"] == str(docs_file)
    assert config["target_delimiter"] == ""


def _fake_sdist(path: Path, leaves: dict[str, dict]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for leaf, data in leaves.items():
            raw = json.dumps(data).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{leaf}/task.json")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_extracts_only_the_wanted_files_from_the_archive(tmp_path, monkeypatch):
    """An older pip leaves the (hash-checked) archive in the download folder."""
    monkeypatch.setenv("SDSPRUNE_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    digest = _fake_sdist(archive, {"winowhy": FRUIT_TASK, "other": {"examples": []}})
    monkeypatch.setattr(bigbench, "SDIST_SHA256", digest)
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        download = Path(cmd[cmd.index("-d") + 1])
        download.mkdir(parents=True)
        (download / archive.name).write_bytes(archive.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bigbench.subprocess, "run", fake_pip)
    bigbench.fetch_task_files(["winowhy"])
    cached = bigbench.task_cache() / "winowhy" / "task.json"
    assert json.loads(cached.read_text()) == FRUIT_TASK
    assert not (bigbench.task_cache() / "other").exists()
    requirements = Path(calls[0][calls[0].index("-r") + 1]).parent  # scratch is cleaned up
    assert not requirements.exists()
    assert "--require-hashes" in calls[0] and "--no-deps" in calls[0]


def test_fetch_reads_the_tree_pip_unpacked_before_rejecting_the_metadata(tmp_path, monkeypatch):
    """Current pip unpacks the sdist into TMPDIR, then refuses its direct-URL dependency."""
    monkeypatch.setenv("SDSPRUNE_CACHE", str(tmp_path / "cache"))

    def fake_pip(cmd, env, **kwargs):
        tree = Path(env["TMPDIR"]) / "pip-download-x" / "bigbench_abc" / "bigbench"
        (tree / "benchmark_tasks" / "winowhy").mkdir(parents=True)
        (tree / "benchmark_tasks" / "winowhy" / "task.json").write_text(json.dumps(FRUIT_TASK))
        err = "ERROR: Distributions from PyPI cannot declare direct URL dependencies."
        return subprocess.CompletedProcess(cmd, 1, "", err)

    monkeypatch.setattr(bigbench.subprocess, "run", fake_pip)
    bigbench.fetch_task_files(["winowhy"])
    assert json.loads((bigbench.task_cache() / "winowhy" / "task.json").read_text()) == FRUIT_TASK


def test_fetch_refuses_a_changed_package(tmp_path, monkeypatch):
    monkeypatch.setenv("SDSPRUNE_CACHE", str(tmp_path / "cache"))
    err = "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE."
    monkeypatch.setattr(
        bigbench.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", err)
    )
    with pytest.raises(SdspruneError, match="checksum mismatch"):
        bigbench.fetch_task_files(["winowhy"])


def test_fetch_failure_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SDSPRUNE_CACHE", str(tmp_path / "cache"))
    err = "ERROR: Could not find a version that satisfies the requirement bigbench==1.0.0"
    monkeypatch.setattr(
        bigbench.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", err)
    )
    with pytest.raises(SdspruneError, match=r"could not fetch bigbench==1\.0\.0.*Could not find"):
        bigbench.fetch_task_files(["winowhy"])


@pytest.mark.real
def test_real_sdist_gives_the_core_tasks():
    """Downloads the 358 MB sdist once (then cached); checks the real files convert."""
    for name, count in (("bigbench:social_iqa", 1935), ("bigbench:winowhy", 2862)):
        (task,) = bigbench.resolve(name)
        docs, _ = bigbench.load_docs(task)
        assert len(docs) == count
    (leaf, *_) = bigbench.resolve("bigbench:goal_step_wikihow")
    docs, _ = bigbench.load_docs(leaf)
    assert len(docs) == 1703
    assert all(len(doc["choices"]) >= 4 and len(doc["gold"]) == 1 for doc in docs)
