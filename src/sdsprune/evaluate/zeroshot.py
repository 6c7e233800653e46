"""Zero-shot accuracy through lm-evaluation-harness (the ``eval`` extra).

Two kinds of task names, both scored by the harness with its ``acc`` and ``acc_norm``:

* ``bigbench:NAME`` tasks are built from the BIG-bench JSON files (see :mod:`.bigbench`) and
  work offline; ``--limit`` takes a seeded random subset of each task.
* any other name (piqa, arc_easy, hellaswag, ...) is a standard harness task, passed on as it
  is; those download their data from the Hugging Face hub, so offline they fail at once with
  the names of the missing datasets. ``--limit`` there is the harness's own (first N examples).
* ``paper`` and ``offline`` name suites (:data:`SUITES`): the papers' seven harness tasks, and
  bundled BIG-bench tasks a 135M model is measurably good at.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from sdsprune.errors import SdspruneError
from sdsprune.evaluate import bigbench
from sdsprune.models import LoadedModel, load_model
from sdsprune.runinfo import library_versions

log = logging.getLogger(__name__)

HARNESS_REQUIREMENT = "lm-eval==0.4.13"
DEFAULT_SEED = bigbench.BIGBENCH_FORMAT_SEED
# The zero-shot suite of the SparseGPT, Wanda and SDS papers, as harness tasks (needs the hub).
PAPER_SUITE = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# Bundled BIG-bench tasks (no network) on which dense SmolLM2-135M scores clearly above its
# uniform and constant-answer baselines, so that a suite mean can show a loss of skill; the
# measurements behind the choice are in the README ("Zero-shot tasks and comparisons").
OFFLINE_SUITE = (
    "bigbench:social_iqa",
    "bigbench:goal_step_wikihow/goal_inference",
    "bigbench:goal_step_wikihow/step_inference",
    "bigbench:movie_recommendation",
    "bigbench:date_understanding",
)
SUITES = {"paper": PAPER_SUITE, "offline": OFFLINE_SUITE}


@dataclass
class TaskResult:
    """Accuracy on one task. ``subtasks`` is set on a BIG-bench composite (their mean)."""

    task: str
    acc: float
    acc_norm: float
    examples: int  # examples scored
    total: int  # examples in the task
    acc_stderr: float | None = None
    acc_norm_stderr: float | None = None
    chance: float | None = None  # accuracy of a uniform random guess, when known
    majority: float | None = None  # accuracy of always the most frequent answer, when defined
    seconds: float = 0.0
    subtasks: list[str] = field(default_factory=list)
    # Leaf tasks: each scored example's document index and 0/1 correctness under both
    # metrics, so that two models scored on the same examples can be compared pairwise.
    per_example: dict[str, list[int]] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Prepared:
    """A task ready for the harness: its config or Task object and the docs to score."""

    name: str
    spec: object  # harness config dict (BIG-bench) or Task object (standard task)
    total: int
    indices: list[int] | None = None  # BIG-bench subsample; None = harness limit
    chance: float | None = None
    majority: float | None = None

    def scored(self, limit: int | None) -> int:
        """How many examples will be scored: the subsample, or the harness's first N."""
        if self.indices is not None:
            return len(self.indices)
        return self.total if limit is None else min(limit, self.total)


