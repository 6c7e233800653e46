"""Wanda (Sun et al. 2023): score |W_ij| x ‖X_j‖₂, compared within each output row."""

from __future__ import annotations

import torch

from sdsprune.pruners.base import InputStats, PruneOutcome, Pruner
from sdsprune.pruners.patterns import SparsityPattern, pattern_mask


class WandaPruner(Pruner):
    name = "wanda"
    needs = "sumsq"
    unstructured_group = "row"

    def prune(
        self, weight: torch.Tensor, stats: InputStats | None, pattern: SparsityPattern
    ) -> PruneOutcome:
        assert stats is not None, "Wanda needs input feature norms"
        scores = weight.abs() * stats.feature_norms.to(weight.device).unsqueeze(0)
        mask = pattern_mask(scores, pattern, self.unstructured_group)
        return PruneOutcome(weight.masked_fill(mask, 0.0), mask)
