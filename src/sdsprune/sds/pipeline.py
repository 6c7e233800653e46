"""The SDS pipeline on top of the sequential engine: ``fused`` and ``staged`` schedules."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from sdsprune.engine import (
    ActivationStream,
    BlockContext,
    BlockProcessor,
    Runtime,
    capture_block_inputs,
    run_blocks,
)
from sdsprune.engine.capture import check_head_replay
from sdsprune.errors import SdspruneError
from sdsprune.linalg import output_energy
from sdsprune.models.blocks import model_linears
from sdsprune.pruners import Pruner, SparsityPattern
from sdsprune.runinfo import Timer
from sdsprune.sds.block import fit_block
from sdsprune.sds.config import SDSConfig
from sdsprune.sds.distill import distill
from sdsprune.sds.figures import StageRecorder
from sdsprune.sds.groups import refine_groups
from sdsprune.sds.originals import DenseOriginals
from sdsprune.sds.solver import adjust, redense

if TYPE_CHECKING:  # methods imports this package: SDS's settings are its config
    from sdsprune.methods import BaseMethod

HEAD_CHECK_TOKENS = 8  # tokens of the one window on which the head replay is checked
STAGES = ("first_prune", "redense", "second_prune", "adjusted", "final")


class _SDSSteps:
    """The per-layer steps, shared by both schedules."""

    def __init__(
        self,
        pruner: Pruner,
        pattern: SparsityPattern,
        config: SDSConfig,
        adjusting: bool,
        recorder: StageRecorder,
    ):
        self.pruner = pruner
        self.pattern = pattern
        self.config = config
        self.adjusting = adjusting
        self.recorder = recorder

    def data_grams(self, ctx: BlockContext, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(G_ii, G_ti) for the configured data mode (sd, dd or kd)."""
        sparse = ctx.stats.for_layer(name).gram
        if self.config.data_mode == "sd":
            return sparse, sparse
        dense = ctx.dense_stats.for_layer(name).gram
        if self.config.data_mode == "dd":
            return dense, dense
        return sparse, ctx.stats.cross_for_layer(name)

    def first_prune(self, ctx, name, dense) -> torch.Tensor:
        pattern = self.pattern.for_block(ctx.index)
        weight = self.pruner.prune(dense, ctx.stats.for_layer(name), pattern).weight
        self._note(ctx, name, "first_prune", dense, weight)
        return weight

    def redense(self, ctx, name, dense, pruned) -> torch.Tensor:
        gram_in, gram_cross = self.data_grams(ctx, name)
        start = pruned if self.config.residual_start else dense
        stats_in = (ctx.dense_stats if self.config.data_mode == "dd" else ctx.stats).for_layer(name)
        weight = redense(dense, start, gram_in, gram_cross, self.config, stats_in.derived)
        self._note(ctx, name, "redense", dense, weight)
        return weight

    def second_prune_and_adjust(self, ctx, name, dense, redensed) -> torch.Tensor:
        stats, pattern = ctx.stats.for_layer(name), self.pattern.for_block(ctx.index)
        weight = self.pruner.prune(redensed, stats, pattern).weight
        for _ in range(self.config.rounds - 1):
            weight = self.pruner.prune(
                self.redense(ctx, name, dense, weight), stats, pattern
            ).weight
        self._note(ctx, name, "second_prune", dense, weight)
        target = self.adjust_target(ctx, name, dense)
        if self.adjusting:
            group = self.pruner.unstructured_group
            weight = adjust(
                weight,
                dense,
                stats.gram,
                pattern,
                group,
                self.config,
                target=target,
                derived=stats.derived,
            )
        if self.config.group_sweeps:
            sweeps = self.config.group_sweeps
            weight = refine_groups(weight, dense, stats.gram, pattern, sweeps, target=target)
        self._note(ctx, name, "adjusted" if self.config.block_epochs else "final", dense, weight)
        return weight

    def adjust_target(self, ctx: BlockContext, name: str, dense: torch.Tensor) -> torch.Tensor:
        """T = W_d G_ti of the adjustment: the dense layer on the pruned model's inputs
        (``sd``) or on the dense model's inputs (``kd``, through the cross-Gram)."""
        if self.config.adjust_data == "kd":
            return dense @ ctx.stats.cross_for_layer(name)
        return dense @ ctx.stats.for_layer(name).gram

    def refit_block(self, ctx: BlockContext) -> None:
        """Block-level re-fit of the block's surviving weights (``block_epochs`` > 0)."""
        pattern = self.pattern.for_block(ctx.index)

        def reprune(name: str, weight: torch.Tensor) -> torch.Tensor:
            return self.pruner.prune(weight, ctx.stats.for_layer(name), pattern).weight

        fit = fit_block(
            ctx.index,
            ctx.block,
            ctx.linears,
            ctx.stream,
            ctx.dense_targets,
            self.config,
            ctx.dist,
            reprune=reprune,
        )
        ctx.outputs = fit.outputs
        block_record = {
            "block_error_start": fit.start_error,
            "block_error_final": fit.final_error,
            "block_epoch_errors": fit.epoch_errors,
            "block_kept_epoch": fit.kept_epoch,
        }
        if fit.masks_changed is not None:
            block_record["block_masks_changed"] = fit.masks_changed
        for name, layer in ctx.linears.items():
            ctx.records.setdefault(name, {}).update(block_record)
            weight = layer.weight.detach().float()
            self._note(ctx, name, "final", ctx.dense_weights[name], weight)

    def _note(self, ctx, name, stage, dense, weight) -> None:
        record = ctx.records.setdefault(name, {})
        gram = ctx.stats.for_layer(name).gram
        key = ("dense_energy", name)  # once per layer and pass, not once per stage
        if key not in ctx.memo:
            ctx.memo[key] = output_energy(dense, gram)
        error = output_energy(dense - weight, gram) / max(ctx.memo[key], 1e-30)
        record[f"rel_error_{stage}"] = record["rel_error"] = error
        self.recorder.offer(f"{ctx.index}.{name}", stage, dense, weight)


