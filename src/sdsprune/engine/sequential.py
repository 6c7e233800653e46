"""The sequential block-wise driver shared by every pruning method.

One block at a time: gather the statistics its linear layers need from the calibration
activations (forward hooks), let a :class:`BlockProcessor` change the weights, then run the
block again so that the next block sees the activations of the already processed model.
Only the current block visits the compute device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from sdsprune.engine.capture import ActivationStream
from sdsprune.engine.checkpoint import blocks_prefix, inject_fault
from sdsprune.engine.distributed import Distributed, layer_owners, reduce_stats
from sdsprune.engine.runtime import Runtime
from sdsprune.engine.stats import StatsCollector
from sdsprune.errors import SdspruneError
from sdsprune.models.blocks import block_linears, decoder_blocks
from sdsprune.runinfo import Timer


@dataclass
class BlockContext:
    """Everything a processor may use for one block."""

    index: int
    block: nn.Module
    linears: dict[str, nn.Linear]
    dense_weights: dict[str, torch.Tensor]  # fp32 copies taken before the processor ran
    stats: StatsCollector | None = None  # inputs of the current (sparse) model
    dense_stats: StatsCollector | None = None  # inputs of the dense model (kd / dd modes)
    records: dict[str, dict] = field(default_factory=dict)
    stream: ActivationStream | None = None  # the block's inputs (this rank's windows)
    dense_targets: torch.Tensor | None = None  # the dense model's block outputs (dense stream)
    dist: Distributed | None = None  # the other ranks, when several processes share the run
    memo: dict = field(default_factory=dict)  # per-block scratch of the processor
    layers_shared: bool = False  # solve_layers() already gave every rank every layer
    outputs: torch.Tensor | None = None  # set by refine() when it already ran the new block

    def set_weight(self, name: str, weight: torch.Tensor) -> None:
        layer = self.linears[name]
        layer.weight.data.copy_(weight.to(layer.weight.dtype))

    def release_solve_state(self) -> None:
        """Drop what only the solvers read (cross-Grams, the dense inputs' Grams, cached
        factorisations) before the re-fit builds its optimiser state: 5.8 GiB for an
        8B-shaped block in SDS kd. The Grams of the current inputs stay: the records'
        output errors are measured on them."""
        self.dense_stats = None
        if self.stats is not None:
            self.stats.release_solve_state()

    def solve_layers(
        self,
        solve: Callable[[str, torch.Tensor], torch.Tensor],
        on_main: Iterable[str] = (),
    ) -> None:
        """Set every layer to ``solve(name, dense_weight)``: for processors whose layers are
        independent given the statistics.

        With several ranks each layer is solved once, by its owner (``on_main`` layers by
        rank 0, e.g. the one whose figure rank 0 draws), then owners broadcast the new
        weights and every rank merges the records, so all ranks continue identically.
        """
        owners = layer_owners(
            list(self.dense_weights),
            {name: weight.numel() for name, weight in self.dense_weights.items()},
            1 if self.dist is None else self.dist.world,
            pinned=set(on_main),
        )
        rank = 0 if self.dist is None else self.dist.rank
        for name, dense in self.dense_weights.items():
            if owners[name] == rank:
                self.set_weight(name, solve(name, dense))
        if self.dist is not None:
            _share_results(self, owners, self.dist)
        self.layers_shared = True


class BlockProcessor:
    """What a pass does to each block. Subclasses override :meth:`process`.

    ``needs``: statistics level of the current model's inputs ("none", "sumsq", "gram");
    ``dense_stream``: also run the dense model alongside (inputs for ``kd``/``dd``);
    ``dense_statistics``: with the dense stream, also collect the Gram matrices of its inputs
    and the cross-Gram with the current model's (off when only the dense outputs are used);
    ``propagate``: feed the next block with outputs of the ``processed`` block (normal
    sequential pruning) or of the ``original`` block (a pass that must not see its own edits).
    ``probe_errors``: measure in the output pass the relative output error of layers whose
    record has none (methods without a Gram matrix); it costs part of a forward pass.
    :meth:`refine` runs after :meth:`process` (and after the ranks exchanged its weights).
    """

    needs: str = "none"
    dense_stream: bool = False
    dense_statistics: bool = True
    propagate: str = "processed"
    probe_errors: bool = True

    def process(self, ctx: BlockContext) -> None:
        raise NotImplementedError

    def refine(self, ctx: BlockContext) -> None:
        """Work on the whole block after every rank holds the processed layers (e.g. a
        block-level re-fit). It may set ``ctx.outputs`` to the new block's outputs on
        ``ctx.stream`` to spare the output pass."""

    def dense_weights_for(self, index: int) -> dict[str, torch.Tensor] | None:
        """Weights the dense stream should run with, when they are not the block's own."""
        return None


