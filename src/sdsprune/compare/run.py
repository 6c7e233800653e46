"""The comparison driver: ``compare()`` lists the runs, reuses those already finished with
the same settings, prunes and evaluates the rest one by one (each written to
``<out>/runs/<run>.json`` atomically), then writes the outputs."""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sdsprune.compare.paired import paired_comparisons
from sdsprune.compare.plots import accuracy_plot, perplexity_plot
from sdsprune.compare.report import METRICS, results_markdown
from sdsprune.compare.store import (
    RunStore,
    earlier_form,
    evaluation_keys,
    read_json,
    write_json_atomic,
)
from sdsprune.data import DEFAULT_CALIB, DEFAULT_CALIB_SEED, DEFAULT_CALIB_SEQLEN, DEFAULT_NSAMPLES
from sdsprune.errors import SdspruneError
from sdsprune.evaluate.bigbench import DEFAULT_PROMPT_STYLE
from sdsprune.evaluate.zeroshot import DEFAULT_SEED as DEFAULT_TASK_SEED
from sdsprune.methods import (
    OWL,
    SDS,
    Method,
    Presets,
    changed_settings,
    format_method,
    parse_method,
    report_settings,
)
from sdsprune.models import LoadedModel, load_model
from sdsprune.ownership import claim_work_folder
from sdsprune.runinfo import library_versions
from sdsprune.settings import settings_of

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("dense", "wanda", "sparsegpt", "sds:wanda", "sds:sparsegpt")
RUNS_DIR = "runs"
COMPARE_MARKER = ".sdsprune-compare"  # marks a folder compare made (see sdsprune.ownership)
FIGURES_DIR = "figures"
# Bump when a run file's content changes meaning, so old files are recomputed.
# 2: per-example correctness and per-chunk NLLs (for paired intervals) in every run file.
RUN_FORMAT = 2
# Settings that change only how results are shown, and settings a dense run does not use.
DISPLAY_ONLY = ("metric",)
DENSE = "dense"
CALIBRATION_ONLY = ("calib", "nsamples", "seqlen", "seed")


@dataclass(frozen=True)
class Run:
    """One row of the comparison: a method at one sparsity, or the dense model."""

    method: Method | None = None  # None: the dense model
    sparsity: str | None = None  # canonical "0.5" / "2:4"; None for dense
    label: str = DENSE  # the method string, short of the settings every run shares

    @property
    def key(self) -> str:
        """File-name-safe identifier, e.g. ``sds-wanda_2-4``."""
        name = slug(self.label)
        return name if self.sparsity is None else f"{name}_{self.sparsity.replace(':', '-')}"

    @property
    def uses(self) -> set[str]:
        """The shared method settings (``sds``, ``owl``) the run's result depends on."""
        if self.method is None:
            return set()
        return set(report_settings(self.method)) & {SDS.name, OWL.name}

    def record(self) -> dict:
        """The run as results store it: method (a pruner's string, ``sds`` or ``dense``),
        SDS's base, the sparsity and whether OWL set the block sparsities."""
        if self.method is None:
            return {"method": DENSE, "base": None, "sparsity": None, "owl": False}
        stored = report_settings(self.method)
        return {
            "method": stored["method"],
            "base": stored["base"],
            "sparsity": self.sparsity,
            "owl": isinstance(self.method, OWL),
        }


def parse_runs(
    methods: Sequence[str], sparsities: Sequence[str | float], presets: Presets | None = None
) -> list[Run]:
    """``dense`` once, then every pruning method at every sparsity (sparsity-major order).

    Method strings are :mod:`sdsprune.methods`' (``wanda``, ``sds:wanda``, ``sparsegpt+owl``)
    with ``presets`` (the settings every SDS or OWL run shares) filled in. OWL is
    unstructured-only, so its runs skip N:M sparsities.
    """
    from sdsprune.pruners import SparsityPattern

    if not methods:
        raise SdspruneError("no methods given (e.g. --methods dense,wanda,sparsegpt)")
    presets = presets or {}
    texts = [text.strip() for text in methods]
    pruned = [parse_method(text, presets) for text in texts if text != DENSE]
    patterns = [SparsityPattern.parse(s) for s in sparsities] if pruned else []
    if pruned and not patterns:
        raise SdspruneError("no sparsity given (e.g. --sparsity 2:4,0.5)")
    runs = [Run()] if DENSE in texts else []
    for pattern in dict.fromkeys(patterns):
        for method in dict.fromkeys(pruned):
            label = format_method(method, presets)
            if isinstance(method, OWL) and pattern.is_nm:
                log.info("skipping %s at %s: OWL needs unstructured sparsity", label, pattern)
                continue
            runs.append(Run(method, str(pattern), label))
    return runs


