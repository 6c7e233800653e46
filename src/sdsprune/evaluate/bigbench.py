"""Offline zero-shot tasks from the BIG-bench JSON files, as local multiple-choice tasks.

The hub datasets behind lm-evaluation-harness's standard tasks are unreachable offline, but
the ``bigbench==1.0.0`` sdist on PyPI carries every BIG-bench ``task.json``. We fetch it with
``pip download`` (never ``pip install``: it pulls TensorFlow), let pip check its pinned sha256,
copy out only the task files we need into the cache, and turn each into JSON lines the harness
reads as an ordinary multiple-choice task.

Prompts follow BIG-bench's own ``default_format_fn`` (zero-shot): ``task_prefix`` +
``example_input_prefix`` + input + ``example_output_prefix``; each choice is scored as the
continuation of that prompt, with no extra delimiter. Two prompt styles:

* ``cloze`` (default): the choices are not listed in the prompt. This is how the harness's own
  multiple-choice tasks (siqa, piqa, arc, hellaswag) score base models, and the only way a
  small model shows what it knows: a 135M model cannot use a list of options, so listing them
  only adds noise (SmolLM2-135M, 200 social_iqa examples: acc_norm 45.5% cloze vs 36.0%
  listed, chance 33.3%).
* ``bigbench``: exactly BIG-bench's format, which appends the choices to the input (with
  ``choice_prefix``, permuted with BIG-bench's fixed seed 42) when the task asks for it; use it
  to compare with numbers reported by BIG-bench itself.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdsprune.data.assets import assets_dir, sha256_of
from sdsprune.errors import SdspruneError
from sdsprune.evaluate._bigbench_index import MULTIPLE_CHOICE_TASKS

log = logging.getLogger(__name__)

PREFIX = "bigbench:"
SDIST = "bigbench==1.0.0"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
# The seed BIG-bench's JsonTask uses to permute the choices it lists in the prompt.
BIGBENCH_FORMAT_SEED = 42
# Bump when the conversion below changes, so cached JSON lines are rebuilt.
FORMAT_VERSION = 2
PROMPT_STYLES = ("cloze", "bigbench")
DEFAULT_PROMPT_STYLE = "cloze"
# Fetched together whenever the sdist has to be unpacked, so a later run needs no download
# (the tasks the README and the offline suite use).
CORE_TASKS = (
    "social_iqa",
    "goal_step_wikihow",
    "winowhy",
    "cause_and_effect",
    "movie_recommendation",
    "date_understanding",
)


@dataclass(frozen=True)
class BigbenchTask:
    """One leaf task: ``path`` inside ``benchmark_tasks`` (``parent/subtask`` for subtasks)."""

    path: str

    @property
    def name(self) -> str:
        return PREFIX + self.path

    @property
    def harness_name(self) -> str:
        """A task name the harness accepts as a plain identifier."""
        return "sdsprune_bigbench_" + self.path.replace("/", "__")


def is_bigbench(spec: str) -> bool:
    return spec.startswith(PREFIX)


def resolve(spec: str) -> list[BigbenchTask]:
    """``bigbench:NAME`` to its leaf tasks: itself, or every subtask of a composite task."""
    path = spec.removeprefix(PREFIX).strip().strip("/")
    if path in MULTIPLE_CHOICE_TASKS:
        return [BigbenchTask(path)]
    children = [leaf for leaf in MULTIPLE_CHOICE_TASKS if leaf.startswith(path + "/")]
    if path and children:
        return [BigbenchTask(leaf) for leaf in children]
    parents = sorted({leaf.split("/")[0] for leaf in MULTIPLE_CHOICE_TASKS})
    close = difflib.get_close_matches(path, parents + list(MULTIPLE_CHOICE_TASKS), n=3)
    hint = f" (did you mean {', '.join(PREFIX + c for c in close)}?)" if close else ""
    raise SdspruneError(
        f"unknown BIG-bench multiple-choice task '{spec}'{hint}; e.g. bigbench:social_iqa, "
        "bigbench:winowhy, bigbench:goal_step_wikihow/goal_inference, bigbench:cause_and_effect"
    )


# ----------------------------------------------------------------------------- conversion
def check_prompt_style(style: str) -> str:
    if style not in PROMPT_STYLES:
        raise SdspruneError(
            f"unknown prompt style '{style}': choose one of {', '.join(PROMPT_STYLES)}"
        )
    return style


def convert_task(
    data: dict, seed: int = BIGBENCH_FORMAT_SEED, style: str = DEFAULT_PROMPT_STYLE
) -> list[dict]:
    """BIG-bench task JSON to documents ``{query, choices, gold, target_scores}``.

    ``gold`` lists every choice with the highest score: BIG-bench's multiple_choice_grade
    credits the score of the chosen answer, which for 0/1 scores is "prediction in gold".
    Duplicate examples are dropped, as BIG-bench does.
    """
    task_prefix = str(data.get("task_prefix", ""))
    input_prefix = data.get("example_input_prefix", "\nQ: ")
    output_prefix = data.get("example_output_prefix", "\nA: ")
    choice_prefix = data.get("choice_prefix", "\n  choice: ")
    append_choices = check_prompt_style(style) == "bigbench" and data.get(
        "append_choices_to_input", True
    )
    docs, seen = [], set()
    for example in data.get("examples", []):
        key = json.dumps(example)
        if key in seen:
            continue
        seen.add(key)
        docs.append(
            _convert_example(
                example,
                task_prefix,
                input_prefix,
                output_prefix,
                choice_prefix,
                append_choices,
                seed,
            )
        )
    if not docs:
        raise SdspruneError(f"BIG-bench task '{data.get('name')}' has no examples")
    for index, doc in enumerate(docs):
        doc["id"] = index
    return docs


def _convert_example(
    example: dict,
    task_prefix: str,
    input_prefix: str,
    output_prefix: str,
    choice_prefix: str,
    append_choices: bool,
    seed: int,
) -> dict:
    scores = example.get("target_scores")
    if not scores:
        raise SdspruneError(f"BIG-bench example without target_scores: {str(example)[:200]}")
    choices = list(scores)
    text = example["input"]
    if append_choices:
        # BIG-bench draws this permutation from a fresh RandomState(seed) for every example.
        permuted = np.random.RandomState(seed=seed).permutation(sorted(choices))
        text = text + choice_prefix + choice_prefix.join(permuted)
    best = max(scores.values())
    if len(scores) > 1 and best <= min(scores.values()):
        raise SdspruneError(f"BIG-bench example with no correct choice: {str(example)[:200]}")
    return {
        "query": task_prefix + input_prefix + text + output_prefix,
        "choices": choices,
        "gold": [i for i, choice in enumerate(choices) if scores[choice] == best],
        "target_scores": [float(scores[c]) for c in choices],
    }


def chance_accuracy(docs: list[dict]) -> float:
    """Expected accuracy of a uniform random guess (BIG-bench's ``low_score``)."""
    return float(np.mean([len(doc["gold"]) / len(doc["choices"]) for doc in docs]))


def majority_accuracy(docs: list[dict]) -> float | None:
    """Accuracy of always giving the most frequent correct answer, on tasks whose examples all
    share one answer set (winowhy: correct/incorrect); ``None`` when the answers vary.

    Uniform chance understates what a model with a constant preference scores on an unbalanced
    task: 63% of a 200-example winowhy subset is "incorrect", so 62% there means nothing.
    """
    answer_sets = {frozenset(doc["choices"]) for doc in docs}
    if len(answer_sets) != 1:
        return None
    counts = {choice: 0 for choice in next(iter(answer_sets))}
    for doc in docs:
        for index in doc["gold"]:
            counts[doc["choices"][index]] += 1
    return max(counts.values()) / len(docs)


def subsample(total: int, limit: int | None, seed: int) -> list[int]:
    """A fixed random subset of ``limit`` document indices (sorted), or all of them.

    A seeded sample rather than the first ``limit`` examples, because BIG-bench files are often
    ordered by topic or source and a prefix would be biased.
    """
    if limit is None or limit >= total:
        return list(range(total))
    if limit < 1:
        raise SdspruneError(f"--limit must be at least 1 (got {limit})")
    rng = np.random.RandomState(seed=seed)
    return sorted(int(i) for i in rng.choice(total, size=limit, replace=False))


def harness_config(task: BigbenchTask, docs_file: Path, style: str) -> dict:
    """An lm-evaluation-harness task config reading our JSON lines through ``datasets``."""
    return {
        "task": task.harness_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(docs_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": "",
        "num_fewshot": 0,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {
            "version": FORMAT_VERSION,
            "prompt_style": style,
            "source": f"{SDIST} {task.path}/task.json",
        },
    }


# ----------------------------------------------------------------------------- files
def task_cache() -> Path:
    return assets_dir() / "bigbench-1.0.0"


def load_docs(task: BigbenchTask, style: str = DEFAULT_PROMPT_STYLE) -> tuple[list[dict], Path]:
    """Documents of ``task`` and the JSON lines file holding them (built once per style)."""
    docs_file = (
        task_cache() / task.path / f"docs-v{FORMAT_VERSION}-{check_prompt_style(style)}.jsonl"
    )
    if docs_file.exists():
        lines = docs_file.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines], docs_file
    data = json.loads(task_json(task).read_text(encoding="utf-8"))
    docs = convert_task(data, style=style)
    tmp = docs_file.with_name(f".{docs_file.name}.tmp")
    tmp.write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")
    os.replace(tmp, docs_file)
    return docs, docs_file


def task_json(task: BigbenchTask) -> Path:
    """The cached ``task.json`` of ``task``, fetching the sdist on first use."""
    target = task_cache() / task.path / "task.json"
    if not target.exists():
        leaves = {task.path} | {
            leaf for leaf in MULTIPLE_CHOICE_TASKS if leaf.split("/")[0] in CORE_TASKS
        }
        fetch_task_files(sorted(leaves))
    return target


def fetch_task_files(leaves: list[str]) -> None:
    """Copy ``benchmark_tasks/<leaf>/task.json`` for each leaf out of the pinned sdist."""
    cache = task_cache()
    cache.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s (358 MB, once) for its BIG-bench task files", SDIST)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as scratch:
        root = _sdist_tasks_root(Path(scratch), leaves)
        for leaf in leaves:
            target = cache / leaf / "task.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(".task.json.tmp")
            shutil.copyfile(root / leaf / "task.json", tmp)
            os.replace(tmp, target)


def _sdist_tasks_root(scratch: Path, leaves: list[str]) -> Path:
    """Download the sdist with pip in hash-checking mode; return its ``benchmark_tasks``.

    Current pip unpacks the sdist, then refuses it because its metadata declares a direct URL
    dependency (bleurt). The archive's hash was already checked by then, so with
    ``--no-clean`` and our own TMPDIR the unpacked tree is left for us to read. An older pip
    that accepts the metadata leaves the archive itself in the download folder instead: then
    only the wanted members are extracted from it.
    """
    requirements = scratch / "requirements.txt"
    requirements.write_text(f"{SDIST} --hash=sha256:{SDIST_SHA256}\n")
    download, pip_tmp = scratch / "download", scratch / "tmp"
    pip_tmp.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-clean", "--quiet"]
    cmd += ["--require-hashes", "-d", str(download), "-r", str(requirements)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(pip_tmp)}
    )
    if "DO NOT MATCH THE HASHES" in proc.stderr:
        raise SdspruneError(
            f"checksum mismatch for {SDIST} (expected sha256 {SDIST_SHA256[:12]}...): the "
            "registry package changed; refusing to use it"
        )
    archives = sorted(download.glob("bigbench-*.tar.gz")) if download.exists() else []
    if archives:
        return _extract_members(archives[0], leaves, scratch / "extracted")
    unpacked = sorted(pip_tmp.glob("*/bigbench*/bigbench/benchmark_tasks"))
    if unpacked:
        return unpacked[0]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
    reason = lines[-1] if lines else "pip left neither the archive nor its unpacked files"
    raise SdspruneError(f"could not fetch {SDIST} from the package registry: {reason}")


def _extract_members(archive: Path, leaves: list[str], dest: Path) -> Path:
    if sha256_of(archive) != SDIST_SHA256:
        raise SdspruneError(f"checksum mismatch for {archive.name}; refusing to use it")
    root = "bigbench-1.0.0/bigbench/benchmark_tasks"
    with tarfile.open(archive) as tar:
        for leaf in leaves:
            member = tar.extractfile(f"{root}/{leaf}/task.json")
            if member is None:
                raise SdspruneError(f"{archive.name} has no {leaf}/task.json")
            (dest / leaf).mkdir(parents=True, exist_ok=True)
            with member, open(dest / leaf / "task.json", "wb") as out:
                shutil.copyfileobj(member, out)
    return dest
