"""Where one decode step's time goes, per backend and thread count, and the 2:4 ceiling.

The default model (SmolLM2-135M) is magnitude-pruned to 2:4 (only the zeros matter for
speed), then each backend (``dense``, ``nm24``, optionally ``auto``) gets its own copy. One
decode step is batch 1, one new token on a KV cache of ``--prompt-tokens`` tokens; the cache
is cropped back after every step, so every step sees the same cache length. Per thread count
(``torch.set_num_threads``), rounds time every backend in turn (order rotating), so load from
elsewhere hits all backends alike; medians over the rounds after the warm-up ones.

Each round times one step twice:

- **plain**: ``time.perf_counter`` around the step, nothing else installed. This is the
  step's real wall time, the one speedups and the Amdahl fraction are computed from.
- **profiled**: under ``torch.profiler`` (CPU, no shapes or stacks), with forward hooks that
  open a ``record_function`` range named after the category of each module. Op self times
  are summed by the innermost category range around them: ``attention`` (the attention
  modules minus their linears: rotary, KV-cache update, SDPA/softmax; plus the model's rotary
  embedding) and ``other_ops`` (norms, activations, residual adds, masks, everything else).
  ``linears`` (the pruned block linears) and ``head_embeddings`` (LM head and token
  embeddings) are the inclusive durations of their modules' ranges instead, because the nm24
  kernel is a pybind call that the profiler does not see as an op: op self times would put
  its whole cost into overhead and flatter nm24. ``overhead`` is the profiled step's wall
  time minus the four categories: Python, the dispatcher and transformers' glue between ops.

Why the profiler and not only hooks with ``perf_counter``: hooks cannot tell an op's time
from the Python around it, and the issue asks for that framework overhead separately. The
profiler adds a cost per op, so the profiled wall time is longer than the plain one; the
report keeps both (``instrumentation_ratio``), the categories sum to the profiled wall time
(``overhead_uninstrumented_ms`` is the plain wall time minus the four categories; the real
overhead lies between the two, since the profiler inflates the categories a little and the
profiled overhead a lot), and the linear fraction ``p`` for Amdahl is the linears' time over
the *plain* wall time (the linears hold a handful of ops each, so their inclusive time is
barely inflated, while the profiled wall time carries the cost of every op of the step; if
anything, ``p`` and so the ceiling come out slightly high).

Amdahl: a kernel that makes the linears ``s`` times faster makes the step
``1 / ((1 - p) + p / s)`` times faster. Reported for s = 1.6 (a float32 2:4 weight reads
5 bytes per 2 dense weights instead of 8, so a memory-bound kernel gains at most 8/5) and for
s = infinity, next to the measured nm24 (and auto) step speedup.

``--wait-policy-check`` also times plain decode steps in subprocesses with
``OMP_WAIT_POLICY=PASSIVE`` (sdsprune's default, set on import) and ``ACTIVE`` (in the order
PASSIVE, ACTIVE, ACTIVE, PASSIVE, so that a linear drift in machine load cancels), since
the policy must be set before torch loads. Example (a few minutes on 2 idle cores)::

    python benchmarks/decode_profile.py --steps 20 --wait-policy-check
"""

from __future__ import annotations

import os

# As sdsprune sets it on import, so the threads behave as in a user's run; must come before
# torch loads, and an explicit OMP_WAIT_POLICY in the environment wins (the check uses that).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.autograd.profiler_util import FunctionEvent

import sdsprune
from sdsprune.bench import write_json
from sdsprune.inference import apply_backend, backend_report
from sdsprune.inference.decode import eager_step, new_cache, prefill
from sdsprune.inference.native import cpu_capability
from sdsprune.models import decoder_blocks
from sdsprune.runinfo import library_versions
from sdsprune.utils import torch_threads

CATEGORIES = ("linears", "head_embeddings", "attention", "other_ops", "overhead")
# categories timed as their modules' inclusive ranges (see the module docstring)
INCLUSIVE = ("linears", "head_embeddings")
SCOPE_PREFIX = "decode_profile:"
STEP_SCOPE = SCOPE_PREFIX + "step"
BANDWIDTH_SPEEDUP = 8 / 5  # float32: dense 8 bytes per 2 weights, packed 2:4 5 bytes
WAIT_POLICY_ORDER = ("PASSIVE", "ACTIVE", "ACTIVE", "PASSIVE")


