"""Pruner-Zero (Dong et al., ICML 2024): the symbolic importance metric its genetic search
found, S = |W ⊙ W| ⊙ σ(G), with σ min-max scaling to [0, 1], compared within output rows.

G in the paper is the ℓ2 norm over calibration samples of the language-model loss gradient
of each weight (computed beforehand by back-propagating through the dense model, as in
GBLM-Pruner). sdsprune computes no gradients, so G is replaced by the gradient-free
estimate ‖X_j‖ (the weight's input feature norm, the magnitude a weight's gradient
∂L/∂W_ij = Σ_t δ_i(t) x_j(t) scales with when the output gradients δ are uniform), giving
S_ij = W_ij² · σ(‖X_j‖). See the README's "Base pruners" section for this difference.
"""

from __future__ import annotations

import torch

from sdsprune.pruners.base import InputStats, PruneOutcome, Pruner
from sdsprune.pruners.patterns import SparsityPattern, pattern_mask


class PrunerZeroPruner(Pruner):
    name = "pruner-zero"
    needs = "sumsq"
    unstructured_group = "row"  # the published code sorts each output row, as Wanda does

    def prune(
        self, weight: torch.Tensor, stats: InputStats | None, pattern: SparsityPattern
    ) -> PruneOutcome:
        assert stats is not None, "Pruner-Zero needs input feature norms"
        gradient_proxy = stats.feature_norms.to(weight.device).unsqueeze(0)
        scores = weight.float().square() * min_max_scaled(gradient_proxy)
        mask = pattern_mask(scores, pattern, self.unstructured_group)
        return PruneOutcome(weight.masked_fill(mask, 0.0), mask)


def min_max_scaled(values: torch.Tensor) -> torch.Tensor:
    """Pruner-Zero's σ: (v − min) / (max − min); constant inputs map to ones (no ranking
    information, so the metric falls back to |W|²)."""
    span = values.max() - values.min()
    if span <= 0:
        return torch.ones_like(values)
    return (values - values.min()) / span
