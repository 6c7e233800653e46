"""The small interface every pruning method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from sdsprune.pruners.patterns import SparsityPattern


@dataclass
class InputStats:
    """What the calibration inputs of one linear layer tell a pruner.

    ``gram`` is the second moment G = XᵀX / N (in x in, fp32), ``sumsq`` the per-feature sum
    of squares (Wanda's ‖X_j‖²), ``total`` the per-feature sum (DSnoT's mean input); layers
    fed by the same tensor share one object. ``derived`` caches what solvers compute from the
    final statistic alone (a factorised inverse Hessian, λmax), so the layers sharing it
    (q/k/v, gate/up) compute it once.
    """

    count: int
    sumsq: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    total: torch.Tensor | None = None
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def feature_norms(self) -> torch.Tensor:
        if self.sumsq is not None:
            return self.sumsq.sqrt()
        assert self.gram is not None
        return (torch.diagonal(self.gram) * self.count).clamp_min(0).sqrt()

    @property
    def feature_means(self) -> torch.Tensor:
        """E[x_j] over the calibration tokens."""
        assert self.total is not None, "the engine collects input sums with any statistics"
        return self.total / max(self.count, 1)

    @property
    def feature_variances(self) -> torch.Tensor:
        """Var[x_j] = E[x_j²] − E[x_j]² over the calibration tokens."""
        second = self.feature_norms.square() / max(self.count, 1)
        return (second - self.feature_means.square()).clamp_min(0)


@dataclass
class PruneOutcome:
    weight: torch.Tensor  # fp32, zeros where pruned
    mask: torch.Tensor  # True where pruned


class Pruner(ABC):
    """A one-shot pruning method.

    ``needs`` says which statistics the engine must collect ("none", "sumsq" or "gram") so
    that no method pays for statistics it does not use; ``unstructured_group`` is the group
    inside which an unstructured mask is chosen ("row" or "layer").
    """

    name: str
    needs: str = "none"
    unstructured_group: str = "layer"

    @abstractmethod
    def prune(
        self, weight: torch.Tensor, stats: InputStats | None, pattern: SparsityPattern
    ) -> PruneOutcome:
        """Return the pruned fp32 weight and its mask; ``weight`` is not modified."""