def pruned_2of4_model(spec: str, seed: int = 0) -> nn.Module:
    """``spec`` in float32, magnitude-pruned to 2:4 (a few random calibration tokens suffice:
    magnitude ignores them)."""
    loaded = sdsprune.load_model(spec, device="cpu", dtype="float32")
    vocab = loaded.model.config.vocab_size
    windows = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(seed))
    result = sdsprune.prune(
        loaded,
        sdsprune.Magnitude(),
        sparsity="2:4",
        calibration=windows,
        run=sdsprune.RunOptions(device="cpu", progress=False, measure_errors=False),
    )
    return result.model.model


def with_backend(model: nn.Module, backend: str) -> tuple[nn.Module, dict[nn.Module, str]]:
    """A copy of ``model`` with ``backend`` applied (the original stays dense), and the
    category of each module that opens a range (see :func:`module_categories`)."""
    copied = copy.deepcopy(model)
    blocks = decoder_blocks(copied)  # before the swap: it finds blocks by their nn.Linear
    apply_backend(copied, backend)
    return copied, module_categories(copied, blocks)


class DecodeStep:
    """One decode step of ``model`` at a fixed cache length: call it, then ``reset``.

    The step is the library's (:func:`sdsprune.inference.decode.eager_step`, greedy choice
    included), so the profile times what ``sdsprune bench`` times."""

    def __init__(
        self, model: nn.Module, categories: dict[nn.Module, str], prompt: torch.Tensor
    ) -> None:
        self.model = model
        self.categories = categories
        self.prompt_tokens = prompt.shape[1]
        self.step = eager_step(model)
        self.cache = new_cache(model, "eager", self.prompt_tokens + 1)
        with torch.inference_mode():
            self.token = prefill(model, prompt, self.cache)

    def __call__(self) -> None:
        with torch.inference_mode():
            self.step(self.token, self.cache)

    def reset(self) -> None:
        """Drop the token the step appended, so the next step sees the same cache."""
        # a negative count removes that many tokens (transformers 4.x and 5.x alike)
        self.cache.crop(self.prompt_tokens - self.cache.get_seq_length())


def plain_seconds(step: DecodeStep) -> float:
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    step.reset()
    return seconds


def module_categories(model: nn.Module, blocks: nn.ModuleList) -> dict[nn.Module, str]:
    """The modules whose forward opens a category range, once a backend is applied."""
    categories: dict[nn.Module, str] = {}
    for name, module in model.named_modules():
        if "rotary" in name.rpartition(".")[2]:
            categories[module] = "attention"
    for block in blocks:
        for name, child in block.named_children():
            if "attn" in name:
                categories[child] = "attention"
    categories[model.get_input_embeddings()] = "head_embeddings"
    categories[model.get_output_embeddings()] = "head_embeddings"
    for layer in backend_report(model).layers:
        index, _, path = layer.name.partition(".")
        categories[blocks[int(index)].get_submodule(path)] = "linears"
    return categories


@contextmanager
def category_ranges(categories: dict[nn.Module, str]) -> Iterator[None]:
    """Forward hooks opening a ``record_function`` range named after each module's category."""
    open_ranges: list[torch.profiler.record_function] = []

    def opener(category: str) -> Callable:
        def pre_hook(_module, _args) -> None:
            scope = torch.profiler.record_function(SCOPE_PREFIX + category)
            scope.__enter__()
            open_ranges.append(scope)

        return pre_hook

    def close(_module, _args, _output) -> None:
        open_ranges.pop().__exit__(None, None, None)

    handles = []
    for module, category in categories.items():
        handles.append(module.register_forward_pre_hook(opener(category)))
        handles.append(module.register_forward_hook(close))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def profiled_breakdown(step: DecodeStep) -> dict[str, float]:
    """Seconds of one profiled step per category, plus ``wall`` (they sum to it)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with (
        category_ranges(step.categories),
        torch.profiler.profile(activities=activities) as prof,
        torch.profiler.record_function(STEP_SCOPE),
    ):
        start = time.perf_counter()
        step()
        wall = time.perf_counter() - start
    step.reset()
    return split_step(prof.events(), wall)


def split_step(events: list[FunctionEvent], wall: float) -> dict[str, float]:
    """Category times of the events inside the step range; ``overhead`` is what is left."""
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for event in events:
        scope = enclosing_category(event)
        if scope is None:  # outside the step, or another thread's
            continue
        category = event.name.removeprefix(SCOPE_PREFIX)
        if event.name.startswith(SCOPE_PREFIX):
            if category in INCLUSIVE and scope not in INCLUSIVE:
                seconds[category] += event.cpu_time_total / 1e6
        elif scope not in INCLUSIVE:
            seconds[scope] += event.self_cpu_time_total / 1e6
    seconds["overhead"] = wall - sum(seconds.values())
    return seconds | {"wall": wall}


def enclosing_category(event: FunctionEvent) -> str | None:
    """The innermost category range around ``event`` (``other_ops`` for the step range
    itself), or None when the event is not inside the step."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == STEP_SCOPE:
            return "other_ops"
        if parent.name.startswith(SCOPE_PREFIX):
            return parent.name.removeprefix(SCOPE_PREFIX)
        parent = parent.cpu_parent
    return None