def compare(
    model: str = "smollm2-135m",
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    sparsities: Sequence[str | float] = ("2:4", "0.5"),
    calib: str = DEFAULT_CALIB,
    nsamples: int = DEFAULT_NSAMPLES,
    seqlen: int = DEFAULT_CALIB_SEQLEN,
    seed: int = DEFAULT_CALIB_SEED,
    datasets: Sequence[str] = ("wiki",),
    tasks: Sequence[str] = (),
    eval_seqlen: int | None = None,
    max_chunks: int | None = None,
    limit: int | None = None,
    task_seed: int = DEFAULT_TASK_SEED,
    prompt_style: str = DEFAULT_PROMPT_STYLE,
    metric: str = "acc_norm",
    out: str | Path = "runs/compare",
    device: str = "auto",
    dtype: str = "auto",
    sds: SDS | None = None,
    owl: OWL | None = None,
    keep_models: bool = False,
    progress: bool = True,
) -> dict:
    """Run (or resume) a comparison in ``out`` and return the aggregated results.

    ``sds`` holds the settings every ``sds:<base>`` run starts from, ``owl`` those of every
    ``+owl`` run (default: the paper's); a method string's own options win over them.
    ``metric`` (``acc`` or ``acc_norm``) is the accuracy the table and plots show; both are
    stored, so changing it re-uses every finished run. ``keep_models`` keeps each pruned model
    in ``out/pruned/`` (compact sparse checkpoint), so that evaluating it later on other tasks,
    corpora or settings needs no pruning; evaluations are stored one by one in ``out/evals/``
    either way, so only the missing ones are computed.
    """
    from sdsprune.data import load_corpus
    from sdsprune.evaluate.zeroshot import check_task_data, check_task_names, expand_suites

    shared = {SDS.name: sds or SDS(), OWL.name: owl or OWL()}
    runs = parse_runs(methods, sparsities, {k: changed_settings(v) for k, v in shared.items()})
    for name in datasets:  # fail on a bad corpus or task name before any pruning
        load_corpus(name, "eval")
    tasks = expand_suites(tasks)
    check_task_names(tasks, prompt_style)
    check_task_data(tasks)  # standard tasks: their data, or one error naming what is missing
    if metric not in METRICS:
        raise SdspruneError(f"unknown metric '{metric}': choose one of {', '.join(METRICS)}")
    settings = {
        "format": RUN_FORMAT,
        "model": model,
        "calib": calib,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "datasets": list(datasets),
        "tasks": list(tasks),
        "eval_seqlen": eval_seqlen or seqlen,
        "max_chunks": max_chunks,
        "limit": limit,
        "task_seed": task_seed,
        "prompt_style": prompt_style if tasks else None,
        "metric": metric,
        "dtype": _load_dtype(dtype, device),  # resolved: "auto" and its meaning match
        # every knob, the defaults spelled out too: a run computed under another release's
        # defaults is then recomputed instead of silently reused
        **{name: settings_of(config) for name, config in shared.items()},
    }
    folder = claim_work_folder(
        out,
        flag="--out",
        marker=COMPARE_MARKER,
        earlier_signs=(RUNS_DIR,),
        protected={"the model": _local_folder(model)},
    )
    (folder / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    done = {run.key: result for run in runs if (result := _finished(folder, run, settings))}
    pending = [run for run in runs if run.key not in done]
    if done:
        log.info(
            "resuming in %s: %d run(s) already finished (%s)", folder, len(done), ", ".join(done)
        )
    context = _Context(
        folder=folder,
        settings=settings,
        windows=functools.cache(lambda: _calibration(model, calib, nsamples, seqlen, seed)),
        device=device,
        dtype=dtype,
        progress=progress,
        keep_models=keep_models,
    )
    started = time.perf_counter()
    for number, run in enumerate(pending, start=1):
        _log_progress(number, len(pending), run, started)
        done[run.key] = _execute(run, context)
    records = [done[run.key] for run in runs]
    results = {
        "settings": settings,
        "runs": [_without_items(record) for record in records],
        "paired": paired_comparisons(records, settings, metric),
        "versions": library_versions(),
    }
    write_outputs(folder, results)
    return results


def _without_items(record: dict) -> dict:
    """A run's record without its per-chunk and per-example values: they stay in the run's
    file (for paired statistics) and would bury the summary in results.json."""
    tasks = [{k: v for k, v in row.items() if k != "per_example"} for row in record["tasks"]]
    return {**{k: v for k, v in record.items() if k != "chunk_nll"}, "tasks": tasks}


# ----------------------------------------------------------------------------- resume
def _local_folder(model: str) -> Path | None:
    """The model as a local path, when it is one (its folder must not hold the results)."""
    path = Path(model).expanduser()
    return path if path.exists() else None


def run_file(folder: Path, run: Run) -> Path:
    return folder / RUNS_DIR / f"{run.key}.json"


def _finished(folder: Path, run: Run, settings: dict) -> dict | None:
    """The stored result of ``run`` if it was computed with exactly these settings."""
    path = run_file(folder, run)
    stored = read_json(path)
    if stored is None:
        return None
    previous, wanted = stored.get("settings"), _settings_for(run, settings)
    same = isinstance(previous, dict) and _run_settings(run, _upgraded(previous)) in (
        wanted,
        earlier_form(wanted),  # SDS/OWL defaults stored as None by earlier releases
    )
    if not same:
        log.info("%s was computed with other settings: recomputing it", path.name)
        return None
    return stored


def _upgraded(stored: dict) -> dict:
    """Settings of a run file written before prompt styles existed, in today's terms.

    Such files were scored with BIG-bench's own prompts (choices listed), which is what
    ``prompt_style="bigbench"`` still produces, so their results stay reusable.
    """
    if "prompt_style" in stored:
        return stored
    return {**stored, "prompt_style": "bigbench" if stored.get("tasks") else None}


def _run_settings(run: Run, settings: dict) -> dict:
    """What a run's result depends on: dense ignores calibration, only SDS runs use ``sds``
    and only OWL runs ``owl``."""
    ignored = DISPLAY_ONLY + (CALIBRATION_ONLY if run.method is None else ())
    ignored += tuple({SDS.name, OWL.name} - run.uses)
    return {k: v for k, v in settings.items() if k not in ignored}


def _settings_for(run: Run, settings: dict) -> dict:
    """The settings a run is computed with: the comparison's, with the run's own SDS and
    OWL settings (its method string may change some of the shared ones)."""
    own = report_settings(run.method) if run.method is not None else {}
    return _run_settings(run, {**settings, **{name: own[name] for name in run.uses}})


# ----------------------------------------------------------------------------- running
def _calibration(model: str, calib: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The windows every method prunes with (sampled once; a run only needs the tokenizer)."""
    from sdsprune.data import load_corpus, sample_calibration
    from sdsprune.models.loading import load_tokenizer, resolve_model_folder

    folder = resolve_model_folder(model)
    tokenizer = load_tokenizer(str(folder) if folder is not None else model)
    return sample_calibration(load_corpus(calib, "calib"), tokenizer, nsamples, seqlen, seed)


def _log_progress(number: int, total: int, run: Run, started: float) -> None:
    elapsed = time.perf_counter() - started
    eta = ""
    if number > 1:
        left = elapsed / (number - 1) * (total - number + 1)
        eta = f" (elapsed {_duration(elapsed)}, about {_duration(left)} left)"
    sparsity = f" at {run.sparsity}" if run.sparsity else ""
    log.info("run %d/%d: %s%s%s", number, total, run.label, sparsity, eta)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass
class _Context:
    """What every run of one comparison shares."""

    folder: Path
    settings: dict
    windows: Callable[[], torch.Tensor]  # the calibration windows, sampled on first use
    device: str
    dtype: str
    progress: bool
    keep_models: bool


def _execute(run: Run, context: _Context) -> dict:
    """Evaluate what is not stored yet (pruning first, unless the pruned model was kept), then
    assemble the run's record from its stored pieces and write the run's file atomically."""
    from sdsprune.utils import resolve_device

    run_settings = _settings_for(run, context.settings)
    store = RunStore(context.folder, run.key, run_settings)
    missing = [key for key in evaluation_keys(run_settings) if store.evaluation(key) is None]
    pruned = store.prune_record()
    if missing or pruned is None:
        loaded, pruned = _model(run, store, context)
        loaded.model.to(resolve_device(context.device))
        for key in missing:
            store.save_evaluation(key, _evaluate(loaded, key, context.progress))
        del loaded
    record = _assemble(run, store, pruned)
    write_json_atomic(run_file(context.folder, run), record)
    return record


def _model(run: Run, store, context: _Context) -> tuple[LoadedModel, dict]:
    """The run's model and its prune record: dense, a kept pruned model, or pruned now (and
    kept when asked)."""
    settings = context.settings
    if run.method is None:
        loaded = load_model(
            settings["model"], device="cpu", dtype=_load_dtype(context.dtype, context.device)
        )
        store.save_prune_record({"report": {}, "figures": [], "seconds": None})
        return loaded, store.prune_record()
    kept = store.kept_model(context.device)
    if kept is not None:
        return kept, store.prune_record()
    from sdsprune.options import Calibration, RunOptions
    from sdsprune.prune import prune

    start = time.perf_counter()
    result = prune(
        settings["model"],
        run.method,
        sparsity=run.sparsity,
        calibration=Calibration(windows=context.windows(), seed=settings["seed"]),
        run=RunOptions(device=context.device, dtype=context.dtype, progress=context.progress),
    )
    seconds = time.perf_counter() - start
    report = result.report
    store.save_prune_record(
        {
            "report": {
                k: report[k] for k in ("summary", "timings", "memory", "owl") if k in report
            },
            "figures": _save_figures(context.folder, run, report.pop("_figures", {})),
            "seconds": round(seconds, 2),
        }
    )
    if context.keep_models:
        store.keep_model(result.model)
    return result.model, store.prune_record()


def _assemble(run: Run, store, pruned: dict) -> dict:
    """A run's record from its prune record and its stored evaluations, in settings order."""
    perplexity: dict[str, float] = {}
    chunk_nll: dict[str, list[float]] = {}
    tasks: list[dict] = []
    evaluation_seconds = 0.0
    for key in evaluation_keys(store.settings):
        result = store.evaluation(key)
        if key["kind"] == "perplexity":
            perplexity[key["dataset"]] = result["perplexity"]
            chunk_nll[key["dataset"]] = result["chunk_nll"]
            evaluation_seconds += result["seconds"]
            continue
        for row in result["rows"]:
            if all(row["task"] != seen["task"] for seen in tasks):
                tasks.append(row)
                evaluation_seconds += 0 if row["subtasks"] else row["seconds"]
    return {
        "run": run.record(),
        "label": run.label,
        "key": run.key,
        "settings": store.settings,
        "perplexity": perplexity,
        "chunk_nll": chunk_nll,
        "tasks": tasks,
        "prune": pruned["report"],
        "figures": pruned["figures"],
        "seconds": {
            "prune": pruned["seconds"],
            "total": round((pruned["seconds"] or 0) + evaluation_seconds, 2),
        },
    }


def _load_dtype(dtype: str, device: str) -> str:
    from sdsprune.utils import resolve_device

    if dtype != "auto":
        return dtype
    return "bfloat16" if resolve_device(device).type == "cuda" else "float32"


def _evaluate(loaded: LoadedModel, key: dict, progress: bool) -> dict:
    """One stored evaluation: a corpus's perplexity (with its chunk NLLs) or a task's rows."""
    from sdsprune.api import evaluate_model
    from sdsprune.evaluate.zeroshot import evaluate_tasks

    if key["kind"] == "perplexity":
        report = evaluate_model(
            loaded,
            datasets=[key["dataset"]],
            seqlen=key["eval_seqlen"],
            max_chunks=key["max_chunks"],
            progress=progress,
        )
        (row,) = report["results"]
        return {k: row[k] for k in ("perplexity", "chunk_nll", "seconds")}
    rows = evaluate_tasks(
        loaded,
        [key["task"]],
        limit=key["limit"],
        seed=key["task_seed"],
        prompt_style=key["prompt_style"],
        progress=progress,
    )["tasks"]
    return {"rows": rows}


def _save_figures(folder: Path, run: Run, figures: dict) -> list[str]:
    """Figures a method produced (SDS: weight distributions), named after the run."""
    saved = []
    for filename, png in figures.items():
        target = folder / FIGURES_DIR / f"{run.key}-{filename}"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.stem}.tmp.png")
        tmp.write_bytes(png)
        os.replace(tmp, target)
        saved.append(str(target.relative_to(folder)))
    return saved


# ----------------------------------------------------------------------------- outputs
def write_outputs(folder: Path, results: dict) -> None:
    """results.json, results.md and the plots, each replaced atomically."""
    write_json_atomic(folder / "results.json", results)
    plots = [perplexity_plot(folder, results)]
    if results["settings"]["tasks"]:
        plots.append(accuracy_plot(folder, results))
    markdown = results_markdown(results, [p for p in plots if p is not None])
    tmp = folder / ".results.md.tmp"
    tmp.write_text(markdown)
    os.replace(tmp, folder / "results.md")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def default_out(model: str) -> Path:
    """``runs/compare-<model>``: one folder per model, so resuming finds its own runs."""
    return Path("runs") / f"compare-{slug(Path(model).name or model)}"
