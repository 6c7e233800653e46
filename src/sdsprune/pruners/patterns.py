"""Sparsity patterns (unstructured fraction or N:M) and exact mask selection from scores."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from sdsprune.errors import SdspruneError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityPattern:
    """Either a fraction of zeros per layer, or N zeros in every M consecutive inputs of a row."""

    fraction: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.fraction:g}"

    def for_block(self, index: int) -> SparsityPattern:
        """The pattern of decoder block ``index``: the same everywhere (see sdsprune.owl for
        per-block sparsities)."""
        return self

    @classmethod
    def parse(cls, spec: str | float | SparsityPattern) -> SparsityPattern:
        """Parse ``0.5`` (unstructured) or ``2:4`` / ``4:8`` (N zeros of every M)."""
        if isinstance(spec, SparsityPattern):
            return spec
        match = _NM.match(str(spec))
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            if not 0 < n < m:
                raise SdspruneError(f"N:M sparsity needs 0 < N < M (got {n}:{m})")
            return cls(fraction=n / m, n=n, m=m)
        try:
            fraction = float(spec)
        except ValueError as exc:
            raise SdspruneError(
                f"sparsity '{spec}' is neither a fraction like 0.5 nor N:M like 2:4"
            ) from exc
        if not 0 < fraction < 1 or math.isnan(fraction):
            raise SdspruneError(f"sparsity must lie strictly between 0 and 1 (got {spec})")
        return cls(fraction=fraction)

    def check_layers(self, layers: dict[str, nn.Linear]) -> None:
        """Refuse before any work starts when a layer width does not fit the pattern."""
        if not self.is_nm:
            return
        bad = [name for name, layer in layers.items() if layer.in_features % self.m]
        if bad:
            width = layers[bad[0]].in_features
            raise SdspruneError(
                f"{self} sparsity needs input widths divisible by {self.m}; layer {bad[0]} has "
                f"{width} inputs ({len(bad)} layer(s) affected)"
            )


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the ``k`` lowest entries of each row of ``scores`` (exact count, ties by index)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(-1, torch.topk(scores, k, dim=-1, largest=False).indices, True)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True at the ``n`` lowest scores of every group of ``m`` consecutive columns."""
    rows, cols = scores.shape
    grouped = scores.reshape(rows, cols // m, m)
    return lowest_k_mask(grouped, n).reshape(rows, cols)


def row_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Prune the same number of lowest scores in every row (Wanda's comparison group)."""
    return lowest_k_mask(scores, int(scores.shape[1] * fraction))


def layer_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Prune the lowest ``fraction`` of all scores of the layer (magnitude's group)."""
    flat = lowest_k_mask(scores.reshape(1, -1), int(scores.numel() * fraction))
    return flat.reshape(scores.shape)


def pattern_mask(scores: torch.Tensor, pattern: SparsityPattern, group: str) -> torch.Tensor:
    """Mask (True = pruned) choosing by ``scores``: N:M groups, or per ``row``/``layer``."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    if group == "row":
        return row_mask(scores, pattern.fraction)
    return layer_mask(scores, pattern.fraction)