def measure(
    steps: dict[str, DecodeStep], threads: int, rounds: int, warmup: int, profile: bool
) -> dict[str, dict]:
    """Plain (and profiled) step times of every backend at ``threads``, interleaved; the
    caller's thread count is restored, so a test that imports this leaks nothing."""
    with torch_threads(threads):
        return interleaved_medians(steps, rounds, warmup, profile)


def interleaved_medians(
    steps: dict[str, DecodeStep], rounds: int, warmup: int, profile: bool
) -> dict[str, dict]:
    """Rounds rotate the backend order, so drifting load hits every backend alike."""
    plain: dict[str, list[float]] = {name: [] for name in steps}
    profiled: dict[str, list[dict[str, float]]] = {name: [] for name in steps}
    names = list(steps)
    for index in range(warmup + rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = plain_seconds(steps[name])
            breakdown = profiled_breakdown(steps[name]) if profile else None
            if index >= warmup:
                plain[name].append(seconds)
                if breakdown:
                    profiled[name].append(breakdown)
    return {name: summarise(plain[name], profiled[name]) for name in names}


def summarise(plain: list[float], profiled: list[dict[str, float]]) -> dict:
    """Medians in milliseconds; ``overhead`` is the median wall minus the other medians, so
    the breakdown still sums to the profiled wall time."""
    result: dict = {
        "plain_ms": round(statistics.median(plain) * 1e3, 3),
        "plain_samples": len(plain),
    }
    if not profiled:
        return result
    medians = {key: statistics.median(b[key] for b in profiled) * 1e3 for key in profiled[0]}
    medians["overhead"] = medians["wall"] - sum(medians[c] for c in CATEGORIES[:-1])
    result["profiled_ms"] = round(medians["wall"], 3)
    result["instrumentation_ratio"] = round(medians["wall"] / result["plain_ms"], 3)
    result["breakdown_ms"] = {c: round(medians[c], 3) for c in CATEGORIES}
    result["breakdown_share"] = {c: round(medians[c] / medians["wall"], 4) for c in CATEGORIES}
    # what the overhead would be without the profiler's per-op cost (noisy; may go below 0)
    measured = sum(medians[c] for c in CATEGORIES[:-1])
    result["overhead_uninstrumented_ms"] = round(result["plain_ms"] - measured, 3)
    return result


def amdahl(results: dict[str, dict]) -> dict:
    """The step speedup ceiling from the dense linears' fraction of the plain step time."""
    dense = results["dense"]
    p = min(dense["breakdown_ms"]["linears"] / dense["plain_ms"], 1.0)
    measured = {
        name: round(dense["plain_ms"] / row["plain_ms"], 3)
        for name, row in results.items()
        if name != "dense"
    }
    return {
        "linear_fraction": round(p, 4),
        "ceiling_s_1.6": round(1 / ((1 - p) + p / BANDWIDTH_SPEEDUP), 3),
        "ceiling_s_inf": round(1 / (1 - p), 3) if p < 1 else None,
        "measured_speedup": measured,
    }


def decode_steps(spec: str, backends: list[str], prompt_tokens: int, seed: int) -> dict:
    """A prefilled ``DecodeStep`` per backend, each on its own copy of the pruned model."""
    pruned = pruned_2of4_model(spec, seed)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, pruned.config.vocab_size, (1, prompt_tokens), generator=generator)
    return {name: DecodeStep(*with_backend(pruned, name), prompt) for name in backends}


