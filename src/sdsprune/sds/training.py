"""What the two training stages of SDS share (the block re-fit and the distillation): which
weights train and in what precision, their step sizes, snapshots, and sums across ranks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from sdsprune.engine.distributed import Distributed


@contextlib.contextmanager
def trainable(module: nn.Module, weights: list[nn.Parameter]) -> Iterator[None]:
    """Gradients for ``weights`` only, ``module`` in fp32 (bf16 Adam steps would mostly round
    away); its dtype and flags come back afterwards."""
    dtype = next(module.parameters()).dtype
    flags = {id(p): p.requires_grad for p in module.parameters()}
    module.float()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for parameter in module.parameters():
            parameter.requires_grad_(flags.get(id(parameter), False))
            parameter.grad = None
        module.to(dtype)


def sum_gradients_over_ranks(weights: list[nn.Parameter], dist: Distributed | None) -> None:
    """Missing gradients as zeros, then (with several processes) summed over the ranks in
    one flat all-reduce, so every rank takes the same step."""
    for weight in weights:
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
    if dist is None:
        return
    flat = torch.cat([w.grad.reshape(-1) for w in weights])
    dist.all_reduce_(flat)
    offset = 0
    for weight in weights:
        weight.grad.copy_(flat[offset : offset + weight.numel()].view_as(weight))
        offset += weight.numel()


class FixedMasks:
    """The pruned entries of some layers, fixed when a training stage starts, so that the
    stage keeps the pattern (and the sparsity) exact.

    ``masked_fill_``, not a multiplication by the mask: NaN x 0 and Inf x 0 are NaN, so a
    non-finite value at a pruned entry would survive a ``mul_`` (and, in a gradient, reach
    Adam's moments and from there the weight).
    """

    def __init__(self, linears: dict[str, nn.Linear]):
        self.linears = linears
        self.pruned = {name: layer.weight == 0 for name, layer in linears.items()}

    @torch.no_grad()
    def zero_weights_(self) -> None:
        for name, layer in self.linears.items():
            layer.weight.masked_fill_(self.pruned[name], 0)

    def zero_gradients_(self) -> None:
        for name, layer in self.linears.items():
            layer.weight.grad.masked_fill_(self.pruned[name], 0)


def weight_rms(weight: torch.Tensor) -> float:
    """A layer's weight RMS: step sizes are given as a fraction of it (any model width)."""
    return float(weight.detach().float().square().mean().sqrt())


def snapshot(weights: list[nn.Parameter]) -> list[torch.Tensor]:
    return [w.detach().clone() for w in weights]


@torch.no_grad()
def restore(weights: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    for weight, value in zip(weights, values, strict=True):
        weight.copy_(value)


def sum_over_ranks(dist: Distributed | None, value: float) -> float:
    return value if dist is None else dist.sum_floats([value])[0]
