"""Capture what the decoder blocks receive, so blocks can then be run one at a time, and
replay the model's head (what comes after the blocks) on given last-block outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from sdsprune.engine.runtime import DEFAULT_TOKENS_PER_BATCH, Runtime
from sdsprune.errors import SdspruneError
from sdsprune.models.blocks import decoder_blocks


class _StopForward(Exception):
    """Raised by the last catcher: nothing after the blocks needs computing."""


class _StandIn(nn.Module):
    """Takes a decoder block's place in the model's loop without running it.

    Attribute reads fall through to the real block, because some model loops read block
    attributes (Gemma 3 picks each block's mask and rotary embedding by its attention type).
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        object.__setattr__(self, "inner", block)  # not registered: stays where it is

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "inner"), name)


@contextlib.contextmanager
def _stand_ins(model: nn.Module, make) -> Iterator[None]:
    """Every decoder block replaced by ``make(index, block)`` for the duration."""
    blocks = decoder_blocks(model)
    originals = list(blocks)
    for index, block in enumerate(originals):
        blocks[index] = make(index, block)
    try:
        yield
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block


class _Catcher(_StandIn):
    """Stands in for a decoder block during capture and records its call."""

    def __init__(self, block: nn.Module, record: dict, last: bool):
        super().__init__(block)
        self.record = record
        self.last = last

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
    count = len(decoder_blocks(model))
    records = [{} for _ in range(count)]
    home = _module_device(model)
    hidden = None

    def catcher(index: int, block: nn.Module) -> _Catcher:
        return _Catcher(block, records[index], last=index == count - 1)

    with _stand_ins(model, catcher):
        try:
            model.to(device)
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start : start + batch_size].to(device)
                with contextlib.suppress(_StopForward):
                    model(input_ids=batch, use_cache=False)
                captured = records[0].pop("hidden")[0]
                if hidden is None:  # one buffer for all windows: no list of batches to join
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
    if not torch.isfinite(hidden).all():
        raise SdspruneError("the embeddings produce NaN/Inf activations (corrupt weights?)")
    return ActivationStream(
        hidden=hidden,
        batch_size=batch_size,
        block_args=[_to(record["args"], device) for record in records],
        block_kwargs=[_to(record["kwargs"], device) for record in records],
        compute=device if offload else None,
    )


class _Replay(_StandIn):
    """Stands in for a decoder block in a head replay: hands its input on, or, standing in
    for the last block, returns the given last-block outputs."""

    def __init__(self, block: nn.Module, outputs: torch.Tensor | None):
        super().__init__(block)
        self.outputs = outputs

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.outputs is None else self.outputs


def head_logits(model: nn.Module, ids: torch.Tensor, last_outputs: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``ids`` given its last decoder block's outputs on them.

    It is the model's own forward with every block stood in for: whatever the architecture
    puts after the blocks (final norm, output projection, logit scaling or capping) applies
    as the model defines it, and no block runs. :func:`check_head_replay` verifies a model.
    """
    last = len(decoder_blocks(model)) - 1
    outputs = last_outputs.to(next(model.parameters()).dtype)

    def replay(index: int, block: nn.Module) -> _Replay:
        return _Replay(block, outputs if index == last else None)

    with _stand_ins(model, replay):
        return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def logits_and_last_block_outputs(
    model: nn.Module, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits on ``ids`` and its last decoder block's outputs on the way."""
    seen: dict[str, torch.Tensor] = {}

    def keep(module, inputs, output) -> None:
        seen["outputs"] = output[0] if isinstance(output, tuple | list) else output

    handle = decoder_blocks(model)[-1].register_forward_hook(keep)
    try:
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
    return logits, seen["outputs"]


@torch.no_grad()
def check_head_replay(model: nn.Module, ids: torch.Tensor) -> None:
    """Fail unless :func:`head_logits` on the model's own last-block outputs gives its
    forward's logits on ``ids`` (a model whose loop the stand-ins do not fit fails here)."""
    expected, outputs = logits_and_last_block_outputs(model, ids)
    try:
        replayed = head_logits(model, ids, outputs)
        same = replayed.shape == expected.shape and torch.allclose(
            replayed, expected, rtol=1e-4, atol=1e-4
        )
    except Exception as exc:  # the model's own code, with stand-ins it does not expect
        raise SdspruneError(
            f"{type(model).__name__}'s head cannot be run on its last block's outputs "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if not same:
        raise SdspruneError(
            f"{type(model).__name__}'s head, run on its last block's outputs, does not give "
            "its forward's logits"
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
