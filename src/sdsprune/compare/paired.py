"""Paired differences between the runs of a comparison: which run is compared with which.

Every run is scored on the same chunks and the same examples, so each pruned run is compared
item by item (see :mod:`sdsprune.stats`) with dense, for ``sds:<base>`` with its
base method at the same sparsity, and for an OWL run with the same run at uniform sparsity
(what OWL adds): perplexity as a ratio, accuracy as a difference in points, each with a 95%
paired bootstrap interval. An SDS run also gets, per corpus, the share of its base's
log-perplexity gap to dense that it closes (when dense is in the comparison).
"""

from __future__ import annotations

from sdsprune.stats import (
    RESAMPLES,
    SEED,
    Stratum,
    accuracy_difference,
    gap_closed,
    perplexity_ratio,
)


def reference_pairs(runs: list[dict]) -> list[tuple[dict, dict]]:
    """(run, reference) pairs: each SDS run against its base at the same sparsity, each OWL run
    against the same method at uniform sparsity, then each pruned run against dense."""
    dense = _dense_run(runs)
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
    return _base_run(run, runs) or _dense_run(runs)


def _dense_run(runs: list[dict]) -> dict | None:
    return next((run for run in runs if run["run"]["method"] == "dense"), None)


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
    suite mean (``metric``), as interval dicts; None where the items do not match. An SDS run
    against its base also gets the share of the gap to dense it closes per corpus
    (``gap_closed``; None for other pairs and without a dense run)."""
    requested = list(settings["tasks"])
    dense = _dense_run(runs)
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
                "gap_closed": (
                    _gaps_closed(run, reference, dense, settings["datasets"])
                    if dense is not None and reference is _base_run(run, runs)
                    else None
                ),
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


def _gaps_closed(run: dict, base: dict, dense: dict, datasets: list[str]) -> dict:
    """Per corpus: the share of ``base``'s log-perplexity gap to ``dense`` that ``run`` closes;
    None where the chunks do not match or the base is not clearly worse than dense."""
    shares = {}
    for dataset in datasets:
        nll = [r.get("chunk_nll", {}).get(dataset) for r in (run, base, dense)]
        paired = all(nll) and len({len(values) for values in nll}) == 1
        interval = gap_closed(*nll) if paired else None
        shares[dataset] = None if interval is None else interval.to_dict()
    return shares


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


def find(comparisons: list[dict], run: dict, reference: dict | None) -> dict | None:
    """The comparison of ``run`` with ``reference`` among ``comparisons``, if there is one."""
    if reference is None:
        return None
    return next(
        (c for c in comparisons if c["run"] == run["key"] and c["reference"] == reference["key"]),
        None,
    )