def evaluate_tasks(
    model: str | LoadedModel | nn.Module,
    tasks: Sequence[str],
    *,
    tokenizer=None,
    limit: int | None = None,
    seed: int = DEFAULT_SEED,
    prompt_style: str = bigbench.DEFAULT_PROMPT_STYLE,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
) -> dict:
    """Zero-shot accuracy of ``model`` on ``tasks``; returns ``{"model", "tasks", ...}``.

    ``model`` is a spec for :func:`load_model`, a :class:`LoadedModel`, or a bare module with
    ``tokenizer`` given (e.g. a model pruned in memory). Every task is checked and its data
    fetched before the model is loaded, so a typo or a missing dataset fails in seconds.
    ``prompt_style`` applies to ``bigbench:`` tasks (see :mod:`.bigbench`).
    """
    tasks = expand_suites(tasks)
    if not tasks:
        raise SdspruneError("no tasks given (e.g. --tasks bigbench:social_iqa,bigbench:winowhy)")
    if limit is not None and limit < 1:
        raise SdspruneError(f"--limit must be at least 1 (got {limit})")
    _require_harness()
    bigbench.check_prompt_style(prompt_style)
    prepared, groups = _prepare(list(tasks), limit, seed, prompt_style)
    loaded = _as_loaded(model, tokenizer, device, dtype)
    lm = _harness_model(loaded, batch_size)
    results: dict[str, TaskResult] = {}
    for number, task in enumerate(prepared, start=1):
        log.info(
            "task %d/%d: %s (%d of %d examples)",
            number,
            len(prepared),
            task.name,
            task.scored(limit),
            task.total,
        )
        results[task.name] = _run_one(lm, task, limit, seed, progress)
    rows = _with_groups(results, groups)
    return {
        "model": loaded.spec,
        "tasks": [row.to_dict() for row in rows],
        "limit": limit,
        "seed": seed,
        "prompt_style": prompt_style,
        "versions": library_versions(),
    }


# ----------------------------------------------------------------------------- preparation
def expand_suites(tasks: Sequence[str]) -> list[str]:
    """Suite names (``paper``, ``offline``) replaced by their tasks; repeats dropped."""
    expanded = [name for task in tasks for name in SUITES.get(task.strip(), (task,))]
    return list(dict.fromkeys(expanded))


def check_task_data(tasks: Sequence[str]) -> None:
    """Load the data of the standard harness tasks in ``tasks`` (downloading it once), so a
    caller with expensive work ahead (pruning) fails at once when it is unreachable."""
    _standard_tasks([name for name in expand_suites(tasks) if not bigbench.is_bigbench(name)])


def check_task_names(
    tasks: Sequence[str], prompt_style: str = bigbench.DEFAULT_PROMPT_STYLE
) -> None:
    """Fail on an unknown ``bigbench:`` name, prompt style or a missing harness, offline.

    Lets a caller that does other work first (perplexity, pruning) fail in a second on a typo
    in its task list; standard harness names are checked later, by the harness's index.
    """
    bigbench.check_prompt_style(prompt_style)
    if not tasks:
        return
    _require_harness()
    for name in expand_suites(tasks):
        if bigbench.is_bigbench(name):
            bigbench.resolve(name)


def _require_harness() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise SdspruneError(
            "zero-shot tasks need lm-evaluation-harness: pip install 'sdsprune[eval]' "
            f"(or pip install '{HARNESS_REQUIREMENT}')"
        ) from exc


def _prepare(
    tasks: list[str], limit: int | None, seed: int, prompt_style: str
) -> tuple[list[_Prepared], dict[str, list[str]]]:
    """Resolve names, fetch BIG-bench files and load standard tasks' data, in that order."""
    groups: dict[str, list[str]] = {}
    prepared: list[_Prepared] = []
    standard = [name for name in tasks if not bigbench.is_bigbench(name)]
    leaves = {name: bigbench.resolve(name) for name in tasks if bigbench.is_bigbench(name)}
    for name, leaf_tasks in leaves.items():
        if len(leaf_tasks) > 1 or leaf_tasks[0].name != name.rstrip("/"):
            groups[name] = [leaf.name for leaf in leaf_tasks]
        for leaf in leaf_tasks:
            if any(p.name == leaf.name for p in prepared):
                continue
            docs, docs_file = bigbench.load_docs(leaf, prompt_style)
            indices = bigbench.subsample(len(docs), limit, seed)
            scored = [docs[i] for i in indices]
            prepared.append(
                _Prepared(
                    name=leaf.name,
                    spec=bigbench.harness_config(leaf, docs_file, prompt_style),
                    total=len(docs),
                    indices=indices,
                    chance=bigbench.chance_accuracy(scored),
                    majority=bigbench.majority_accuracy(scored),
                )
            )
    prepared += _standard_tasks(standard)
    order = {name: i for i, name in enumerate(tasks)}
    prepared.sort(key=lambda p: order.get(p.name, _group_position(p.name, groups, order)))
    return prepared, groups


