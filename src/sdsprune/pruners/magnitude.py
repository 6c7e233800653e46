"""Magnitude pruning: drop the smallest |w| of each layer (N:M: of each group)."""

from __future__ import annotations

import torch

from sdsprune.pruners.base import InputStats, PruneOutcome, Pruner
from sdsprune.pruners.patterns import SparsityPattern, pattern_mask


class MagnitudePruner(Pruner):
    name = "magnitude"
    needs = "none"
    unstructured_group = "layer"  # the reference code thresholds over the whole layer

    def prune(
        self, weight: torch.Tensor, stats: InputStats | None, pattern: SparsityPattern
    ) -> PruneOutcome:
        mask = pattern_mask(weight.abs(), pattern, self.unstructured_group)
        return PruneOutcome(weight.masked_fill(mask, 0.0), mask)
