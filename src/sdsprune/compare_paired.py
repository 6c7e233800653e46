"""Paired differences between the runs of a comparison, and how the outputs show them.

Every run is scored on the same chunks and the same examples, so each pruned run is compared
item by item (see :mod:`sdsprune.stats`) with dense, for ``sds:<base>`` with its
base method at the same sparsity, and for an OWL run with the same run at uniform sparsity
(what OWL adds): perplexity as a ratio, accuracy as a difference in points, each with a 95%
paired bootstrap interval.
"""

from __future__ import annotations

from sdsprune.stats import RESAMPLES, SEED, Stratum, accuracy_difference, perplexity_ratio


def reference_pairs(runs: list[dict]) -> list[tuple[dict, dict]]:
    """(run, reference) pairs: each SDS run against its base at the same sparsity, each OWL run
    against the same method at uniform sparsity, then each pruned run against dense."""
    dense = next((run for run in runs if run["run"]["method"] == "dense"), None)
    pairs = []
    for run in runs:
        if run["run"]["method"] == "dense":
            continue
        for reference in (_base_run(run, runs), _uniform_run(run, runs)):
            if reference is not None:
                pairs.append((run, reference))
        if dense is not None:
            pairs.append((run, dense))
    return pairs


def primary_reference(run: dict, runs: list[dict]) -> dict | None:
    """What a run's table cell is compared with: its base for SDS (what SDS adds), else dense."""
    if run["run"]["method"] == "dense":
        return None
    return _base_run(run, runs) or next((r for r in runs if r["run"]["method"] == "dense"), None)


def _base_run(run: dict, runs: list[dict]) -> dict | None:
    if run["run"]["method"] != "sds":
        return None
    spec = run["run"]
    wanted = {"method": spec["base"], "base": None, "sparsity": spec["sparsity"]}
    if "owl" in spec:  # an OWL run's base is the same base pruner with OWL
        wanted["owl"] = spec["owl"]
    return next((r for r in runs if r["run"] == wanted), None)


def _uniform_run(run: dict, runs: list[dict]) -> dict | None:
    """The same method at the same total sparsity without OWL's per-block sparsities."""
    if not run["run"].get("owl"):
        return None
    wanted = {**run["run"], "owl": False}
    return next((r for r in runs if r["run"] == wanted), None)


def paired_comparisons(runs: list[dict], settings: dict, metric: str) -> list[dict]:
    """For each pair: perplexity ratios per corpus, accuracy differences per task and for the
    suite mean (``metric``), as interval dicts; None where the items do not match."""
    requested = list(settings["tasks"])
    comparisons = []
    for run, reference in reference_pairs(runs):
        tasks = {
            task: _accuracy(run, reference, [task], metric)
            for task in requested
            if _has_task(run, task) and _has_task(reference, task)
        }
        comparisons.append(
            {
                "run": run["key"],
                "reference": reference["key"],
                "perplexity": {
                    dataset: _ratio(run, reference, dataset) for dataset in settings["datasets"]
                },
                "tasks": tasks,
                "mean": _accuracy(run, reference, requested, metric) if len(tasks) > 1 else None,
                "metric": metric,
                "resamples": RESAMPLES,
                "seed": SEED,
            }
        )
    return comparisons


def _has_task(run: dict, task: str) -> bool:
    return any(row["task"] == task for row in run["tasks"])


def _ratio(run: dict, reference: dict, dataset: str) -> dict | None:
    method_nll = run.get("chunk_nll", {}).get(dataset)
    reference_nll = reference.get("chunk_nll", {}).get(dataset)
    if not method_nll or not reference_nll or len(method_nll) != len(reference_nll):
        return None
    return perplexity_ratio(method_nll, reference_nll).to_dict()


def _accuracy(run: dict, reference: dict, tasks: list[str], metric: str) -> dict | None:
    """The difference of the mean over ``tasks`` (a composite task: the mean of its subtasks),
    resampled within each leaf task; None when a leaf lacks matching per-example results."""
    strata = []
    for task in tasks:
        leaves = _leaves(run, task)
        for leaf in leaves:
            mine, theirs = _examples(run, leaf), _examples(reference, leaf)
            if mine is None or theirs is None or mine["doc_id"] != theirs["doc_id"]:
                return None
            strata.append(Stratum(mine[metric], theirs[metric], 1 / (len(tasks) * len(leaves))))
    return accuracy_difference(strata).to_dict() if strata else None


def _leaves(run: dict, task: str) -> list[str]:
    row = next(row for row in run["tasks"] if row["task"] == task)
    return row.get("subtasks") or [task]


def _examples(run: dict, task: str) -> dict | None:
    row = next((row for row in run["tasks"] if row["task"] == task), None)
    return None if row is None else row.get("per_example")


# ----------------------------------------------------------------------------- wording
def find(comparisons: list[dict], run: dict, reference: dict | None) -> dict | None:
    if reference is None:
        return None
    return next(
        (c for c in comparisons if c["run"] == run["key"] and c["reference"] == reference["key"]),
        None,
    )


def ratio_text(interval: dict) -> str:
    """``0.86x, 95% CI 0.83-0.88``."""
    return f"{interval['estimate']:.2f}x, 95% CI {interval['low']:.2f}-{interval['high']:.2f}"


def points_text(interval: dict) -> str:
    """``+1.2, 95% CI -0.3 to +2.7`` (percentage points)."""
    low, high = 100 * interval["low"], 100 * interval["high"]
    return f"{100 * interval['estimate']:+.1f}, 95% CI {low:+.1f} to {high:+.1f}"


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


def error_bar(results: dict, run: dict, what: str, value: float) -> tuple[float, float] | None:
    """(below, above) ``value`` for a plot's error bar: the interval of the run's difference to
    its primary reference, carried over to the bar (a ratio scales it, points shift it)."""
    runs = results["runs"]
    comparison = find(results.get("paired") or [], run, primary_reference(run, runs))
    if comparison is None:
        return None
    if what in comparison["perplexity"]:
        interval = comparison["perplexity"][what]
        if interval is None:
            return None
        scale = value / interval["estimate"]
        return value - scale * interval["low"], scale * interval["high"] - value
    interval = comparison["mean"] if what == "mean" else comparison["tasks"].get(what)
    if interval is None:
        return None
    return 100 * (interval["estimate"] - interval["low"]), 100 * (
        interval["high"] - interval["estimate"]
    )


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
    for dataset in datasets:
        if (i := comparison["perplexity"][dataset]) is not None:
            parts.append(
                f"{dataset} perplexity {i['estimate']:.2f}x (95% CI {i['low']:.2f}-"
                f"{i['high']:.2f}): {verdict(i)}"
            )
    accuracy = comparison["mean"] or next(iter(comparison["tasks"].values()), None)
    if accuracy is not None:
        label = "mean accuracy" if comparison["mean"] else "accuracy"
        est, low, high = (100 * accuracy[k] for k in ("estimate", "low", "high"))
        parts.append(
            f"{label} {est:+.1f} points (95% CI {low:+.1f} to {high:+.1f}): {verdict(accuracy)}"
        )
    return f"- {run} vs {reference}: " + ("; ".join(parts) or "no paired data") + "."
