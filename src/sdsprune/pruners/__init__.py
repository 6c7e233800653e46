"""Pruning methods behind one interface; a new method is one new file plus one entry here."""

from __future__ import annotations

import inspect
import re

from sdsprune.errors import SdspruneError
from sdsprune.pruners.admm import ADMMPruner
from sdsprune.pruners.base import InputStats, PruneOutcome, Pruner
from sdsprune.pruners.dsnot import DSnoTPruner
from sdsprune.pruners.magnitude import MagnitudePruner
from sdsprune.pruners.patterns import SparsityPattern
from sdsprune.pruners.prunerzero import PrunerZeroPruner
from sdsprune.pruners.sparsegpt import SparseGPTPruner
from sdsprune.pruners.wanda import WandaPruner

BASE_PRUNERS: dict[str, type[Pruner]] = {
    "magnitude": MagnitudePruner,
    "wanda": WandaPruner,
    "sparsegpt": SparseGPTPruner,
    "admm": ADMMPruner,
    "dsnot": DSnoTPruner,
    "pruner-zero": PrunerZeroPruner,
}

_SPEC = re.compile(r"^\s*([\w-]+)\s*(?:\[(.*)\])?\s*$")


def get_pruner(spec: str) -> Pruner:
    """The pruner named by ``spec``: a name, optionally with constructor options in brackets,
    e.g. ``dsnot[initial=sparsegpt;max_cycles=100]`` (``;`` separates options so that a spec
    fits in comma-separated method lists)."""
    name, options = parse_pruner_spec(spec)
    try:
        return BASE_PRUNERS[name](**options)
    except ValueError as exc:  # a constructor's own check of an option's value
        raise SdspruneError(f"pruner '{spec}': {exc}") from None


def parse_pruner_spec(spec: str) -> tuple[str, dict[str, object]]:
    """``(name, options)`` of a pruner spec, options converted to the types of the
    constructor's defaults; unknown names or options are refused with the valid ones."""
    match = _SPEC.match(spec)
    name = match.group(1) if match else spec
    if name not in BASE_PRUNERS:
        raise SdspruneError(
            f"unknown pruning method '{spec}' (choose from {', '.join(BASE_PRUNERS)})"
        )
    defaults = {
        key: parameter.default
        for key, parameter in inspect.signature(BASE_PRUNERS[name]).parameters.items()
    }
    options: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in (match.group(2) or "").split(";"))):
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in defaults:
            known = ", ".join(defaults) or "none"
            raise SdspruneError(f"bad option '{item}' for {name} (options: {known})")
        options[key] = _convert(name, key, raw.strip(), defaults[key])
    return name, options


def _convert(name: str, key: str, raw: str, default: object) -> object:
    """``raw`` as the type of the option's default value."""
    kind = type(default)
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        return kind(raw)
    except ValueError:
        raise SdspruneError(f"{name} option {key}={raw}: expected a {kind.__name__}") from None


__all__ = [
    "BASE_PRUNERS",
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
    "parse_pruner_spec",
]