@torch.no_grad()
def run_blocks(
    model: nn.Module,
    stream: ActivationStream,
    processor: BlockProcessor,
    device: torch.device,
    *,
    dense_stream: ActivationStream | None = None,
    desc: str = "blocks",
    progress: bool = True,
    on_block_done=None,
    start_block: int = 0,
    timer: Timer | None = None,
    runtime: Runtime | None = None,
) -> dict[str, dict]:
    """Process every decoder block in order; returns per-layer records ``"i.name" -> dict``.

    The run's :class:`~sdsprune.engine.runtime.Runtime` (by default a plain one) decides
    where blocks live between turns (memory or disk), whether other ranks share the work,
    and whether the state is saved after each block (and restored first, when resuming).
    """
    runtime = Runtime() if runtime is None else runtime
    pass_index = runtime.passes
    runtime.passes += 1
    blocks = decoder_blocks(model)
    prefix = blocks_prefix(model) if runtime.checkpoint is not None else ""
    records: dict[str, dict] = {}
    if runtime.checkpoint is not None:
        start_block, records = runtime.checkpoint.restore(
            pass_index, blocks, prefix, stream, dense_stream, runtime.store.persists_blocks
        )
    bar = tqdm(
        total=len(blocks),
        initial=start_block,
        desc=desc,
        unit="block",
        disable=not progress or not runtime.is_main,
    )
    for index in range(start_block, len(blocks)):
        block = blocks[index]
        home = runtime.store.fetch(index, block, device)
        ctx = _process_block(
            index, block, stream, dense_stream, processor, device, timer or Timer(), runtime.dist
        )
        runtime.store.release(index, block, home)
        records.update({f"{index}.{name}": rec for name, rec in ctx.records.items()})
        if runtime.checkpoint is not None:
            runtime.checkpoint.save(
                pass_index,
                index,
                block,
                prefix,
                stream,
                dense_stream,
                records,
                runtime.store.persists_blocks,
            )
        if on_block_done is not None:
            on_block_done(index, stream, dense_stream, records)
        inject_fault(index)
        bar.update(1)
    bar.close()
    return records


def _process_block(
    index, block, stream, dense_stream, processor, device, timer, dist=None
) -> BlockContext:
    linears = block_linears(block)
    ctx = BlockContext(
        index=index,
        block=block,
        linears=linears,
        dense_weights={
            name: layer.weight.detach().float().clone() for name, layer in linears.items()
        },
        stream=stream,
        dist=dist,
    )
    use_dense = processor.dense_stream and dense_stream is not None
    outputs_stored = False
    if processor.needs != "none" or use_dense:
        ctx.stats = StatsCollector(linears, processor.needs or "gram")
        if use_dense and processor.dense_statistics:
            ctx.dense_stats = StatsCollector(linears, "gram", keep_inputs=True)
            ctx.stats.cross_source = ctx.dense_stats
        outputs_stored = processor.propagate != "processed"
        with timer.stage("stats_pass"):
            _stats_pass(ctx, stream, dense_stream if use_dense else None, processor, outputs_stored)
        if dist is not None:
            reduce_stats(dist, ctx.stats)
            if ctx.dense_stats is not None:
                reduce_stats(dist, ctx.dense_stats)
        ctx.stats.finalize()
        if ctx.dense_stats is not None:
            ctx.dense_stats.finalize()
    if use_dense:  # the stats pass left the dense block's outputs in the dense stream
        ctx.dense_targets = dense_stream.hidden
    with timer.stage("solve"):
        if dist is None:
            processor.process(ctx)
        else:
            _process_shared(ctx, processor, dist)
    ctx.release_solve_state()
    with timer.stage("refine"):
        processor.refine(ctx)
    if ctx.outputs is not None and not outputs_stored:
        stream.hidden.copy_(ctx.outputs)
    elif not outputs_stored:
        with timer.stage("output_pass"):
            _output_pass(ctx, stream, dist, processor.probe_errors)
    return ctx


def _stats_pass(ctx, stream, dense_stream, processor, store_outputs: bool) -> None:
    """One forward over the windows with hooks, batch by batch.

    The dense stream's outputs (the next block's dense inputs) replace its inputs in place.
    The current stream's outputs are kept only for a processor that propagates the
    unmodified block (``propagate = "original"``); otherwise the output pass recomputes
    them with the new weights, and nothing is allocated for them here. Both are written
    after both forwards of a batch, because kd's cross-Gram reads the dense inputs then.
    """
    swap = processor.dense_weights_for(ctx.index) if dense_stream is not None else None
    swap = _like_layers(swap, ctx.linears)  # converted once per block, not once per batch
    for start in stream.batches():
        dense_outputs = None
        if dense_stream is not None:
            with _hooks_of(ctx.dense_stats), swapped_weights(ctx.linears, swap):
                dense_outputs = _forward(ctx.index, ctx.block, dense_stream, start)
        with ctx.stats.hooks():
            outputs = _forward(ctx.index, ctx.block, stream, start)
        if dense_outputs is not None:
            dense_stream.store(start, dense_outputs)
        if store_outputs:
            stream.store(start, outputs)


def _hooks_of(stats: StatsCollector | None):
    """The collector's hooks, or nothing when the dense forward gathers no statistics."""
    return contextlib.nullcontext() if stats is None else stats.hooks()