class FusedSDS(BlockProcessor):
    """S, D, S and adjustment inside each block, then propagate: one sequential pass."""

    needs = "gram"

    def __init__(self, steps: _SDSSteps):
        self.steps = steps
        self.dense_stream = steps.config.dense_stream
        self.dense_statistics = steps.config.dense_statistics

    def process(self, ctx: BlockContext) -> None:
        figure = self.steps.recorder.layer.removeprefix(f"{ctx.index}.")
        ctx.solve_layers(lambda name, dense: self._solve_layer(ctx, name, dense), [figure])

    def _solve_layer(self, ctx: BlockContext, name: str, dense: torch.Tensor) -> torch.Tensor:
        pruned = self.steps.first_prune(ctx, name, dense)
        redensed = self.steps.redense(ctx, name, dense, pruned)
        return self.steps.second_prune_and_adjust(ctx, name, dense, redensed)

    def refine(self, ctx: BlockContext) -> None:
        if self.steps.config.block_epochs:
            self.steps.refit_block(ctx)


class _StagedPass(BlockProcessor):
    """One whole-model pass of the staged schedule; ``originals`` holds the dense weights
    (kept by the first pass) because the block itself carries the previous stage's."""

    needs = "gram"

    def __init__(self, steps: _SDSSteps, originals: DenseOriginals):
        self.steps = steps
        self.originals = originals

    def original(self, ctx: BlockContext, name: str, like: torch.Tensor) -> torch.Tensor:
        return self.originals.weight(ctx.index, name, like)


class _StagedFirstPrune(_StagedPass):
    def process(self, ctx: BlockContext) -> None:
        self.originals.keep(ctx.index, ctx.linears)
        for name, dense in ctx.dense_weights.items():
            ctx.set_weight(name, self.steps.first_prune(ctx, name, dense))


class _StagedRedense(_StagedPass):
    """Re-dense every layer on inputs of the step-1 model; the stream stays the step-1 one."""

    propagate = "original"

    def __init__(self, steps: _SDSSteps, originals: DenseOriginals):
        super().__init__(steps, originals)
        self.dense_stream = steps.config.data_mode != "sd"

    def dense_weights_for(self, index: int) -> dict[str, torch.Tensor]:
        return self.originals.block(index)

    def process(self, ctx: BlockContext) -> None:
        for name, pruned in ctx.dense_weights.items():  # the block holds step-1 weights now
            dense = self.original(ctx, name, pruned)
            ctx.set_weight(name, self.steps.redense(ctx, name, dense, pruned))


class _StagedSecondPrune(_StagedPass):
    def process(self, ctx: BlockContext) -> None:
        for name, redensed in ctx.dense_weights.items():
            dense = self.original(ctx, name, redensed)
            ctx.set_weight(name, self.steps.second_prune_and_adjust(ctx, name, dense, redensed))


