"""The plots of a comparison: perplexity (and accuracy) per method and sparsity."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from sdsprune.compare.paired import find, primary_reference
from sdsprune.compare.report import mean_accuracy, shown_metric

# One colour per method across every plot, so a reader matches bars at a glance.
_COLORS = {
    "dense": "#555555",
    "magnitude": "#bbbbbb",
    "wanda": "#6baed6",
    "sparsegpt": "#fd8d3c",
    "sds:magnitude": "#888888",
    "sds:wanda": "#08519c",
    "sds:sparsegpt": "#a63603",
    "admm": "#74c476",
    "sds:admm": "#006d2c",
    "dsnot": "#bcbddc",
    "sds:dsnot": "#54278f",
    "pruner-zero": "#fa9fb5",
    "sds:pruner-zero": "#ae017e",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def perplexity_plot(folder: Path, results: dict) -> str | None:
    """Grouped bars: one group per sparsity, one bar per method, one panel per corpus; dense
    is a dashed line. Log scale, because magnitude pruning can be 100x worse than the rest."""
    datasets = results["settings"]["datasets"]
    if not datasets:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(datasets), figsize=(7.6 * len(datasets), 4.4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        values = _bars(
            ax,
            results,
            lambda run, d=dataset: run["perplexity"].get(d),
            "{:.1f}",
            lambda run, value, d=dataset: error_bar(results, run, d, value),
        )
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        if values:  # room above the tallest bar for its label, in log space
            low, high = min(values), max(values)
            ax.set_ylim(low / (high / low) ** 0.08 / 1.02, high * (high / low) ** 0.12 * 1.02)
        ax.set_ylabel(f"{dataset} perplexity (log scale, lower is better)")
        ax.set_title(f"Perplexity on {dataset}")
    return _save(fig, folder / "perplexity.png", folder)


def _plain_log_ticks(ax) -> None:
    """Tick labels such as 20, 50, 100 instead of 2x10^1 on a log axis."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda y, _pos: f"{y:.4g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)


def accuracy_plot(folder: Path, results: dict) -> str | None:
    """Mean zero-shot accuracy per method and sparsity, with the mean chance level."""
    metric = shown_metric(results["settings"])
    tasks = results["settings"]["tasks"]
    what = "mean" if len(tasks) > 1 else tasks[0]  # the paired interval of what is plotted
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 4.4))
    values = _bars(
        ax,
        results,
        lambda run: _percent(mean_accuracy(run, metric)),
        "{:.1f}",
        lambda run, value: error_bar(results, run, what, value),
    )
    chance = _mean_baseline(results)
    if chance is not None:
        label = f"chance {100 * chance:.1f}\n(uniform or\nconstant guess)"
        ax.axhline(100 * chance, color="black", linestyle=":", linewidth=1, label=label)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        values.append(100 * chance)
    if values:  # zoom on the range that matters: differences of a few points must show
        low, high = min(values), max(values)
        ax.set_ylim(max(0.0, low - 10), min(100.0, high + 5))
    ax.set_ylabel(f"mean {metric}, % (higher is better)")
    names = ", ".join(task.removeprefix("bigbench:") for task in tasks)
    title = textwrap.fill(f"Zero-shot accuracy ({len(tasks)} tasks): {names}", width=90)
    ax.set_title(title, fontsize=8)  # wrapped: a suite's names are wider than the figure
    return _save(fig, folder / "accuracy.png", folder)


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _mean_baseline(results: dict) -> float | None:
    from sdsprune.evaluate.zeroshot import blind_baseline

    requested = set(results["settings"]["tasks"])
    runs = results["runs"]
    if not runs:
        return None
    chances = [blind_baseline(row) for row in runs[0]["tasks"] if row["task"] in requested]
    if not chances or None in chances:
        return None
    return sum(chances) / len(chances)


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


def _bars(ax, results: dict, value_of, fmt: str, errors_of=None) -> list[float]:
    """Draw the grouped bars and the dense line; return every plotted value.

    ``errors_of(run, value)`` gives a bar's error bar (below, above), or None."""
    runs = results["runs"]
    dense = next((run for run in runs if run["run"]["method"] == "dense"), None)
    pruned = [run for run in runs if run["run"]["method"] != "dense"]
    sparsities = list(dict.fromkeys(run["run"]["sparsity"] for run in pruned))
    labels = list(dict.fromkeys(run["label"] for run in pruned))
    width = 0.8 / max(len(labels), 1)
    plotted: list[float] = []
    for i, label in enumerate(labels):
        xs, heights, errors = [], [], []
        for j, sparsity in enumerate(sparsities):
            run = next(
                (r for r in pruned if r["label"] == label and r["run"]["sparsity"] == sparsity),
                None,
            )
            value = value_of(run) if run is not None else None
            if value is not None:
                xs.append(j + (i - (len(labels) - 1) / 2) * width)
                heights.append(value)
                error = errors_of(run, value) if errors_of is not None else None
                errors.append(error or (0.0, 0.0))
        plotted += heights + [h + e[1] for h, e in zip(heights, errors, strict=True)]
        yerr = [[e[0] for e in errors], [e[1] for e in errors]] if any(map(any, errors)) else None
        bars = ax.bar(
            xs, heights, width, label=label, color=_COLORS.get(label), yerr=yerr, capsize=3
        )
        if yerr is not None:
            ax.set_xlabel(
                "error bars: 95% paired interval of the difference to the base method (SDS) "
                "or to dense",
                fontsize=8,
            )
        ax.bar_label(bars, labels=[fmt.format(h) for h in heights], fontsize=7, padding=1)
    if dense is not None and value_of(dense) is not None:
        plotted.append(value_of(dense))
        ax.axhline(
            value_of(dense),
            color=_COLORS["dense"],
            linestyle="--",
            linewidth=1.2,
            label=f"dense {fmt.format(value_of(dense))}",
        )
    ax.set_xticks(range(len(sparsities)), [f"sparsity {s}" for s in sparsities])
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.set_axisbelow(True)
    if labels:  # outside the axes, so it never hides a bar
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return plotted


def _save(fig, target: Path, folder: Path) -> str:
    plt = _pyplot()
    tmp = target.with_name(f".{target.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, target)
    return str(target.relative_to(folder))
