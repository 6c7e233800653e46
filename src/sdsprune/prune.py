"""``prune()``: the public entry point that runs a method over a whole model."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from sdsprune.api import check_counts
from sdsprune.data import load_corpus, sample_calibration
from sdsprune.data.corpora import tokenize
from sdsprune.engine import (
    BlockContext,
    BlockProcessor,
    Runtime,
    capture_block_inputs,
    pick_batch_size,
    run_blocks,
    runs,
)
from sdsprune.engine.distributed import distributed_from_env
from sdsprune.engine.lowmem import LowMemoryStore
from sdsprune.engine.memory_plan import MemoryPlan, PlanRequest, check_plan, fit_plan
from sdsprune.errors import SdspruneError
from sdsprune.evaluate.perplexity import check_seqlen, eval_chunks, evaluate_corpora, with_bos
from sdsprune.keywords import apply_keywords
from sdsprune.linalg import relative_error
from sdsprune.methods import OWL, SDS, BaseMethod, Method, SparseGPT, as_method, report_settings
from sdsprune.models import LoadedModel, decoder_blocks, load_model, model_linears
from sdsprune.options import OFFLOAD_CHOICES, Calibration, RunOptions
from sdsprune.ownership import atomic_output_dir, check_output_folder, check_state_folder
from sdsprune.pruners import Pruner, SparsityPattern
from sdsprune.runinfo import Timer, library_versions, peak_memory
from sdsprune.utils import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

REPORT_NAME = "sdsprune_report.json"


class PruneProcessor(BlockProcessor):
    """One-shot pruning of every linear layer of a block with a base pruner (layers are
    independent given the statistics, so several ranks split them)."""

    def __init__(self, pruner: Pruner, pattern: SparsityPattern, probe_errors: bool = True):
        self.pruner = pruner
        self.pattern = pattern
        self.needs = pruner.needs
        self.probe_errors = probe_errors

    def process(self, ctx: BlockContext) -> None:
        ctx.solve_layers(lambda name, dense: self._prune_layer(ctx, name, dense))

    def _prune_layer(self, ctx: BlockContext, name: str, dense: torch.Tensor) -> torch.Tensor:
        stats = ctx.stats.for_layer(name) if ctx.stats is not None else None
        outcome = self.pruner.prune(dense, stats, self.pattern.for_block(ctx.index))
        record = {"sparsity": float(outcome.mask.float().mean())}
        if stats is not None and stats.gram is not None:
            record["rel_error"] = relative_error(dense, outcome.weight, stats.gram)
        ctx.records[name] = record
        return outcome.weight


@dataclass
class PruneResult:
    """The pruned model (in memory) and the report written next to a saved checkpoint."""

    model: LoadedModel
    report: dict = field(default_factory=dict)
    out: Path | None = None


@dataclass(frozen=True)
class PruneOptions:
    """Every setting of one :func:`prune` call, checked once and passed on as one object:
    the method's config, the parsed sparsity, the calibration, the run's options and the
    device they resolve to."""

    method: Method
    pattern: SparsityPattern
    calibration: Calibration
    run: RunOptions
    compute: torch.device

    @property
    def owl(self) -> OWL | None:
        return self.method if isinstance(self.method, OWL) else None

    @property
    def pruning(self) -> BaseMethod | SDS:
        """The method that prunes (the one OWL gives its per-block sparsities to)."""
        return self.method.inner if isinstance(self.method, OWL) else self.method

    @property
    def sds(self) -> SDS | None:
        return self.pruning if isinstance(self.pruning, SDS) else None

    @property
    def staged(self) -> bool:
        return self.sds is not None and self.sds.schedule == "staged"

    @property
    def progress(self) -> bool:
        return self.run.progress


def prune(
    model: str | LoadedModel,
    method: Method | str = SparseGPT(),
    *,
    sparsity: str | float | SparsityPattern = "0.5",
    calibration: Calibration | torch.Tensor | None = None,
    run: RunOptions | None = None,
    **keywords,
) -> PruneResult:
    """Prune ``model`` with ``method`` at ``sparsity`` and optionally save and evaluate it.

    ``model`` is a spec (alias, folder, hub id), loaded here, or a :class:`LoadedModel`,
    whose weights are then pruned in place (``PruneResult.model`` is that same object).
    ``method`` is a config from :mod:`sdsprune.methods` (``SparseGPT()``,
    ``SDS(base=Wanda())``, ``OWL(inner=...)``) or a method string (``"sds:wanda"``).
    ``calibration`` says which windows to prune with (a tensor: those windows, the same for
    several methods); ``run`` how and where to run and what to write (see
    :class:`sdsprune.options.RunOptions`). Under ``torchrun`` the calibration windows are
    split across the processes (see sdsprune.engine). The flat keywords of earlier releases
    (``base=``, ``sds=``, ``nsamples=``, ``device=``, ...) still work, deprecated (see
    :mod:`sdsprune.keywords`).
    """
    timer = Timer()
    method, calibration, run = as_method(method), Calibration.of(calibration), run or RunOptions()
    if keywords:
        method, calibration, run = apply_keywords(method, calibration, run, keywords)
    pattern = SparsityPattern.parse(sparsity)
    if isinstance(method, OWL):
        method.check(pattern, low_memory=run.low_memory, resume=run.resume)
    if run.offload_activations not in OFFLOAD_CHOICES:
        raise SdspruneError(
            f"unknown offload setting '{run.offload_activations}' "
            f"(choose from {', '.join(OFFLOAD_CHOICES)})"
        )
    check_counts(max_chunks=run.max_chunks)
    _check_folders(
        model,
        run.out,
        run.overwrite,
        run.state_dir,
        inputs={"the calibration text": calibration.corpus},
    )
    run = replace(
        run,
        out=Path(run.out) if run.out is not None else None,
        state_dir=Path(run.state_dir) if run.state_dir is not None else None,
        evaluate=tuple(run.evaluate),
    )
    options = PruneOptions(method, pattern, calibration, run, resolve_device(run.device))
    runs.check_options(
        model=model,
        low_memory=run.low_memory,
        out=run.out,
        evaluate=run.evaluate,
        state_dir=run.state_dir,
        resume=run.resume,
        staged=options.staged,
    )
    with distributed_from_env(options.compute) as dist:
        if dist is not None and options.compute.type == "cuda":
            options = replace(options, compute=dist.device)
        return _prune(model, options, dist, timer)


def _check_folders(model, out, overwrite: bool, state_dir, inputs: dict[str, str]) -> None:
    """Before any work: ``out`` and ``state_dir`` may be written, and replacing or cleaning
    them up cannot delete the source model, each other or an input file."""
    source = model.path if isinstance(model, LoadedModel) else _local_path(str(model))
    files = {label: _local_path(value) for label, value in inputs.items()}
    if out is not None:
        check_output_folder(
            out,
            overwrite=overwrite,
            protected={"the source model": source, "the state folder": state_dir, **files},
        )
    if state_dir is not None:
        check_state_folder(
            state_dir, protected={"the output folder": out, "the source model": source, **files}
        )


def _local_path(spec: str) -> Path | None:
    """``spec`` as a local file or folder, when it names one (not an alias or hub id)."""
    path = Path(spec).expanduser()
    return path if spec and path.exists() else None


def _prune(model, options: PruneOptions, dist, timer: Timer) -> PruneResult:
    """The body of :func:`prune`, inside the distributed group (if any)."""
    opts = options
    if dist is not None and dist.rank != 0:
        opts = replace(opts, run=replace(opts.run, progress=False))
    eval_corpora = [load_corpus(name, "eval") for name in opts.run.evaluate]
    dtype = _dtype_for(opts.run.dtype, opts.compute)
    with timer.stage("load"):
        if opts.run.low_memory:
            loaded = runs.load_skeleton(model, resolve_dtype(dtype, opts.compute))
        elif isinstance(model, LoadedModel):
            loaded = model
        else:
            loaded = load_model(model, device="cpu", dtype=dtype)
    net = loaded.model
    linears = model_linears(net)
    opts.pattern.check_layers(linears)
    _check_figure_layer(opts.sds.figure_layer if opts.sds else None, linears)
    sampling, calibration = opts.calibration, opts.calibration.windows
    check_seqlen(net, sampling.seqlen if calibration is None else calibration.shape[1])
    _check_eval_inputs(loaded, eval_corpora, opts.run.eval_seqlen or sampling.seqlen)
    if not opts.run.low_memory:  # a low-memory run checks each block as it reads it
        _check_finite_weights(linears)
    with timer.stage("calibration"):
        if calibration is None:
            calibration = sample_calibration(
                load_corpus(sampling.corpus, "calib"),
                loaded.tokenizer,
                sampling.nsamples,
                sampling.seqlen,
                sampling.seed,
            )
        windows = with_bos(calibration, net, loaded.tokenizer)
    # defaults that depend on the run are decided once: the plan, the run and the report agree
    resolved = opts.method.for_run(low_memory=opts.run.low_memory, windows=int(windows.shape[0]))
    opts = replace(opts, method=resolved)
    method = report_settings(opts.method)
    config = {
        "model": loaded.spec,
        "method": method.pop("method"),
        "base": method.pop("base"),
        "sparsity": str(opts.pattern),
        "calib": sampling.corpus if sampling.windows is None else "given",
        "nsamples": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "seed": sampling.seed,
        "device": str(opts.compute),
        "dtype": str(next(net.parameters()).dtype).removeprefix("torch."),
        **method,  # every SDS and OWL setting, where used
    }
    # A damaged or mismatched state is refused before the plan is printed: one error line.
    state_dir, resume = opts.run.state_dir, opts.run.resume
    runs.check_state(net, config, windows, dist=dist, state_dir=state_dir, resume=resume)
    plan = _memory_plan(net, opts, windows, dist)
    runtime_scope = runs.open_runtime(
        net,
        loaded,
        config,
        windows,
        plan=plan,
        dist=dist,
        low_memory=opts.run.low_memory,
        out=opts.run.out,
        state_dir=opts.run.state_dir,
        resume=opts.run.resume,
    )
    with runtime_scope as runtime:
        local = windows if dist is None else dist.shard(windows)
        start = time.perf_counter()
        owl_report = None
        pattern = opts.pattern
        if opts.owl is not None:
            from sdsprune.owl import owl_sparsity

            pattern, owl_report = owl_sparsity(
                net, local, pattern, opts.owl, opts.compute, timer, opts.progress, runtime=runtime
            )
        if opts.sds is not None:
            from sdsprune.sds import run_sds

            layers, extras = run_sds(
                net,
                local,
                opts.sds.base,
                pattern,
                opts.sds,
                opts.compute,
                timer,
                opts.progress,
                runtime=runtime,
            )
        else:
            pruner = opts.pruning.pruner()
            processor = PruneProcessor(pruner, pattern, opts.run.measure_errors)
            layers = _run_one_shot(
                net, local, processor, opts.compute, timer, opts.progress, runtime
            )
            extras = {}
        prune_seconds = time.perf_counter() - start
        if opts.run.low_memory or dist is not None:
            low_memory = opts.run.low_memory
            config.update(low_memory=low_memory, processes=1 if dist is None else dist.world)
        report = {
            "config": config,
            "versions": library_versions(),
            "timings": {**timer.rounded(), "prune_total": round(prune_seconds, 3)},
            "memory": {**peak_memory(), "stages": timer.stage_peaks()},
            "plan": plan.to_dict(),
            "summary": _summary(net, layers, runtime.store if opts.run.low_memory else None),
            "layers": layers,
            **extras,
        }
        if owl_report is not None:
            report["owl"] = owl_report
        return _finish_run(loaded, report, opts, runtime, eval_corpora, timer, prune_seconds)


def _finish_run(
    loaded, report, opts: PruneOptions, runtime: Runtime, eval_corpora, timer, prune_seconds
) -> PruneResult:
    """Save, then evaluate, on the main process only: a failing evaluation cannot lose the
    pruned model, and the saved state is dropped as soon as the model is safe."""
    if not runtime.is_main:
        runs.finish(runtime, opts.run.state_dir)
        return PruneResult(model=loaded, report=report, out=None)
    store = runtime.store if isinstance(runtime.store, LowMemoryStore) else None
    out = opts.run.out
    saved = save_pruned(loaded, report, out, opts.run.overwrite, store) if out else None
    runs.finish(runtime, opts.run.state_dir)
    if eval_corpora:
        report["evaluation"] = _evaluate_saved(loaded, eval_corpora, opts, timer, saved)
        report["timings"] = {**timer.rounded(), "prune_total": round(prune_seconds, 3)}
        if saved is not None:
            _write_report(saved, report)
    return PruneResult(model=loaded, report=report, out=saved)


def _evaluate_saved(loaded, eval_corpora, opts: PruneOptions, timer, saved) -> list[dict]:
    """The evaluation after the save; a failure says where the pruned model already is."""
    try:
        return _evaluate(
            loaded,
            eval_corpora,
            opts.run.eval_seqlen or opts.calibration.seqlen,
            opts.run.max_chunks,
            opts.compute,
            timer,
            opts.progress,
        )
    except SdspruneError as exc:
        if saved is None:
            raise
        raise SdspruneError(
            f"{exc} (the pruned model is saved in {saved}; evaluate it with `sdsprune eval`)"
        ) from exc


def _check_figure_layer(layer: str | None, linears: dict[str, nn.Linear]) -> None:
    """A misspelt --figure-layer would silently give no figure at the end of the run."""
    if layer is not None and layer not in linears:
        example = next(iter(linears), "0.mlp.up_proj")
        raise SdspruneError(
            f"--figure-layer '{layer}' is not a linear layer of this model (e.g. '{example}')"
        )


def _check_eval_inputs(loaded: LoadedModel, corpora, seqlen: int) -> None:
    """Before pruning: every evaluation corpus fits the model and holds at least one chunk
    (a failure after an hour of pruning would otherwise be the first sign)."""
    if not corpora:
        return
    check_seqlen(loaded.model, seqlen)
    for corpus in corpora:
        eval_chunks(tokenize(loaded.tokenizer, corpus.text), seqlen, None)


def _write_report(folder: Path, report: dict) -> None:
    """Replace the saved report with the one that includes the evaluation, in one step."""
    path = folder / REPORT_NAME
    tmp = path.with_name(f".{REPORT_NAME}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SdspruneError(f"could not update {path}: {exc.strerror or exc}") from exc


def _memory_plan(net, opts: PruneOptions, windows: torch.Tensor, dist) -> MemoryPlan:
    """The memory and time plan, printed before any block is touched; refuses a run that
    would not fit (see sdsprune.engine.memory_plan)."""
    world = 1 if dist is None else dist.world
    local = -(-windows.shape[0] // world)
    terms = opts.method.plan_terms()  # the re-fit's windows are split across processes
    terms = replace(terms, block_windows=-(-terms.block_windows // world))
    request = PlanRequest(
        windows=local,
        seqlen=int(windows.shape[1]),
        batch=pick_batch_size(local, int(windows.shape[1])),
        terms=terms,
        low_memory=opts.run.low_memory,
        offload=opts.run.offload_activations,
    )
    plan, request = fit_plan(net, request, opts.compute)
    if opts.progress:
        print(plan.describe(), file=sys.stderr)
    check_plan(plan, request)
    return plan


def _dtype_for(dtype: str, compute: torch.device) -> str:
    """Default precision follows the compute device, even though the model loads on CPU."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if compute.type == "cuda" else "float32"


