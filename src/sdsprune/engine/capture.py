"""Capture what the decoder blocks receive, so blocks can then be run one at a time."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from sdsprune.engine.runtime import DEFAULT_TOKENS_PER_BATCH, Runtime
from sdsprune.errors import SdspruneError
from sdsprune.models.blocks import decoder_blocks


class _StopForward(Exception):
    """Raised by the last catcher: nothing after the blocks needs computing."""


class _Catcher(nn.Module):
    """Stands in for a decoder block during capture and records its call.

    Attribute reads fall through to the real block, because some model loops read block
    attributes (Gemma 3 picks each block's mask and rotary embedding by its attention type).
    """

    def __init__(self, block: nn.Module, record: dict, last: bool):
        super().__init__()
        object.__setattr__(self, "inner", block)  # not registered: stays where it is
        self.record = record
        self.last = last

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "inner"), name)

    def forward(self, hidden_states, *args, **kwargs):
        self.record.setdefault("hidden", []).append(hidden_states.detach())
        self.record.setdefault("args", args)
        self.record.setdefault("kwargs", kwargs)
        if self.last:
            raise _StopForward
        return hidden_states


@dataclass
class ActivationStream:
    """Hidden states entering the current block, for every calibration window, and the
    extra arguments (masks, rotary embeddings, positions) each block is called with.

    ``hidden`` lives on the compute device, or in CPU memory when activations are
    offloaded (``compute`` then names the device each batch is moved to for its forward).
    """

    hidden: torch.Tensor  # windows x seqlen x hidden
    batch_size: int
    block_args: list[tuple] = field(default_factory=list)
    block_kwargs: list[dict] = field(default_factory=list)
    compute: torch.device | None = None

    def batches(self) -> range:
        return range(0, self.hidden.shape[0], self.batch_size)

    def batch(self, start: int) -> torch.Tensor:
        """The hidden states of the batch at ``start``, on the compute device."""
        hidden = self.hidden[start : start + self.batch_size]
        return hidden if self.compute is None else hidden.to(self.compute)

    def store(self, start: int, outputs: torch.Tensor) -> None:
        """Overwrite the batch at ``start`` with ``outputs`` (the next block's inputs):
        batches are independent, so one buffer per stream serves a whole pass."""
        self.hidden[start : start + self.batch_size] = outputs

    def clone(self) -> ActivationStream:
        return ActivationStream(
            self.hidden.clone(), self.batch_size, self.block_args, self.block_kwargs, self.compute
        )


def pick_batch_size(
    nsamples: int, seqlen: int, tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH
) -> int:
    """The largest divisor of ``nsamples`` that keeps a batch near ``tokens_per_batch``
    (a run's runtime holds the memory plan's, lowered when a batch would not fit).

    A divisor keeps every batch the same shape, so the captured masks fit every batch.
    """
    limit = max(1, tokens_per_batch // seqlen)
    return max(d for d in range(1, min(limit, nsamples) + 1) if nsamples % d == 0)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    batch_size: int | None = None,
    *,
    runtime: Runtime | None = None,
) -> ActivationStream:
    """Run the model up to the first block for every window, and once through all blocks'
    entry points to learn each block's keyword arguments (they may differ per block).

    Only the modules outside the blocks visit ``device``; the blocks stay where they are.
    ``batch_size`` defaults to what the runtime's tokens per batch allow. When the runtime
    offloads activations, each batch's hidden states go to CPU memory as soon as they are
    captured, so the device never holds all of them.
    """
    runtime = Runtime() if runtime is None else runtime
    if batch_size is None:
        batch_size = pick_batch_size(*windows.shape, runtime.tokens_per_batch)
    offload = runtime.offload_activations
    blocks = decoder_blocks(model)
    originals = list(blocks)
    records = [{} for _ in originals]
    for index, block in enumerate(originals):
        blocks[index] = _Catcher(block, records[index], last=index == len(originals) - 1)
    home = _module_device(model)
    hidden = None
    try:
        model.to(device)
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            with contextlib.suppress(_StopForward):
                model(input_ids=batch, use_cache=False)
            captured = records[0].pop("hidden")[0]
            if hidden is None:  # one buffer for all windows: no list of batches to concatenate
                hidden = torch.empty(
                    (windows.shape[0], *captured.shape[1:]),
                    dtype=captured.dtype,
                    device="cpu" if offload else captured.device,
                )
            hidden[start : start + batch_size] = captured
            for record in records[1:]:
                record.pop("hidden", None)  # only block 0's inputs are kept
    finally:
        model.to(home)  # while the catchers stand in: blocks never move (they may be meta)
        for index, block in enumerate(originals):
            blocks[index] = block
    if not torch.isfinite(hidden).all():
        raise SdspruneError("the embeddings produce NaN/Inf activations (corrupt weights?)")
    return ActivationStream(
        hidden=hidden,
        batch_size=batch_size,
        block_args=[_to(record["args"], device) for record in records],
        block_kwargs=[_to(record["kwargs"], device) for record in records],
        compute=device if offload else None,
    )


def _module_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value
