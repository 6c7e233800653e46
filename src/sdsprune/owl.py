"""OWL (Yin et al., "Outlier Weighed Layerwise Sparsity", ICML 2024): a sparsity per decoder
block from its share of outlier weights, the model's total sparsity unchanged.

A statistics pass over the dense model scores every weight like Wanda (|W_ij|·‖X_j‖) and
measures each block's outlier ratio D_b: the fraction of its scores above M x their mean.
Blocks with more outliers are pruned less:

    r_b = 2λ·(D_b − min D) / (max D − min D),   s_b = s − (r_b − r̄)

where r̄ is the parameter-weighted mean of r, so Σ_b n_b s_b = s Σ_b n_b: the total stays
exactly the requested ``s`` (OWL's code subtracts the plain mean, which is the same for
equal blocks). Any base pruner (and SDS) then prunes block b at s_b.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from sdsprune.engine import (
    BlockContext,
    BlockProcessor,
    Runtime,
    capture_block_inputs,
    run_blocks,
)
from sdsprune.errors import SdspruneError
from sdsprune.pruners import SparsityPattern
from sdsprune.runinfo import Timer
from sdsprune.settings import setting


@dataclass(frozen=True)
class OWLConfig:
    """OWL's two knobs, defaults from the paper's LLaMA settings: ``threshold`` M (a score is
    an outlier above M x the block's mean score) and ``lam`` λ (the spread of block
    sparsities around the target)."""

    threshold: float = setting(
        5.0, "OWL's M: a score above M x its block's mean is an outlier.", flag="threshold"
    )
    lam: float = setting(
        0.08, "OWL's lambda: spread of block sparsities around the target.", flag="lambda"
    )

    def __post_init__(self) -> None:
        if self.threshold <= 0 or not 0 <= self.lam < 1:
            raise SdspruneError(
                f"OWL needs M > 0 and 0 <= lambda < 1 (got M={self.threshold}, lambda={self.lam})"
            )

    def check(self, pattern: SparsityPattern, *, low_memory: bool = False, resume: bool = False):
        """Refuse, before any work, what OWL cannot do."""
        if pattern.is_nm:
            raise SdspruneError(
                f"OWL sets a different sparsity per block, so it needs unstructured sparsity "
                f"(got {pattern}); use a fraction such as 0.7"
            )
        if low_memory and resume:  # the saved blocks are pruned: their outliers are gone
            raise SdspruneError("--owl cannot resume a --low-memory run; start it over")


@dataclass(frozen=True)
class BlockSparsity:
    """Unstructured sparsity that differs per decoder block (what the processors ask through
    :meth:`for_block`, like a plain :class:`SparsityPattern`)."""

    target: SparsityPattern
    blocks: tuple[float, ...]

    def for_block(self, index: int) -> SparsityPattern:
        return SparsityPattern(fraction=self.blocks[index])

    def __str__(self) -> str:
        return f"{self.target} (OWL)"


class OutlierCounter(BlockProcessor):
    """The statistics pass: counts each layer's outlier scores against its block's mean.
    Leaves the weights alone and feeds the next block with the dense outputs."""

    needs = "sumsq"
    propagate = "original"

    def __init__(self, threshold: float):
        self.threshold = threshold

    def process(self, ctx: BlockContext) -> None:
        scores = {
            name: dense.abs() * ctx.stats.for_layer(name).feature_norms.to(dense.device)
            for name, dense in ctx.dense_weights.items()
        }
        total = sum(float(score.sum()) for score in scores.values())
        count = sum(score.numel() for score in scores.values())
        cutoff = self.threshold * total / max(count, 1)
        for name, score in scores.items():
            ctx.records[name] = {"outliers": int((score > cutoff).sum()), "params": score.numel()}


def owl_sparsity(
    net: nn.Module,
    windows: torch.Tensor,
    target: SparsityPattern,
    config: OWLConfig,
    device: torch.device,
    timer: Timer,
    progress: bool = True,
    *,
    runtime: Runtime,
) -> tuple[BlockSparsity, dict]:
    """Run the statistics pass with the run's ``runtime`` and return the per-block
    sparsities and their report."""
    config.check(target)
    with timer.stage("owl_stats"):
        stream = capture_block_inputs(net, windows, device, runtime=runtime)
        records = _count_outliers(net, stream, config, device, timer, progress, runtime)
    ratios, sizes = _per_block(records)
    blocks = allocate(ratios, sizes, target.fraction, config.lam)
    report = {
        "threshold": config.threshold,
        "lambda": config.lam,
        "blocks": [
            {"block": index, "outlier_ratio": ratio, "sparsity": sparsity}
            for index, (ratio, sparsity) in enumerate(zip(ratios, blocks, strict=True))
        ],
    }
    return BlockSparsity(target, tuple(blocks)), report


def _count_outliers(net, stream, config, device, timer, progress, runtime) -> dict[str, dict]:
    """The pass runs outside the run's checkpointing, on a copy of its runtime: it changes
    no weight and is cheap to redo, and the pass numbers of the pruning passes stay those
    of a run without OWL."""
    return run_blocks(
        net,
        stream,
        OutlierCounter(config.threshold),
        device,
        desc="owl outliers",
        progress=progress,
        timer=timer,
        runtime=replace(runtime, checkpoint=None),
    )


def _per_block(records: dict[str, dict]) -> tuple[list[float], list[int]]:
    """Outlier ratio and parameter count of each block from the per-layer counts."""
    outliers: dict[int, int] = {}
    params: dict[int, int] = {}
    for key, record in records.items():
        block = int(key.split(".", 1)[0])
        outliers[block] = outliers.get(block, 0) + record["outliers"]
        params[block] = params.get(block, 0) + record["params"]
    order = sorted(params)
    return [outliers[b] / params[b] for b in order], [params[b] for b in order]


def allocate(ratios: list[float], sizes: list[int], target: float, lam: float) -> list[float]:
    """Per-block sparsities: more outliers, lower sparsity; parameter-weighted mean = target."""
    low, high = min(ratios), max(ratios)
    if high <= low:  # no spread to follow: uniform
        return [target] * len(ratios)
    spread = [2 * lam * (ratio - low) / (high - low) for ratio in ratios]
    mean = sum(s * n for s, n in zip(spread, sizes, strict=True)) / sum(sizes)
    blocks = [target - (s - mean) for s in spread]
    if min(blocks) <= 0 or max(blocks) >= 1:
        raise SdspruneError(
            f"OWL with lambda={lam} puts block sparsities outside (0, 1) at sparsity "
            f"{target:g} (range {min(blocks):.3f}..{max(blocks):.3f}); use a smaller lambda"
        )
    return blocks
