"""What a comparison shows in ``results.md``: the method x sparsity table laid out like the
pruning papers', each pruned value with its paired interval, every paired difference in words,
and the cost of each run."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from sdsprune.compare.paired import find, primary_reference

# The accuracies a table can show, as its caption names them.
METRICS = {
    "acc_norm": "lm-evaluation-harness acc_norm: answer log-likelihood per byte",
    "acc": "lm-evaluation-harness acc: total answer log-likelihood",
}


_OPTIONED_PART = re.compile(r"([\w-]+)\[([^\]]*)\]")  # a method-string part with options


def task_columns(results: dict) -> list[str]:
    """Task rows shown as columns: leaves and composite means, in the order first seen."""
    names: dict[str, None] = {}
    for run in results["runs"]:
        for row in run["tasks"]:
            names.setdefault(row["task"], None)
    return list(names)


def mean_accuracy(run: dict, metric: str = "acc_norm") -> float | None:
    """Mean ``metric`` over the requested tasks (a composite counts once, as its mean)."""
    requested = set(run["settings"]["tasks"])
    rows = [row for row in run["tasks"] if row["task"] in requested]
    return sum(row[metric] for row in rows) / len(rows) if rows else None


def shown_metric(settings: dict) -> str:
    """The accuracy a table shows; results written before the choice existed showed acc."""
    return settings.get("metric", "acc")


def results_markdown(results: dict, plots: Sequence[str] = ()) -> str:
    """A table laid out like the pruning papers': method x sparsity, perplexity then accuracy,
    each pruned value with its paired interval; then every paired difference in words."""
    settings = results["settings"]
    datasets = settings["datasets"]
    tasks = [t for t in task_columns(results) if t in settings["tasks"]]
    metric = shown_metric(settings)
    paired = results.get("paired") or []
    gaps = any(c.get("gap_closed") for c in paired)  # absent from results of earlier releases
    columns = ("PPL ↓", "gap closed ↑") if gaps else ("PPL ↓",)
    header = ["Method", "Sparsity", *(f"{d} {column}" for d in datasets for column in columns)]
    header += [_short_task(t) + " ↑" for t in tasks]
    with_mean = len(tasks) > 1  # a mean over one task would repeat its column
    if with_mean:
        header.append(f"Mean {metric} ↑")
    lines = [f"# Pruning comparison: {settings['model']}", "", _protocol_line(settings), ""]
    lines += [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
    ]
    best = _best_per_sparsity(results["runs"], datasets)
    for run in results["runs"]:
        cells = [_method_name(run), run["run"]["sparsity"] or "0%"]
        for dataset in datasets:
            value = run["perplexity"].get(dataset)
            text = "—" if value is None else f"{value:.2f}"
            note = cell_note(paired, run, results["runs"], dataset)
            cells.append((f"**{text}**" if (run["key"], dataset) in best else text) + note)
            if gaps:
                cells.append(gap_cell(paired, run, results["runs"], dataset))
        by_task = {row["task"]: row for row in run["tasks"]}
        for task in tasks:
            note = "" if with_mean else cell_note(paired, run, results["runs"], task)
            cells.append(f"{100 * by_task[task][metric]:.1f}{note}" if task in by_task else "—")
        if with_mean:
            mean = mean_accuracy(run, metric)
            note = cell_note(paired, run, results["runs"], "mean")
            cells.append("—" if mean is None else f"{100 * mean:.1f}{note}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Bold: lowest perplexity at that sparsity. Accuracies in % ({METRICS[metric]})."]
    if paired:
        lines.append(
            "In parentheses: the paired difference to the base method (SDS rows) or to dense "
            "(other rows), perplexity as a ratio and accuracy in points, with its 95% interval "
            "(see Paired differences)."
        )
    if gaps:
        lines.append(
            "Gap closed: the share of the base method's log-perplexity gap to dense that SDS "
            "closes, ln(PPL base / PPL SDS) / ln(PPL base / PPL dense) (100%: as good as dense, "
            "0%: no better than the base), with its 95% paired interval; — for runs without a "
            "base method, or where the base is not clearly worse than dense."
        )
    if tasks:
        lines.append(_task_note(results, tasks))
    lines += markdown_section(results, _name_with_sparsity)
    lines += [
        "",
        "## Cost",
        "",
        "| Method | Sparsity | prune s | total s | achieved sparsity |",
        "|---|---|---:|---:|---:|",
    ]
    for run in results["runs"]:
        achieved = run["prune"].get("summary", {}).get("sparsity")
        lines.append(
            f"| {_method_name(run)} | {run['run']['sparsity'] or '0%'} | "
            f"{_seconds(run['seconds']['prune'])} | {run['seconds']['total']:.0f} | "
            + ("—" if achieved is None else f"{100 * achieved:.1f}%")
            + " |"
        )
    figures = [f for run in results["runs"] for f in run["figures"]]
    if plots or figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in [*plots, *figures]]
    return "\n".join(lines) + "\n"


def _name_with_sparsity(run: dict) -> str:
    return f"{_method_name(run)} {run['run']['sparsity'] or ''}".strip()


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def _method_name(run: dict) -> str:
    method, base = run["run"]["method"], run["run"]["base"]
    names = {
        "dense": "Dense",
        "magnitude": "Magnitude",
        "wanda": "Wanda",
        "sparsegpt": "SparseGPT",
        "admm": "ADMM",
        "dsnot": "DSnoT",
        "pruner-zero": "Pruner-Zero",
    }
    name = f"SDS ({names.get(base, base)})" if method == "sds" else names.get(method, method)
    options = _method_options(run.get("label", ""))
    return name + (f" [{options}]" if options else "") + (" + OWL" if run["run"].get("owl") else "")


def _method_options(label: str) -> str:
    """The options every part of a method string sets, the outer method's plain and the
    others' after their name (``sds[adjust=never]:wanda[alpha=2]+owl[lam=0.1]`` ->
    ``adjust=never; wanda: alpha=2; owl: lam=0.1``): two rows of one method with other
    settings must not read alike in the tables."""
    parts = _OPTIONED_PART.findall(label)
    outer = label.split(":", 1)[0].split("+", 1)[0].split("[", 1)[0]
    return "; ".join(options if name == outer else f"{name}: {options}" for name, options in parts)


def _short_task(task: str) -> str:
    return task.removeprefix("bigbench:")


def _protocol_line(settings: dict) -> str:
    chunks = "all" if settings["max_chunks"] is None else f"first {settings['max_chunks']}"
    text = (
        f"Calibration: {settings['nsamples']} x {settings['seqlen']} tokens of `{settings['calib']}` "
        f"(seed {settings['seed']}), the same windows for every method. Perplexity: "
        f"{settings['eval_seqlen']}-token chunks ({chunks})."
    )
    if settings["tasks"]:
        limit = (
            "all examples"
            if settings["limit"] is None
            else f"at most {settings['limit']} examples per task"
        )
        text += (
            f" Zero-shot: {limit} (seed {settings['task_seed']}), "
            f"{settings['prompt_style']} prompts."
        )
    return text


def _task_note(results: dict, tasks: list[str]) -> str:
    dense = next((run for run in results["runs"] if run["run"]["method"] == "dense"), None)
    rows = {row["task"]: row for row in (dense or results["runs"][0])["tasks"]}
    parts = [_baselines(_short_task(t), rows[t]) for t in tasks if t in rows]
    parts = [part for part in parts if part]
    key = shown_metric(results["settings"]) + "_stderr"
    errors = [rows[t][key] for t in tasks if t in rows and rows[t].get(key)]
    note = (
        "Chance level (uniform guess; constant answer where a task has one answer set): "
        f"{', '.join(parts)}."
        if parts
        else ""
    )
    if errors:  # small --limit values make accuracies noisy; say how noisy
        note += f" One standard error: about {100 * max(errors):.1f} points."
    return note.strip()


def _baselines(task: str, row: dict) -> str:
    from sdsprune.evaluate.zeroshot import baselines

    values = baselines(row)
    return f"{task} {' / '.join(f'{100 * v:.1f}' for v in values)}" if values else ""


def _best_per_sparsity(runs: list[dict], datasets: Sequence[str]) -> set[tuple[str, str]]:
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for run in runs:
        sparsity = run["run"]["sparsity"]
        if sparsity is None:
            continue
        for dataset in datasets:
            value = run["perplexity"].get(dataset)
            key = (sparsity, dataset)
            if value is not None and (key not in best or value < best[key][0]):
                best[key] = (value, run["key"])
    return {(key, dataset) for (_sparsity, dataset), (_value, key) in best.items()}


# ----------------------------------------------------------------------------- paired differences
def ratio_text(interval: dict) -> str:
    """``0.86x, 95% CI 0.83-0.88``."""
    return f"{interval['estimate']:.2f}x, 95% CI {interval['low']:.2f}-{interval['high']:.2f}"


def points_text(interval: dict) -> str:
    """``+1.2, 95% CI -0.3 to +2.7`` (percentage points)."""
    low, high = 100 * interval["low"], 100 * interval["high"]
    return f"{100 * interval['estimate']:+.1f}, 95% CI {low:+.1f} to {high:+.1f}"


def share_text(interval: dict) -> str:
    """``32% (95% CI 28 to 36%)`` (a share of the gap to dense; "to", as a bound may be
    negative)."""
    low, high = 100 * interval["low"], 100 * interval["high"]
    return f"{100 * interval['estimate']:.0f}% (95% CI {low:.0f} to {high:.0f}%)"


def verdict(interval: dict) -> str:
    """Plain words for a reader who does not read intervals."""
    if interval["significant"]:
        return "significant"
    return "not significant (the interval includes no difference)"


def cell_note(comparisons: list[dict], run: dict, runs: list[dict], what: str) -> str:
    """`` (0.86x, 95% CI ...)`` after a table value: ``what`` is a corpus, a task or "mean",
    compared with the run's primary reference; empty when there is none."""
    comparison = find(comparisons, run, primary_reference(run, runs))
    if comparison is None:
        return ""
    if what in comparison["perplexity"]:
        interval = comparison["perplexity"][what]
        return "" if interval is None else f" ({ratio_text(interval)})"
    interval = comparison["mean"] if what == "mean" else comparison["tasks"].get(what)
    return "" if interval is None else f" ({points_text(interval)})"


