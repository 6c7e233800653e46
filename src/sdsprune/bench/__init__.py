"""Inference benchmark: dense versus sparse backends, measured side by side in one run.

Every backend loads its own copy of the model; then each repeat runs every workload on
every backend in turn (the order rotates each repeat), so that load from other processes
on a shared machine hits all backends alike. Speedups are ratios of medians measured in
this run only, and a verdict says "faster"/"slower" only when an exact rank test
(:mod:`sdsprune.stats`) tells a backend's samples from dense's (at least 4 repeats).

Decode can be timed in two modes (see :mod:`sdsprune.inference.decode`): ``eager`` and
``static`` (a pre-allocated KV cache and a compiled decode step, which cut per-token
overhead that is not in the weights). Each backend is compared with dense in the same
mode, so a sparse speedup is not confused with the overhead cut, which is reported apart
(each backend's static time against its eager time).

The parts: :mod:`~sdsprune.bench.run` (loading, checking and timing),
:mod:`~sdsprune.bench.peers` (llama.cpp beside the backends) and
:mod:`~sdsprune.bench.report` (summary rows, the JSON file, the table and notes).
"""

from sdsprune.bench.report import (
    MIN_SAMPLES_FOR_VERDICT,
    VERDICT_LEVEL,
    render_notes,
    render_table,
    workload_label,
    write_json,
)
from sdsprune.bench.run import (
    SKIPPED_LINEARS,
    BenchSettings,
    bytes_ceilings,
    default_backends,
    run_bench,
)

__all__ = [
    "MIN_SAMPLES_FOR_VERDICT",
    "SKIPPED_LINEARS",
    "VERDICT_LEVEL",
    "BenchSettings",
    "bytes_ceilings",
    "default_backends",
    "render_notes",
    "render_table",
    "run_bench",
    "workload_label",
    "write_json",
]