def _run_one_shot(
    net, windows, processor: PruneProcessor, compute, timer, progress, runtime: Runtime
) -> dict:
    with timer.stage("capture"):
        stream = capture_block_inputs(net, windows, compute, runtime=runtime)
    with timer.stage("prune"):
        return run_blocks(
            net,
            stream,
            processor,
            compute,
            desc=f"{processor.pruner.name} {processor.pattern}",
            progress=progress,
            timer=timer,
            runtime=runtime,
        )


def _check_finite_weights(linears: dict[str, nn.Linear]) -> None:
    for name, layer in linears.items():
        if not torch.isfinite(layer.weight).all():
            raise SdspruneError(f"layer {name} has NaN/Inf weights (corrupt checkpoint?)")


def _summary(net: nn.Module, layers: dict[str, dict], store=None) -> dict:
    linears = model_linears(net)
    if store is not None:  # low-memory: weights are on disk, the store counted their zeros
        counts = store.counts(decoder_blocks(net))
    else:
        counts = {n: (int((la.weight == 0).sum()), la.weight.numel()) for n, la in linears.items()}
    zeros = sum(c[0] for c in counts.values())
    total = sum(layer.weight.numel() for layer in linears.values())
    errors = [rec["rel_error"] for rec in layers.values() if "rel_error" in rec]
    for name, rec in layers.items():
        rec["sparsity"] = counts[name][0] / max(counts[name][1], 1)
    return {
        "pruned_layers": len(linears),
        "pruned_params": total,
        "sparsity": zeros / max(total, 1),
        "mean_rel_error": sum(errors) / len(errors) if errors else None,
    }


def _evaluate(loaded, corpora, seqlen, max_chunks, compute, timer, progress) -> list[dict]:
    loaded.model.to(compute)
    results = evaluate_corpora(
        loaded.model,
        loaded.tokenizer,
        corpora,
        seqlen=seqlen,
        max_chunks=max_chunks,
        progress=progress,
    )
    loaded.model.to("cpu")
    for result in results:
        timer.stages[f"eval_{result['dataset']}"] = result.pop("seconds")
    return results


def save_pruned(
    loaded: LoadedModel,
    report: dict,
    out: str | Path,
    overwrite: bool = False,
    store: LowMemoryStore | None = None,
) -> Path:
    """Write a normal Hugging Face checkpoint plus the report; the folder appears only when
    complete. ``store``: a low-memory run's blocks, already written to disk."""
    out = Path(out)
    figures = report.pop("_figures", {})
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        if store is not None:
            runs.save_low_memory(tmp, loaded.model, store)
        else:
            loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        for filename, png in figures.items():
            (tmp / filename).write_bytes(png)
            report.setdefault("figures", []).append(filename)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return out
