"""How the engine runs this time: where blocks live, who else computes, what is saved.

``run_blocks`` is called by pipelines the engine does not own (``prune``'s one-shot path,
the SDS schedules), and those calls do not pass low-memory, distributed or checkpoint
options. ``prune()`` instead installs a :class:`RunSession` for the duration of a run, and
``run_blocks`` reads it: the pipelines stay unchanged and the default session costs nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from sdsprune.engine.checkpoint import Checkpointer
    from sdsprune.engine.distributed import Distributed


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
class RunSession:
    """Options of the current run that ``run_blocks`` honours (see the module docstring)."""

    store: BlockStore = field(default_factory=BlockStore)
    dist: Distributed | None = None
    checkpoint: Checkpointer | None = None
    passes: int = 0  # run_blocks calls so far in this run
    offload_activations: bool = False  # keep calibration activations in CPU memory
    tokens_per_batch: int = 8192  # a block's forward batch (the memory plan may lower it)

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.rank == 0


_SESSION: contextvars.ContextVar[RunSession | None] = contextvars.ContextVar(
    "sdsprune_session", default=None
)


def current_session() -> RunSession:
    """The installed session, or a fresh default one (plain in-memory, single process)."""
    return _SESSION.get() or RunSession()


@contextlib.contextmanager
def use_session(session: RunSession) -> Iterator[RunSession]:
    token = _SESSION.set(session)
    try:
        yield session
    finally:
        _SESSION.reset(token)