def run_sds(
    net: nn.Module,
    windows: torch.Tensor,
    base: BaseMethod,
    pattern: SparsityPattern,
    config: SDSConfig,
    device: torch.device,
    timer: Timer,
    progress: bool = True,
    *,
    runtime: Runtime,
) -> tuple[dict[str, dict], dict]:
    """Run SDS over the whole model with the run's ``runtime``; returns per-layer records
    and report extras. ``config`` has its run-dependent defaults decided
    (:meth:`SDSConfig.for_run`, which :func:`sdsprune.prune` calls once for the plan, the run
    and the report)."""
    parameters = sum(p.numel() for p in net.parameters())
    if config.distill_epochs is None:
        raise ValueError("run_sds takes a config decided for its run: config.for_run(...)")
    _check_distillation(net, windows, config, runtime)
    recorder = StageRecorder(config.figure_layer or default_figure_layer(net))
    steps = _SDSSteps(base.pruner(), pattern, config, config.adjusts(parameters), recorder)
    with timer.stage("capture"):
        stream = capture_block_inputs(net, windows, device, runtime=runtime)
    label = f"sds-{base.name} {pattern}"
    if config.schedule == "fused":
        dense = stream.clone() if config.dense_stream else None
        with timer.stage("sds_fused"):
            records = run_blocks(
                net,
                stream,
                FusedSDS(steps),
                device,
                dense_stream=dense,
                desc=label,
                progress=progress,
                timer=timer,
                runtime=runtime,
            )
    else:
        records, copies = _run_staged(net, stream, steps, device, timer, label, progress, runtime)
    extras = {
        "sds": {
            "adjusted": steps.adjusting,
            "stage_mean_rel_error": _stage_means(records),
            **_block_means(records),
        },
        "figure_layer": recorder.layer,
        "_figures": recorder.figures(),
    }
    if config.schedule == "staged":
        extras["sds"]["dense_copies_mib"] = round(copies / 2**20, 3)
    if config.distill_epochs:  # the streams now hold the last block's outputs, dense and pruned
        with timer.stage("distill"):
            extras["sds"]["distill"] = _distill_on(
                net, windows, (dense.hidden, stream.hidden), config, device, runtime, progress
            )
    return records, extras


def _check_distillation(
    net: nn.Module, windows: torch.Tensor, config: SDSConfig, runtime: Runtime
) -> None:
    """Refuse a distillation the run cannot do before any block is pruned: it trains the
    whole model in memory, and reads the dense logits through the model's head (checked on
    a few tokens of one window)."""
    if not config.distill_epochs:
        return
    if runtime.store.persists_blocks:
        raise SdspruneError(
            "distillation trains the whole model in memory: it cannot run with --low-memory"
        )
    try:
        check_head_replay(net, windows[:1, :HEAD_CHECK_TOKENS].to(next(net.parameters()).device))
    except SdspruneError as exc:
        raise SdspruneError(f"distillation: {exc}; run SDS with --distill-epochs 0") from exc


def _distill_on(
    net, windows, last_outputs, config: SDSConfig, device, runtime: Runtime, progress: bool
) -> dict:
    """The distillation stage with the model on the compute device, then back;
    ``last_outputs``: the dense and the pruned model's last-block outputs on the windows."""
    home = next(net.parameters()).device
    net.to(device)
    dense_outputs, pruned_outputs = last_outputs
    try:
        return distill(
            net,
            windows,
            dense_outputs,
            config,
            device,
            runtime.dist,
            progress,
            student_outputs=pruned_outputs,
        ).to_dict()
    finally:
        net.to(home)


def _run_staged(
    net, stream, steps, device, timer, label, progress, runtime: Runtime
) -> tuple[dict, int]:
    """The three passes; returns the records and the bytes the dense copies held."""
    originals = DenseOriginals(net, runtime.store)
    initial = stream.clone()
    records: dict[str, dict] = {}

    def run_pass(stage: str, mark: str, inputs: ActivationStream, processor: _StagedPass) -> None:
        """One pass over every block, with the dense model's inputs if the pass reads them."""
        with timer.stage(stage):
            more = run_blocks(
                net,
                inputs,
                processor,
                device,
                dense_stream=initial.clone() if processor.dense_stream else None,
                desc=f"{label} {mark}",
                progress=progress,
                timer=timer,
                runtime=runtime,
            )
            _merge(records, more)

    run_pass("sds_step1_prune", "S", stream, _StagedFirstPrune(steps, originals))
    run_pass("sds_step2_redense", "D", initial.clone(), _StagedRedense(steps, originals))
    run_pass("sds_step3_prune_adjust", "S", initial, _StagedSecondPrune(steps, originals))
    return records, originals.nbytes


def _merge(records: dict[str, dict], more: dict[str, dict]) -> None:
    for name, record in more.items():
        records.setdefault(name, {}).update(record)


def _stage_means(records: dict[str, dict]) -> dict[str, float]:
    means = {}
    for stage in STAGES:
        values = [
            rec[f"rel_error_{stage}"] for rec in records.values() if f"rel_error_{stage}" in rec
        ]
        if values:
            means[stage] = sum(values) / len(values)
    return means


def _block_means(records: dict[str, dict]) -> dict[str, float]:
    """Mean block output error before and after the block re-fit, and with a block re-dense
    the share of pruned entries that came back (one value per block)."""
    blocks = {
        name.split(".")[0]: rec for name, rec in records.items() if "block_error_start" in rec
    }
    if not blocks:
        return {}
    keys = ["block_error_start", "block_error_final"]
    if all("block_masks_changed" in rec for rec in blocks.values()):
        keys.append("block_masks_changed")
    return {f"mean_{key}": sum(rec[key] for rec in blocks.values()) / len(blocks) for key in keys}


def default_figure_layer(net: nn.Module) -> str:
    """The first linear layer of the middle block: representative and easy to find again."""
    names = list(model_linears(net))
    middle = len({name.split(".")[0] for name in names}) // 2
    return next(name for name in names if name.startswith(f"{middle}."))
