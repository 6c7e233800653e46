"""Pruning methods behind one interface; a new method is one new file plus one entry here."""

from __future__ import annotations

from sdsprune.errors import SdspruneError
from sdsprune.pruners.base import InputStats, PruneOutcome, Pruner
from sdsprune.pruners.magnitude import MagnitudePruner
from sdsprune.pruners.patterns import SparsityPattern
from sdsprune.pruners.sparsegpt import SparseGPTPruner
from sdsprune.pruners.wanda import WandaPruner

BASE_PRUNERS: dict[str, type[Pruner]] = {
    "magnitude": MagnitudePruner,
    "wanda": WandaPruner,
    "sparsegpt": SparseGPTPruner,
}


def get_pruner(name: str) -> Pruner:
    if name not in BASE_PRUNERS:
        raise SdspruneError(
            f"unknown pruning method '{name}' (choose from {', '.join(BASE_PRUNERS)})"
        )
    return BASE_PRUNERS[name]()


__all__ = [
    "BASE_PRUNERS",
    "InputStats",
    "MagnitudePruner",
    "PruneOutcome",
    "Pruner",
    "SparseGPTPruner",
    "SparsityPattern",
    "WandaPruner",
    "get_pruner",
]
