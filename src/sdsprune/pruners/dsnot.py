"""DSnoT (Zhang et al., "Dynamic Sparse No Training", ICLR 2024): training-free mask
refinement by prune-and-grow swaps on top of an initial Wanda/SparseGPT/magnitude mask.

Each weight's expected contribution to its output is c_ij = W_ij·E[x_j], so a row's pruned
weights shift its mean output by e_i = Σ_pruned c_ij. While |e_i| exceeds a threshold, the row
swaps once per cycle: it regrows the pruned weight whose contribution cancels e_i best
(largest same-sign c_ij / Var[x_j]) and prunes, to keep the count, a kept weight pushing the
other way with the smallest Wanda score (N:M: the weakest kept weight of the regrown one's
group). Weights keep their dense values: only the mask changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdsprune.pruners.base import InputStats, PruneOutcome, Pruner
from sdsprune.pruners.patterns import SparsityPattern, pattern_mask
from sdsprune.pruners.sparsegpt import inverse_hessian_cholesky

INITIAL_METHODS = ("wanda", "sparsegpt", "magnitude")


class DSnoTPruner(Pruner):
    """Its settings and their defaults (the published code's): :class:`sdsprune.methods.DSnoT`."""

    name = "dsnot"
    unstructured_group = "row"  # swaps keep every row's count, like Wanda's groups

    def __init__(
        self,
        initial: str,
        max_cycles: int,
        update_threshold: float,
        variance_power: float,
    ):
        if initial not in INITIAL_METHODS:
            raise ValueError(f"initial must be one of {', '.join(INITIAL_METHODS)}")
        if max_cycles < 0 or update_threshold < 0:
            raise ValueError("need max_cycles >= 0 and update_threshold >= 0")
        self.initial = initial
        self.max_cycles = max_cycles
        self.update_threshold = update_threshold
        self.variance_power = variance_power
        # SparseGPT's saliency needs the inverse Hessian; the others only feature norms
        self.needs = "gram" if initial == "sparsegpt" else "sumsq"

    def prune(
        self, weight: torch.Tensor, stats: InputStats | None, pattern: SparsityPattern
    ) -> PruneOutcome:
        assert stats is not None, "DSnoT needs input statistics"
        weight = weight.float()
        device = weight.device
        norms = stats.feature_norms.to(device)
        initial = self._initial_scores(weight, stats, norms)
        mask = pattern_mask(initial, pattern, self.unstructured_group)
        contribution = weight * stats.feature_means.to(device)
        variance = stats.feature_variances.to(device).clamp_min(1e-12) ** self.variance_power
        swaps = _Swaps(mask, contribution, contribution / variance)
        if pattern.is_nm:
            swaps.run_nm(initial, pattern.m, self.max_cycles, self.update_threshold)
        else:
            wanda = weight.abs() * norms
            swaps.run_unstructured(wanda, self.max_cycles, self.update_threshold)
        return PruneOutcome(weight.masked_fill(swaps.mask, 0.0), swaps.mask)

    def _initial_scores(self, weight, stats: InputStats, norms: torch.Tensor) -> torch.Tensor:
        """The score the initial mask is chosen by (lowest pruned), as in DSnoT's code: the
        SparseGPT option takes its saliency w²/[H⁻¹]²_jj but no weight update."""
        if self.initial == "wanda":
            return weight.abs() * norms
        if self.initial == "magnitude":
            return weight.abs()
        assert stats.gram is not None
        gram = stats.gram.to(weight.device, torch.float32).clone()
        dead = torch.diagonal(gram) == 0
        gram[dead, dead] = 1.0
        diag = torch.diagonal(inverse_hessian_cholesky(gram, 0.01))
        return weight.masked_fill(dead[None, :], 0.0).square() / diag.square()


@dataclass
class _Swaps:
    """The swap loop, vectorised over rows: every row advances through its own sorted
    candidate lists, one swap per cycle, until its error is small or a list runs out."""

    mask: torch.Tensor  # True = pruned; updated in place
    contribution: torch.Tensor  # c_ij = W_ij E[x_j]
    grow_score: torch.Tensor  # c_ij / Var[x_j]^p

    def __post_init__(self) -> None:
        self.rows = torch.arange(self.mask.shape[0], device=self.mask.device)
        self.error = (self.contribution * self.mask).sum(1)
        # regrow candidates: pruned, same sign as the error, largest |score| first
        pruned = self.mask
        self.grow_up = _Ordered(pruned & (self.contribution > 0), -self.grow_score)
        self.grow_down = _Ordered(pruned & (self.contribution < 0), self.grow_score)

    def run_unstructured(self, wanda: torch.Tensor, cycles: int, threshold: float) -> None:
        kept = ~self.mask
        cut_negative = _Ordered(kept & (self.contribution < 0), wanda)
        cut_positive = _Ordered(kept & (self.contribution > 0), wanda)
        active = torch.ones_like(self.error, dtype=torch.bool)
        for _ in range(cycles):
            rising = self.error > 0  # regrow positive contributions, cut negative ones
            active &= self.error.abs() > threshold
            active &= torch.where(rising, self.grow_up.left(), self.grow_down.left())
            active &= torch.where(rising, cut_negative.left(), cut_positive.left())
            if not active.any():
                return
            grow = torch.where(rising, self.grow_up.take(active & rising), 0)
            grow = torch.where(rising, grow, self.grow_down.take(active & ~rising))
            cut = torch.where(rising, cut_negative.take(active & rising), 0)
            cut = torch.where(rising, cut, cut_positive.take(active & ~rising))
            self._swap(active, grow, cut)

    def run_nm(self, initial: torch.Tensor, m: int, cycles: int, threshold: float) -> None:
        """N:M: the weight cut is the kept one of the regrown weight's group with the lowest
        initial score, so every group keeps its N zeros; each weight moves at most once."""
        cuttable = initial.masked_fill(self.mask, float("inf"))
        active = torch.ones_like(self.error, dtype=torch.bool)
        offsets = torch.arange(m, device=self.mask.device)
        for _ in range(cycles):
            rising = self.error > 0
            active &= self.error.abs() > threshold
            active &= torch.where(rising, self.grow_up.left(), self.grow_down.left())
            if not active.any():
                return
            grow = torch.where(rising, self.grow_up.take(active & rising), 0)
            grow = torch.where(rising, grow, self.grow_down.take(active & ~rising))
            group = (grow - grow % m)[:, None] + offsets[None, :]
            best = cuttable.gather(1, group).min(1)
            possible = active & torch.isfinite(best.values)  # else skip this candidate
            cut = group.gather(1, best.indices[:, None]).squeeze(1)
            self._swap(possible, grow, cut)
            cuttable[self.rows[possible], cut[possible]] = float("inf")

    def _swap(self, rows: torch.Tensor, grow: torch.Tensor, cut: torch.Tensor) -> None:
        index = self.rows[rows]
        self.mask[index, grow[rows]] = False
        self.mask[index, cut[rows]] = True
        change = self.contribution[index, cut[rows]] - self.contribution[index, grow[rows]]
        self.error[index] += change


class _Ordered:
    """Per-row candidate columns (where ``allowed``) in ascending ``key`` order, with a
    cursor per row: ``take`` returns each row's next candidate and advances chosen rows."""

    def __init__(self, allowed: torch.Tensor, key: torch.Tensor):
        ordered = key.masked_fill(~allowed, float("inf"))
        self.columns = torch.sort(ordered, dim=1, stable=True).indices
        self.count = allowed.sum(1)
        self.cursor = torch.zeros_like(self.count)

    def left(self) -> torch.Tensor:
        return self.cursor < self.count

    def take(self, advance: torch.Tensor) -> torch.Tensor:
        position = self.cursor.clamp_max(self.columns.shape[1] - 1)
        chosen = self.columns.gather(1, position[:, None]).squeeze(1)
        self.cursor += advance.long()
        return chosen
