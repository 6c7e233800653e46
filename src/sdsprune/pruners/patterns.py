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
            self._check_prunes_something(layers)
            return
        bad = [name for name, layer in layers.items() if layer.in_features % self.m]
        if bad:
            width = layers[bad[0]].in_features
            raise SdspruneError(
                f"{self} sparsity needs input widths divisible by {self.m}; layer {bad[0]} has "
                f"{width} inputs ({len(bad)} layer(s) affected)"
            )

    def _check_prunes_something(self, layers: dict[str, nn.Linear]) -> None:
        """A fraction below one weight of the widest row rounds to no zeros at all in the
        per-row pruners (``--sparsity 1e-9`` ran as a 0% prune, reported as a success)."""
        widest = max((layer.in_features for layer in layers.values()), default=0)
        if widest and self.fraction * widest < 1:
            raise SdspruneError(
                f"sparsity {self} prunes less than one weight per row (widest row: {widest} "
                f"inputs); use at least {1 / widest:.2g}"
            )


# N:M groups up to this size are masked by ranks (m² comparisons), larger ones by top-k
RANKED_GROUP = 8


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the ``k`` lowest entries of each row of ``scores`` (exact count).

    Ties at the threshold go to the lowest column index, so the mask is a function of the
    scores alone: top-k implementations order equal values differently on CPU and GPU.
    """
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.topk(scores, k, dim=-1, largest=False, sorted=False).values.amax(-1)
    return _below_then_first_ties(scores, threshold.unsqueeze(-1), k)


def _below_then_first_ties(scores: torch.Tensor, threshold: torch.Tensor, k: int) -> torch.Tensor:
    """Everything below the k-th lowest value ``threshold``, then as many of the entries equal
    to it as make ``k``, first by position."""
    below = scores < threshold
    ties = scores == threshold
    room = k - below.sum(-1, keepdim=True)
    return below | (ties & (ties.cumsum(-1, dtype=torch.int32) <= room))


def lowest_k_near(scores: torch.Tensor, k: int, guess: float | None) -> tuple[torch.Tensor, float]:
    """:func:`lowest_k_mask` of a 1-D ``scores``, found from a nearby threshold ``guess``.

    An iterative solver that re-selects the same layer-wide mask every step (SDS's
    adjustment) moves the threshold only a little: a few counting passes find a narrow band
    of values around ``guess`` that must contain the k-th lowest, and only that band is
    searched, instead of a top-k over the whole matrix (on a GPU a full sort with int64
    indices, about 12 bytes of scratch per weight). Same mask as :func:`lowest_k_mask`;
    returns the threshold for the next call.
    """
    count = scores.numel()
    if 0 < k < count and guess is not None and guess > 0:
        width = guess / 64
        for _ in range(8):
            low, high = guess - width, guess + width
            below = int((scores < low).sum())
            if below < k <= int((scores <= high).sum()):
                band = scores[(scores >= low) & (scores <= high)]
                threshold = torch.kthvalue(band.cpu(), k - below).values.to(scores.device)
                return _below_then_first_ties(scores, threshold, k), float(threshold)
            width *= 4
    mask = lowest_k_mask(scores.reshape(1, -1), k).reshape(scores.shape)
    kept_low = scores[mask]
    return mask, float(kept_low.max()) if kept_low.numel() else 0.0


class PatternProjector:
    """Projection onto a sparsity pattern (zero the lowest |w| of each group), remembering
    the layer-wide threshold between calls so repeated projections stay cheap."""

    def __init__(self, pattern: SparsityPattern, group: str):
        self.pattern = pattern
        self.group = group
        self.threshold: float | None = None

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        scores = weight.abs()
        if self.pattern.is_nm or self.group != "layer":
            return weight.masked_fill(pattern_mask(scores, self.pattern, self.group), 0.0)
        k = int(weight.numel() * self.pattern.fraction)
        mask, self.threshold = lowest_k_near(scores.reshape(-1), k, self.threshold)
        return weight.masked_fill(mask.view_as(weight), 0.0)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True at the ``n`` lowest scores of every group of ``m`` consecutive columns."""
    rows, cols = scores.shape
    if m <= RANKED_GROUP:
        return _nm_mask_by_rank(scores, n, m)
    grouped = scores.reshape(rows, cols // m, m)
    return lowest_k_mask(grouped, n).reshape(rows, cols)


def _nm_mask_by_rank(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """:func:`nm_mask` from each entry's rank in its group: how many entries of the group are
    lower, or equal and further left (the tie rule of :func:`lowest_k_mask`, so the same
    mask). A top-k over millions of 4-wide groups is slow; one comparison per pair of
    positions (strided columns, no copy) is not (2:4 on a 1536 x 576 layer: 1.0 ms against
    30 ms for top-k and 2.8 ms for a rank from every ordered pair), and SDS's adjustment
    re-selects the mask at every step."""
    rows, cols = scores.shape
    grouped = scores.reshape(-1, m)
    positions = grouped.unbind(1)  # position j of every group, a strided view
    ranks = [torch.zeros_like(positions[0], dtype=torch.uint8) for _ in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            left_not_higher = positions[i] <= positions[j]  # counts toward j's rank, else i's
            ranks[j] += left_not_higher
            ranks[i] += ~left_not_higher
    return torch.stack([rank < n for rank in ranks], dim=1).reshape(rows, cols)


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
