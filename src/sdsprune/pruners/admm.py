"""ADMM weight update with a gradually growing mask (Boža, "Fast and Effective Weight Update
for Pruned Large Language Models", TMLR 2024).

The layer problem min ‖(W_d − W) X‖² s.t. W has the pattern is split ADMM-style into a dense
copy W (a ridge-regularised least-squares step, one fixed matrix inverse for all iterations)
and a sparse copy Z (a projection onto the pattern), tied by the scaled dual U:

    Z ← P(W + U),   U ← U + W − Z,   W ← (A W_d + ρ (Z − U)) (A + ρ I)⁻¹,   A = G + ρ₀ I

Everything runs in the input-normalised basis (G_jj = 1, W_ij·‖X_j‖), where |W + U| ranks
weights like Wanda's score, and the projection's sparsity grows cubically over the first
``growth_iterations`` iterations so the mask can settle instead of being fixed at once.
Needs only the Gram matrix.
"""

from __future__ import annotations

import torch

from sdsprune.pruners.base import InputStats, PruneOutcome, Pruner
from sdsprune.pruners.patterns import SparsityPattern, layer_mask, nm_mask


class ADMMPruner(Pruner):
    """Its settings and their defaults (the published code's): :class:`sdsprune.methods.ADMM`."""

    name = "admm"
    needs = "gram"
    unstructured_group = "layer"  # the published code thresholds over the whole layer

    def __init__(
        self,
        iterations: int,
        growth_iterations: int,
        rho: float,
        percdamp: float,
    ):
        if not 0 < growth_iterations <= iterations:
            raise ValueError("need 0 < growth_iterations <= iterations")
        if rho <= 0 or percdamp < 0:
            raise ValueError("need rho > 0 and percdamp >= 0")
        self.iterations = iterations
        self.growth_iterations = growth_iterations
        self.rho = rho
        self.percdamp = percdamp

    def prune(
        self, weight: torch.Tensor, stats: InputStats | None, pattern: SparsityPattern
    ) -> PruneOutcome:
        assert stats is not None and stats.gram is not None, "ADMM needs the Gram matrix"
        gram = stats.gram.to(weight.device, torch.float32)
        norms = torch.diagonal(gram).clamp_min(0).sqrt() + 1e-8
        dense = weight.float() * norms  # W·diag(‖x‖): the normalised basis
        damped = gram / norms[:, None] / norms[None, :]
        damped.diagonal().add_(self.percdamp * damped.diagonal().mean())
        target = dense @ damped
        solve = _inverse_spd(damped, ridge=self.rho)
        current, dual = dense, torch.zeros_like(dense)
        keep = torch.ones_like(dense, dtype=torch.bool)
        for step in range(self.iterations):
            if step < self.growth_iterations:
                keep = ~growing_mask((current + dual).abs(), pattern, self._fraction(step, pattern))
            sparse = (current + dual) * keep
            dual = dual + current - sparse
            current = (target + self.rho * (sparse - dual)) @ solve
        result = ((current + dual) * keep) / norms
        return PruneOutcome(result, ~keep)

    def _fraction(self, step: int, pattern: SparsityPattern) -> float:
        """The cubic schedule s·(1 − (1 − t/T)³): fast growth first, gentle near the end."""
        progress = (step + 1) / self.growth_iterations
        return pattern.fraction * (1 - (1 - progress) ** 3)


def growing_mask(scores: torch.Tensor, pattern: SparsityPattern, fraction: float) -> torch.Tensor:
    """Mask (True = pruned) of the ``fraction`` lowest scores of the layer on the way to
    ``pattern``: for N:M only among each group's N lowest, so the end point is the N:M mask."""
    if fraction >= pattern.fraction:
        if pattern.is_nm:
            return nm_mask(scores, pattern.n, pattern.m)
        return layer_mask(scores, pattern.fraction)
    if pattern.is_nm:
        candidates = nm_mask(scores, pattern.n, pattern.m)
        scores = scores.masked_fill(~candidates, float("inf"))
    return layer_mask(scores, fraction)


def _inverse_spd(matrix: torch.Tensor, ridge: float) -> torch.Tensor:
    """(matrix + ridge·I)⁻¹ of a symmetric positive definite matrix through its Cholesky
    factor (ρ and the dampening keep it well conditioned even for dead input features);
    the ridge goes onto the diagonal of the float64 copy, not through an identity matrix."""
    system = matrix.to(torch.float64, copy=True)
    system.diagonal().add_(ridge)
    return torch.cholesky_inverse(torch.linalg.cholesky(system)).float()
