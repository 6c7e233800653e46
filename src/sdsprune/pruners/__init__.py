"""Pruning methods behind one interface; a new method is one new file here plus its config
in :mod:`sdsprune.methods` (its settings, their defaults and its name in method strings)."""

from __future__ import annotations

from sdsprune.errors import SdspruneError
from sdsprune.pruners.admm import ADMMPruner
from sdsprune.pruners.base import InputStats, PruneOutcome, Pruner
from sdsprune.pruners.dsnot import DSnoTPruner
from sdsprune.pruners.magnitude import MagnitudePruner
from sdsprune.pruners.patterns import SparsityPattern
from sdsprune.pruners.prunerzero import PrunerZeroPruner
from sdsprune.pruners.sparsegpt import SparseGPTPruner
from sdsprune.pruners.wanda import WandaPruner


def get_pruner(spec: str) -> Pruner:
    """The pruner a method string names, e.g. ``dsnot[initial=sparsegpt;max_cycles=100]``
    (its settings: :mod:`sdsprune.methods`)."""
    from sdsprune.methods import BaseMethod, parse_method  # methods builds on this package

    config = parse_method(spec)
    if not isinstance(config, BaseMethod):
        raise SdspruneError(f"'{spec}' is not a one-shot pruner")
    return config.pruner()


__all__ = [
    "ADMMPruner",
    "DSnoTPruner",
    "InputStats",
    "MagnitudePruner",
    "PruneOutcome",
    "Pruner",
    "PrunerZeroPruner",
    "SparseGPTPruner",
    "SparsityPattern",
    "WandaPruner",
    "get_pruner",
]
