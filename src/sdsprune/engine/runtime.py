"""How the engine runs this time: where blocks live, who else computes, what is saved.

A :class:`Runtime` is built once per run (``prune()`` builds it from the run's options and
memory plan, see ``engine.runs``) and handed explicitly to every ``capture_block_inputs``
and ``run_blocks`` call of that run, through the method's pipeline. Both default to a fresh
plain runtime (in memory, one process, nothing saved), so simple callers need not build one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from sdsprune.engine.checkpoint import Checkpointer
    from sdsprune.engine.distributed import Distributed

# A block's forward batch in tokens, unless the memory plan lowers it.
DEFAULT_TOKENS_PER_BATCH = 8192


class BlockStore:
    """Where a block's weights live between its turns. The default keeps the whole model in
    memory and only moves the current block to the compute device and back."""

    persists_blocks = False  # True when release() writes the block to disk itself

    def fetch(self, index: int, block: nn.Module, device: torch.device) -> torch.device:
        """Put the block on ``device``; returns where it should go back to."""
        home = next(block.parameters()).device
        block.to(device)
        return home

    def release(self, index: int, block: nn.Module, home: torch.device) -> None:
        block.to(home)


@dataclass
class Runtime:
    """The options of one run that capture and ``run_blocks`` honour, and the count of
    passes so far (a checkpoint names its pass, so a resumed run knows where it was)."""

    store: BlockStore = field(default_factory=BlockStore)
    dist: Distributed | None = None
    checkpoint: Checkpointer | None = None
    passes: int = 0  # run_blocks calls so far in this run
    offload_activations: bool = False  # keep calibration activations in CPU memory
    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH  # the memory plan may lower it

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.rank == 0