def gap_cell(comparisons: list[dict], run: dict, runs: list[dict], dataset: str) -> str:
    """``32% (95% CI 28 to 36%)``: the share of the gap to dense a run closes on ``dataset``,
    against its base method; a dash without one (or without dense)."""
    comparison = find(comparisons, run, primary_reference(run, runs)) or {}
    interval = (comparison.get("gap_closed") or {}).get(dataset)
    return _or_dash(interval, share_text)


def markdown_section(results: dict, name_of) -> list[str]:
    """A "Paired differences" section: one table row and one plain sentence per pair."""
    comparisons = results.get("paired") or []
    if not comparisons:
        return []
    by_key = {run["key"]: run for run in results["runs"]}
    datasets = results["settings"]["datasets"]
    tasks = list(comparisons[0]["tasks"])
    with_mean = any(c["mean"] is not None for c in comparisons)
    header = ["Method", "vs", *(f"{d} PPL ratio" for d in datasets)]
    header += [f"{t.removeprefix('bigbench:')} Δ points" for t in tasks]
    header += [f"Mean {comparisons[0]['metric']} Δ points"] if with_mean else []
    lines = [
        "",
        "## Paired differences",
        "",
        "Each pruned model against its base method (SDS), against the same method at uniform "
        f"sparsity (OWL) and against dense, on the same chunks "
        f"and examples: 95% paired bootstrap intervals ({comparisons[0]['resamples']} "
        f"resamples, seed {comparisons[0]['seed']}; tasks resampled within each task). A "
        "perplexity ratio below 1 and an accuracy difference above 0 favour the method.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
    ]
    sentences = []
    for comparison in comparisons:
        run, reference = by_key[comparison["run"]], by_key[comparison["reference"]]
        cells = [name_of(run), name_of(reference)]
        cells += [_or_dash(comparison["perplexity"][d], ratio_text) for d in datasets]
        cells += [_or_dash(comparison["tasks"].get(t), points_text) for t in tasks]
        if with_mean:
            cells.append(_or_dash(comparison["mean"], points_text))
        lines.append("| " + " | ".join(cells) + " |")
        sentences.append(_sentence(comparison, name_of(run), name_of(reference), datasets))
    return [*lines, "", *sentences]


