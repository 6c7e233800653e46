"""``compare()``: dense and several pruning methods at several sparsities, side by side.

Every method prunes a fresh copy of the model on the *same* calibration windows (sampled
once), then each result is evaluated with the same corpora and tasks. Each finished run is
written to ``<out>/runs/<run>.json`` atomically, so an interrupted comparison resumes where it
stopped: runs whose file exists with the same settings are not recomputed. Each evaluation
(and, with ``keep_models``, each pruned model) is stored on its own, so a changed task list or
evaluation setting computes only what is missing. At the end the folder gets
``results.json``, ``results.md`` (a table laid out like the papers', with paired bootstrap
intervals) and plots.

The parts: :mod:`~sdsprune.compare.run` (the driver), :mod:`~sdsprune.compare.store` (what a
folder keeps between invocations), :mod:`~sdsprune.compare.paired` (which run is compared with
which, with :mod:`sdsprune.stats`' intervals), :mod:`~sdsprune.compare.report` (the tables)
and :mod:`~sdsprune.compare.plots`.
"""

from sdsprune.compare.report import (
    METRICS,
    mean_accuracy,
    results_markdown,
    shown_metric,
    task_columns,
)
from sdsprune.compare.run import (
    CALIBRATION_ONLY,
    COMPARE_MARKER,
    DEFAULT_METHODS,
    DENSE,
    DISPLAY_ONLY,
    FIGURES_DIR,
    RUN_FORMAT,
    RUNS_DIR,
    Run,
    compare,
    default_out,
    parse_runs,
    run_file,
    slug,
    write_outputs,
)

__all__ = [
    "CALIBRATION_ONLY",
    "COMPARE_MARKER",
    "DEFAULT_METHODS",
    "DENSE",
    "DISPLAY_ONLY",
    "FIGURES_DIR",
    "METRICS",
    "RUNS_DIR",
    "RUN_FORMAT",
    "Run",
    "compare",
    "default_out",
    "mean_accuracy",
    "parse_runs",
    "results_markdown",
    "run_file",
    "shown_metric",
    "slug",
    "task_columns",
    "write_outputs",
]