def _like_layers(
    weights: dict[str, torch.Tensor] | None, linears: dict[str, nn.Linear]
) -> dict[str, torch.Tensor] | None:
    """``weights`` on each layer's device and in its dtype (None stays None)."""
    if not weights:
        return weights
    return {
        name: weights[name].to(layer.weight.device, layer.weight.dtype)
        for name, layer in linears.items()
    }


def _process_shared(ctx: BlockContext, processor: BlockProcessor, dist: Distributed) -> None:
    """Prune each layer once and give every rank the result.

    A processor that solves its layers through :meth:`BlockContext.solve_layers` shares
    them itself (each layer solved by its owner rank); any other processor runs on every
    rank on the same reduced statistics, and rank 0's weights and records are kept.
    """
    processor.process(ctx)
    if not ctx.layers_shared:
        _share_results(ctx, dict.fromkeys(ctx.dense_weights, 0), dist)


def _share_results(ctx: BlockContext, owners: dict[str, int], dist: Distributed) -> None:
    """Owners broadcast their layers' weights; every rank keeps each owner's records."""
    for name in ctx.dense_weights:  # module order: the same collectives on every rank
        dist.broadcast_(ctx.linears[name].weight.data, src=owners[name])
    merged: dict[str, dict] = {}
    for rank, records in enumerate(dist.gather_objects(ctx.records)):
        for name, record in records.items():
            if owners.get(name, 0) == rank:
                merged[name] = record
    ctx.records = merged


def _output_pass(
    ctx: BlockContext,
    stream: ActivationStream,
    dist: Distributed | None = None,
    probe_errors: bool = True,
) -> None:
    """Recompute the block's outputs with its new weights, in place of its inputs; measure
    the relative output error of layers whose processor did not report one (it had no Gram
    matrix to compute it)."""
    pending = {name: rec for name, rec in ctx.records.items() if "rel_error" not in rec}
    pending = pending if probe_errors else {}
    stride = max(1, stream.hidden.shape[0] * stream.hidden.shape[1] // PROBE_TOKENS)
    probes = {name: _ErrorProbe(ctx.dense_weights[name], stride) for name in pending}
    handles = [ctx.linears[name].register_forward_hook(probe) for name, probe in probes.items()]
    try:
        for start in stream.batches():
            stream.store(start, _forward(ctx.index, ctx.block, stream, start))
    finally:
        for handle in handles:
            handle.remove()
    if dist is not None:  # the probes hold sums over this rank's tokens only
        sums = dist.sum_floats([v for p in probes.values() for v in (p.error, p.reference)])
        for i, probe in enumerate(probes.values()):
            probe.error, probe.reference = sums[2 * i], sums[2 * i + 1]
    for name, probe in probes.items():
        pending[name]["rel_error"] = probe.relative_error()


# Tokens the output-pass error probe looks at (every k-th token). Measured against the
# reference Wanda code: probing every token doubled the output pass (the dense product is
# the layer's whole matmul again); a 4096-token sample costs a few percent and estimates the
# relative error to about a percent of its value.
PROBE_TOKENS = 4096


class _ErrorProbe:
    """‖x W_dᵀ − x Wᵀ‖² / ‖x W_dᵀ‖² on every ``stride``-th calibration token of the output
    pass, for methods that have no Gram matrix to compute it exactly."""

    def __init__(self, dense_weight: torch.Tensor, stride: int = 1):
        self.dense_weight = dense_weight
        self.stride = stride
        self.error = 0.0
        self.reference = 0.0

    def __call__(self, module, inputs, output):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])[:: self.stride].float()
        y = output.reshape(-1, output.shape[-1])[:: self.stride].float()
        if module.bias is not None:
            y = y - module.bias.float()
        dense = x @ self.dense_weight.to(x.device).T
        self.error += (dense - y).square().sum().item()
        self.reference += dense.square().sum().item()

    def relative_error(self) -> float:
        return self.error / max(self.reference, 1e-30)


def _forward(index: int, block: nn.Module, stream: ActivationStream, start: int) -> torch.Tensor:
    hidden = stream.batch(start)
    out = block(hidden, *stream.block_args[index], **stream.block_kwargs[index])
    if isinstance(out, tuple | list):
        out = out[0]
    if not torch.isfinite(out).all():
        raise SdspruneError(f"NaN/Inf activations after decoder block {index}")
    return out


@contextlib.contextmanager
def swapped_weights(
    linears: dict[str, nn.Linear], weights: dict[str, torch.Tensor] | None
) -> Iterator[None]:
    """Temporarily run the block with other weights (e.g. the dense ones for the dense stream)."""
    if not weights:
        yield
        return
    saved = {name: layer.weight.data for name, layer in linears.items()}
    try:
        for name, layer in linears.items():
            layer.weight.data = weights[name].to(layer.weight.device, layer.weight.dtype)
        yield
    finally:
        for name, layer in linears.items():
            layer.weight.data = saved[name]
