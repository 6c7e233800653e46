"""The sequential block-wise engine: capture, statistics, and the per-block driver."""

from sdsprune.engine.capture import ActivationStream, capture_block_inputs, pick_batch_size
from sdsprune.engine.runtime import BlockStore, Runtime
from sdsprune.engine.sequential import BlockContext, BlockProcessor, run_blocks
from sdsprune.engine.stats import StatsCollector

__all__ = [
    "ActivationStream",
    "BlockContext",
    "BlockProcessor",
    "BlockStore",
    "Runtime",
    "StatsCollector",
    "capture_block_inputs",
    "pick_batch_size",
    "run_blocks",
]
