"""``prune()``: the public entry point that runs a method over a whole model."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from sdsprune.data import load_corpus, sample_calibration
from sdsprune.engine import (
    BlockContext,
    BlockProcessor,
    capture_block_inputs,
    pick_batch_size,
    run_blocks,
    runs,
    use_session,
)
from sdsprune.engine.distributed import distributed_from_env
from sdsprune.engine.lowmem import LowMemoryStore
from sdsprune.errors import SdspruneError
from sdsprune.evaluate.perplexity import check_seqlen, evaluate_corpora, with_bos
from sdsprune.linalg import relative_error
from sdsprune.models import LoadedModel, decoder_blocks, load_model, model_linears
from sdsprune.pruners import BASE_PRUNERS, Pruner, SparsityPattern, get_pruner, parse_pruner_spec
from sdsprune.runinfo import Timer, library_versions, peak_memory
from sdsprune.utils import atomic_output_dir, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

METHODS = (*BASE_PRUNERS, "sds")
REPORT_NAME = "sdsprune_report.json"


class PruneProcessor(BlockProcessor):
    """One-shot pruning of every linear layer of a block with a base pruner."""

    layer_parallel = True  # layers are pruned independently: ranks may split them

    def __init__(self, pruner: Pruner, pattern: SparsityPattern, probe_errors: bool = True):
        self.pruner = pruner
        self.pattern = pattern
        self.needs = pruner.needs
        self.probe_errors = probe_errors

    def process(self, ctx: BlockContext) -> None:
        for name, dense in ctx.dense_weights.items():
            stats = ctx.stats.for_layer(name) if ctx.stats is not None else None
            outcome = self.pruner.prune(dense, stats, self.pattern.for_block(ctx.index))
            ctx.set_weight(name, outcome.weight)
            record = {"sparsity": float(outcome.mask.float().mean())}
            if stats is not None and stats.gram is not None:
                record["rel_error"] = relative_error(dense, outcome.weight, stats.gram)
            ctx.records[name] = record


@dataclass
class PruneResult:
    """The pruned model (in memory) and the report written next to a saved checkpoint."""

    model: LoadedModel
    report: dict = field(default_factory=dict)
    out: Path | None = None


def prune(
    model: str | LoadedModel,
    *,
    method: str = "sparsegpt",
    sparsity: str | float | SparsityPattern = "0.5",
    base: str = "sparsegpt",
    calib: str = "wiki",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    calibration: torch.Tensor | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    evaluate: list[str] | tuple[str, ...] = (),
    eval_seqlen: int | None = None,
    max_chunks: int | None = None,
    sds=None,
    progress: bool = True,
    low_memory: bool = False,
    state_dir: str | Path | None = None,
    resume: bool = False,
    measure_errors: bool = True,
    owl=None,
) -> PruneResult:
    """Prune ``model`` with ``method`` at ``sparsity`` and optionally save and evaluate it.

    ``calibration`` (windows x seqlen token ids) overrides sampling from ``calib``, so that
    several methods can be compared on exactly the same windows. ``sds`` is an
    :class:`sdsprune.sds.SDSConfig` for ``method="sds"`` (``base`` then names its pruner).

    ``low_memory`` keeps only one block's weights in memory (needs ``out``); ``state_dir``
    saves the state after every block and ``resume`` continues from it. Under ``torchrun``
    the calibration windows are split across the processes (see sdsprune.engine).
    ``measure_errors=False`` leaves Wanda's and magnitude's per-layer output errors out of
    the report: measuring them costs ~20% of those methods' time (methods with a Gram matrix
    get them almost free and always report them).

    ``method`` (and ``base``) may carry pruner options, e.g. ``dsnot[initial=sparsegpt]``.
    ``owl`` is an :class:`sdsprune.owl.OWLConfig`: a sparsity per block from its outlier
    ratio, the model's total unchanged (unstructured sparsity only).
    """
    timer = Timer()
    pattern = SparsityPattern.parse(sparsity)
    if method != "sds" and method.partition("[")[0] not in BASE_PRUNERS:
        raise SdspruneError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    parse_pruner_spec(base if method == "sds" else method)  # bad options: refused now
    if owl is not None:
        owl.check(pattern, low_memory=low_memory, resume=resume)
    if out is not None and Path(out).exists() and not overwrite:
        raise SdspruneError(f"output folder {out} already exists (pass --overwrite to replace it)")
    staged = method == "sds" and getattr(sds, "schedule", "fused") == "staged"
    runs.check_options(
        model=model,
        low_memory=low_memory,
        out=out,
        evaluate=evaluate,
        state_dir=state_dir,
        resume=resume,
        staged=staged,
    )
    compute = resolve_device(device)
    with distributed_from_env(compute) as dist:
        if dist is not None and compute.type == "cuda":
            compute = dist.device
        return _prune(
            model, method, pattern, base, calib, nsamples, seqlen, seed, compute, dtype,
            calibration, out, overwrite, evaluate, eval_seqlen, max_chunks, sds, progress,
            low_memory, state_dir, resume, measure_errors, dist, timer, owl,
        )  # fmt: skip


def _prune(
    model, method, pattern, base, calib, nsamples, seqlen, seed, compute, dtype, calibration,
    out, overwrite, evaluate, eval_seqlen, max_chunks, sds, progress, low_memory, state_dir,
    resume, measure_errors, dist, timer, owl=None,
) -> PruneResult:  # fmt: skip
    """The body of :func:`prune`, inside the distributed group (if any)."""
    progress = progress and (dist is None or dist.rank == 0)
    eval_corpora = [load_corpus(name, "eval") for name in evaluate]
    with timer.stage("load"):
        if low_memory:
            loaded = runs.load_skeleton(model, resolve_dtype(_dtype_for(dtype, compute), compute))
        elif isinstance(model, LoadedModel):
            loaded = model
        else:
            loaded = load_model(model, device="cpu", dtype=_dtype_for(dtype, compute))
    net = loaded.model
    linears = model_linears(net)
    pattern.check_layers(linears)
    check_seqlen(net, seqlen if calibration is None else calibration.shape[1])
    if not low_memory:  # a low-memory run checks each block as it reads it
        _check_finite_weights(linears)
    given_windows = calibration
    with timer.stage("calibration"):
        if calibration is None:
            calibration = sample_calibration(
                load_corpus(calib, "calib"), loaded.tokenizer, nsamples, seqlen, seed
            )
        windows = with_bos(calibration, net, loaded.tokenizer)
    config = {
        "model": loaded.spec,
        "method": method,
        "base": base if method == "sds" else None,
        "sparsity": str(pattern),
        "calib": calib if given_windows is None else "given",
        "nsamples": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "seed": seed,
        "device": str(compute),
        "dtype": str(next(net.parameters()).dtype).removeprefix("torch."),
    }
    if method == "sds":
        from sdsprune.sds import SDSConfig

        config["sds"] = asdict(sds or SDSConfig())
    if owl is not None:
        config["owl"] = asdict(owl)
    session_scope = runs.run_session(
        net,
        loaded,
        config,
        windows,
        dist=dist,
        low_memory=low_memory,
        out=out,
        state_dir=state_dir,
        resume=resume,
    )
    with session_scope as session, use_session(session):
        local = windows if dist is None else dist.shard(windows)
        start = time.perf_counter()
        owl_report = None
        if owl is not None:
            from sdsprune.owl import owl_sparsity

            pattern, owl_report = owl_sparsity(net, local, pattern, owl, compute, timer, progress)
        if method == "sds":
            from sdsprune.sds import SDSConfig, run_sds

            layers, extras = run_sds(
                net, local, base, pattern, sds or SDSConfig(), compute, timer, progress
            )
        else:
            processor = PruneProcessor(get_pruner(method), pattern, measure_errors)
            layers = _run_one_shot(net, local, processor, compute, timer, progress)
            extras = {}
        prune_seconds = time.perf_counter() - start
        if low_memory or dist is not None:
            config.update(low_memory=low_memory, processes=1 if dist is None else dist.world)
        report = {
            "config": config,
            "versions": library_versions(),
            "timings": {**timer.rounded(), "prune_total": round(prune_seconds, 3)},
            "memory": peak_memory(),
            "summary": _summary(net, layers, session.store if low_memory else None),
            "layers": layers,
            **extras,
        }
        if owl_report is not None:
            report["owl"] = owl_report
        return _finish_run(
            loaded, report, out, overwrite, session, state_dir, eval_corpora,
            eval_seqlen or seqlen, max_chunks, compute, timer, progress, prune_seconds,
        )  # fmt: skip


def _finish_run(
    loaded, report, out, overwrite, session, state_dir, eval_corpora, eval_seqlen, max_chunks,
    compute, timer, progress, prune_seconds,
) -> PruneResult:  # fmt: skip
    """Evaluate and save on the main process only; then drop the run's saved state."""
    if not session.is_main:
        runs.finish(session, state_dir)
        return PruneResult(model=loaded, report=report, out=None)
    if eval_corpora:
        report["evaluation"] = _evaluate(
            loaded, eval_corpora, eval_seqlen, max_chunks, compute, timer, progress
        )
        report["timings"] = {**timer.rounded(), "prune_total": round(prune_seconds, 3)}
    store = session.store if isinstance(session.store, LowMemoryStore) else None
    saved = save_pruned(loaded, report, out, overwrite, store) if out is not None else None
    runs.finish(session, state_dir)
    return PruneResult(model=loaded, report=report, out=saved)


def _dtype_for(dtype: str, compute: torch.device) -> str:
    """Default precision follows the compute device, even though the model loads on CPU."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if compute.type == "cuda" else "float32"


def _run_one_shot(net, windows, processor: PruneProcessor, compute, timer, progress) -> dict:
    with timer.stage("capture"):
        stream = capture_block_inputs(net, windows, compute, pick_batch_size(*windows.shape))
    with timer.stage("prune"):
        return run_blocks(
            net,
            stream,
            processor,
            compute,
            desc=f"{processor.pruner.name} {processor.pattern}",
            progress=progress,
            timer=timer,
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