def _group_position(name: str, groups: dict[str, list[str]], order: dict[str, int]) -> float:
    for group, members in groups.items():
        if name in members:
            return order[group] + members.index(name) / (len(members) + 1)
    return len(order)


def _standard_tasks(names: list[str]) -> list[_Prepared]:
    """Load standard harness tasks (this downloads their datasets, or fails offline)."""
    if not names:
        return []
    from lm_eval.tasks import TaskManager

    from sdsprune.hub import go_offline_unless_reachable, hub_reachable

    manager = TaskManager()
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise SdspruneError(
            f"unknown task(s) {', '.join(unknown)}: neither a harness task (see `lm-eval ls "
            "tasks`) nor bigbench:NAME"
        )
    go_offline_unless_reachable()
    prepared, failures = [], {}
    for name in names:
        try:
            with _quiet_harness():
                loaded = manager.load([name])["tasks"]
        except Exception as exc:
            failures[name] = exc  # try the others, so that one message names every gap
            continue
        for task_name, task in loaded.items():
            task.set_config(key="num_fewshot", value=0)
            total = len(task.eval_docs)
            prepared.append(
                _Prepared(name=task_name if len(loaded) > 1 else name, spec=task, total=total)
            )
    if failures:
        raise SdspruneError(_missing_data_message(manager, failures, hub_reachable()))
    return prepared


def _missing_data_message(manager, failures: dict[str, Exception], online: bool) -> str:
    """One line naming every task whose data could not be loaded, and its dataset."""
    if not online:
        needs = ", ".join(f"{name} ({_dataset_of(manager, name)})" for name in failures)
        return (
            f"offline: {len(failures)} task(s) need datasets from the Hugging Face hub, which "
            f"is unreachable, and they are not in the local datasets cache: {needs}; offline, "
            "use the bundled BIG-bench tasks instead (--tasks offline)"
        )
    return "; ".join(
        f"task '{name}': could not load the dataset {_dataset_of(manager, name)}: "
        + (str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
        for name, exc in failures.items()
    )


def _dataset_of(manager, name: str) -> str:
    entry = manager.task_index.get(name)
    config = (entry.cfg or {}) if entry is not None else {}
    dataset = config.get("dataset_path") or "its dataset"
    if config.get("dataset_name"):
        dataset += f" {config['dataset_name']}"
    return dataset


# ----------------------------------------------------------------------------- model
def _as_loaded(model, tokenizer, device: str, dtype: str) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str):
        return load_model(model, device=device, dtype=dtype)
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise SdspruneError("evaluating an in-memory model needs its tokenizer as well")
        return LoadedModel(model=model, tokenizer=tokenizer, spec=type(model).__name__, path=None)
    raise SdspruneError(f"cannot evaluate a {type(model).__name__}: give a spec or a model")


def _harness_model(loaded: LoadedModel, batch_size: int):
    from sdsprune.evaluate.scoring import prefix_sharing_lm_class

    model = loaded.model
    device = next(model.parameters()).device
    model.eval()
    with _quiet_harness():
        return prefix_sharing_lm_class()(
            pretrained=model,
            tokenizer=loaded.tokenizer,
            batch_size=batch_size,
            device=str(device),
            # Gemma produces garbage without BOS; the harness otherwise follows the tokenizer.
            add_bos_token=True if _needs_bos(model) else None,
        )


def _needs_bos(model: nn.Module) -> bool:
    from sdsprune.evaluate.perplexity import needs_bos_per_window

    return needs_bos_per_window(model)