def wait_policy_check(args: argparse.Namespace) -> dict:
    """Plain step times under PASSIVE and ACTIVE OpenMP waiting: a subprocess per entry of
    WAIT_POLICY_ORDER, then each policy's mean over its runs."""
    samples: dict[str, list[dict]] = {policy: [] for policy in WAIT_POLICY_ORDER}
    for policy in WAIT_POLICY_ORDER:
        command = [sys.executable, __file__, "--timing-only", *child_arguments(args)]
        env = os.environ | {"OMP_WAIT_POLICY": policy}
        output = subprocess.run(command, env=env, capture_output=True, text=True)
        if output.returncode != 0:
            raise SystemExit(f"the {policy} run failed:\n{output.stderr[-3000:]}")
        samples[policy].append(json.loads(output.stdout.strip().splitlines()[-1]))
    ratios = {}
    for threads in args.threads:
        for backend in args.backends:
            key = f"{backend}/{threads}"
            passive, active = (
                statistics.mean(run[str(threads)][backend]["plain_ms"] for run in samples[p])
                for p in ("PASSIVE", "ACTIVE")
            )
            ratios[key] = {
                "passive_ms": round(passive, 3),
                "active_ms": round(active, 3),
                "passive_over_active": round(passive / active, 3),
            }
    return {"order": list(WAIT_POLICY_ORDER), "by_backend_threads": ratios}


def child_arguments(args: argparse.Namespace) -> list[str]:
    return [
        f"--model={args.model}",
        f"--backends={','.join(args.backends)}",
        f"--threads={','.join(map(str, args.threads))}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--prompt-tokens={args.prompt_tokens}",
        f"--seed={args.seed}",
    ]


def render(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)  # nine columns: narrower truncates the headers
    table = Table(title=f"one decode step, {report['settings']['model']} (medians, ms)")
    for column in ("threads", "backend", "plain", "profiled", *CATEGORIES):
        table.add_column(column, justify="left" if column == "backend" else "right")
    for threads, rows in report["results"].items():
        for backend, row in rows.items():
            parts = [
                f"{row['breakdown_ms'][c]:.2f} ({row['breakdown_share'][c]:.0%})"
                for c in CATEGORIES
            ]
            table.add_row(
                threads, backend, f"{row['plain_ms']:.2f}", f"{row['profiled_ms']:.2f}", *parts
            )
    console.print(table)
    ceiling = Table(title="Amdahl ceiling of a 2:4 kernel (p = dense linears / plain step)")
    for column in ("threads", "p", "ceiling s=1.6", "ceiling s=inf", "measured"):
        ceiling.add_column(column, justify="right")
    for threads, row in report["amdahl"].items():
        measured = ", ".join(f"{k} {v:.2f}x" for k, v in row["measured_speedup"].items())
        infinite = row["ceiling_s_inf"]
        ceiling.add_row(
            threads,
            f"{row['linear_fraction']:.2f}",
            f"{row['ceiling_s_1.6']:.2f}x",
            "-" if infinite is None else f"{infinite:.2f}x",
            measured,
        )
    console.print(ceiling)
    for key, row in report.get("wait_policy", {}).get("by_backend_threads", {}).items():
        console.print(
            f"OMP_WAIT_POLICY {key}: PASSIVE/ACTIVE step time {row['passive_over_active']}"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--backends", default="dense,nm24", help="dense first; auto is slow to load"
    )
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds (medians)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/decode-profile.json")
    parser.add_argument("--wait-policy-check", action="store_true")
    parser.add_argument("--timing-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.backends = ["dense", *(b for b in args.backends.split(",") if b != "dense")]
    args.threads = [int(t) for t in args.threads.split(",")]
    return args


def main() -> None:
    args = parse_args()
    load_before = os.getloadavg()
    steps = decode_steps(args.model, args.backends, args.prompt_tokens, args.seed)
    results = {
        str(threads): measure(steps, threads, args.steps, args.warmup, not args.timing_only)
        for threads in args.threads
    }
    if args.timing_only:  # a wait-policy child: plain times only, to the parent
        print(json.dumps(results))
        return
    report = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "timing_only")},
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpu_capability": cpu_capability(),
        "kernels": {name: backend_report(s.model).counts() for name, s in steps.items()},
        "results": results,
        "amdahl": {threads: amdahl(rows) for threads, rows in results.items()},
        "load_average_before_after": [load_before, os.getloadavg()],
        "versions": library_versions(),
    }
    if args.wait_policy_check:
        del steps  # the children load their own copies
        report["wait_policy"] = wait_policy_check(args)
        report["load_average_before_after"][1] = os.getloadavg()
    write_json(report, args.out)
    render(report)


if __name__ == "__main__":
    main()