def _or_dash(interval: dict | None, text) -> str:
    return "—" if interval is None else text(interval)


def _sentence(comparison: dict, run: str, reference: str, datasets: list[str]) -> str:
    """``- SDS (SparseGPT) 2:4 vs SparseGPT 2:4: wiki perplexity 0.86x (95% CI 0.83-0.88):
    significant; mean accuracy +0.4 points (95% CI -1.0 to +1.8): not significant (...).``"""
    parts = []
    gaps = comparison.get("gap_closed") or {}
    for dataset in datasets:
        if (i := comparison["perplexity"][dataset]) is not None:
            parts.append(
                f"{dataset} perplexity {i['estimate']:.2f}x (95% CI {i['low']:.2f}-"
                f"{i['high']:.2f}): {verdict(i)}"
            )
        if (share := gaps.get(dataset)) is not None:
            parts.append(f"closes {share_text(share)} of the {dataset} gap to dense")
    accuracy = comparison["mean"] or next(iter(comparison["tasks"].values()), None)
    if accuracy is not None:
        label = "mean accuracy" if comparison["mean"] else "accuracy"
        est, low, high = (100 * accuracy[k] for k in ("estimate", "low", "high"))
        parts.append(
            f"{label} {est:+.1f} points (95% CI {low:+.1f} to {high:+.1f}): {verdict(accuracy)}"
        )
    return f"- {run} vs {reference}: " + ("; ".join(parts) or "no paired data") + "."
