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
    of squares (Wanda's ‖X_j‖²); layers fed by the same tensor share one object.
    ``derived`` caches what solvers compute from the final statistic alone (a factorised
    inverse Hessian, λmax), so the layers sharing it (q/k/v, gate/up) compute it once.
    """

    count: int
    sumsq: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def feature_norms(self) -> torch.Tensor:
        if self.sumsq is not None:
            return self.sumsq.sqrt()
        assert self.gram is not None
        return (torch.diagonal(self.gram) * self.count).clamp_min(0).sqrt()


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