# ----------------------------------------------------------------------------- scoring
def _run_one(lm, task: _Prepared, limit: int | None, seed: int, progress: bool) -> TaskResult:
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    _seed_everything(seed)
    start = time.perf_counter()
    with _quiet_harness(progress):
        if isinstance(task.spec, dict):
            loaded = TaskManager(include_defaults=False).load([task.spec])
            harness_name = task.spec["task"]
            output = evaluate(
                lm=lm,
                task_dict=loaded,
                samples={harness_name: task.indices},
                bootstrap_iters=1000,
                log_samples=True,
            )
        else:
            harness_name = task.spec.config.task
            output = evaluate(
                lm=lm,
                task_dict={"tasks": {harness_name: task.spec}, "groups": {}},
                limit=limit,
                bootstrap_iters=1000,
                log_samples=True,
            )
    metrics = output["results"][harness_name]
    examples = int(output["n-samples"][harness_name]["effective"])
    return TaskResult(
        task=task.name,
        acc=float(metrics["acc,none"]),
        acc_norm=float(metrics.get("acc_norm,none", metrics["acc,none"])),
        acc_stderr=_number(metrics.get("acc_stderr,none")),
        acc_norm_stderr=_number(metrics.get("acc_norm_stderr,none")),
        examples=examples,
        total=task.total,
        chance=task.chance,
        majority=task.majority,
        seconds=round(time.perf_counter() - start, 2),
        per_example=per_example(output["samples"][harness_name]),
    )


def per_example(samples: list[dict]) -> dict[str, list[int]]:
    """The harness's logged samples as ``{"doc_id", "acc", "acc_norm"}`` lists in document
    order (tasks without ``acc_norm`` repeat ``acc``, as the task row does)."""
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    return {
        "doc_id": [int(sample["doc_id"]) for sample in ordered],
        "acc": [int(sample["acc"]) for sample in ordered],
        "acc_norm": [int(sample.get("acc_norm", sample["acc"])) for sample in ordered],
    }


def _with_groups(results: dict[str, TaskResult], groups: dict[str, list[str]]) -> list[TaskResult]:
    """Each composite BIG-bench task after its subtasks, as their unweighted mean (BIG-bench's
    convention for a task's score)."""
    rows = []
    emitted = set()
    for name, result in results.items():
        rows.append(result)
        emitted.add(name)
        for group, members in groups.items():
            if name == members[-1] and group not in emitted:
                rows.append(_mean_row(group, [results[m] for m in members]))
                emitted.add(group)
    return rows


def _mean_row(group: str, members: list[TaskResult]) -> TaskResult:
    return TaskResult(
        task=group,
        acc=float(np.mean([m.acc for m in members])),
        acc_norm=float(np.mean([m.acc_norm for m in members])),
        examples=sum(m.examples for m in members),
        total=sum(m.total for m in members),
        chance=_mean_or_none([m.chance for m in members]),
        majority=_mean_or_none([m.majority for m in members]),
        seconds=round(sum(m.seconds for m in members), 2),
        subtasks=[m.task for m in members],
    )


def _mean_or_none(values: list[float | None]) -> float | None:
    return None if None in values else float(np.mean(values))


def baselines(row: dict) -> list[float]:
    """A result row's known blind baselines: uniform guess, then constant answer."""
    return [row[key] for key in ("chance", "majority") if row.get(key) is not None]


def blind_baseline(row: dict) -> float | None:
    """The best accuracy reachable without reading the examples: uniform or constant guess."""
    known = baselines(row)
    return max(known) if known else None


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _quiet_harness(progress: bool = True) -> Iterator[None]:
    """Keep the harness's per-task INFO/WARNING chatter out of the terminal; its tqdm bar over
    the log-likelihood requests (with ETA) stays unless ``progress`` is off."""
    import datasets

    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    bars_were_on = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        if progress:
            yield
        else:
            with _no_tqdm():
                yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if bars_were_on:
            datasets.utils.logging.enable_progress_bar()


@contextlib.contextmanager
def _no_tqdm() -> Iterator[None]:
    """tqdm reads ``TQDM_DISABLE`` whenever a bar is created (the harness makes its own)."""
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
