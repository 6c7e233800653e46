"""Calibration statistics of a block's linear layers, gathered with forward hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from sdsprune.pruners.base import InputStats


class StatsCollector:
    """Accumulates, per distinct input tensor, what the pruners need.

    Layers called on the same tensor object in one forward (q/k/v, gate/up) form one group
    and share one statistic, computed once. Levels: ``sumsq`` (Wanda's feature norms) or
    ``gram`` (XᵀX, which SparseGPT and SDS need; it also gives sumsq on its diagonal).
    With ``cross_source`` set, the collector additionally accumulates X_srcᵀ X with the
    inputs recorded by another collector on the same windows (SDS's ``kd`` mode).
    """

    def __init__(self, linears: dict[str, nn.Linear], level: str, keep_inputs: bool = False):
        self.linears = linears
        self.level = level
        self.keep_inputs = keep_inputs
        self.group_of: dict[str, str] = {}
        self.stats: dict[str, InputStats] = {}
        self.cross: dict[str, torch.Tensor] = {}
        self.last_inputs: dict[str, torch.Tensor] = {}
        self.cross_source: StatsCollector | None = None
        self._seen: dict[int, tuple[str, torch.Tensor]] = {}

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        handles = [
            layer.register_forward_hook(self._hook(name)) for name, layer in self.linears.items()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._seen.clear()

    def for_layer(self, name: str) -> InputStats:
        return self.stats[self.group_of[name]]

    def cross_for_layer(self, name: str) -> torch.Tensor:
        return self.cross[self.group_of[name]]

    def _hook(self, name: str):
        def hook(_module, inputs, _output):
            x = inputs[0]
            leader = self._leader(name, x)
            if leader != name:
                return
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            self._accumulate(name, flat)

        return hook

    def _leader(self, name: str, x: torch.Tensor) -> str:
        if name in self.group_of:
            return name if self.group_of[name] == name else self.group_of[name]
        seen = self._seen.get(id(x))
        if seen is not None and seen[1] is x:
            self.group_of[name] = seen[0]
            return seen[0]
        self._seen[id(x)] = (name, x)  # the reference keeps ids unique during this forward
        self.group_of[name] = name
        return name

    def _accumulate(self, group: str, flat: torch.Tensor) -> None:
        stats = self.stats.get(group)
        if stats is None:
            stats = self.stats[group] = InputStats(count=0)
        stats.count += flat.shape[0]
        # the input sum is cheap next to either statistic; DSnoT needs the input means
        stats.total = _summed(stats.total, flat.sum(0))
        # each in x in product is added and dropped before the next one is made: kd's
        # cross-Gram beside a held Gram product would be one more (784 MiB at width 14336)
        if self.level == "gram":
            stats.gram = _summed(stats.gram, flat.T @ flat)
        elif self.level == "sumsq":
            stats.sumsq = _summed(stats.sumsq, flat.square().sum(0))
        if self.keep_inputs:
            self.last_inputs[group] = flat
        if self.cross_source is not None:
            source = self.cross_source.last_inputs[group]
            self.cross[group] = _summed(self.cross.get(group), source.T @ flat)

    def release_solve_state(self) -> None:
        """Forget the cross-Grams and the solvers' cached factorisations (see
        ``BlockContext.release_solve_state``)."""
        self.cross.clear()
        self.cross_source = None
        for stats in self.stats.values():
            stats.derived.clear()

    def finalize(self) -> None:
        """Turn sums into means (G = XᵀX / N) so that scales do not depend on N."""
        for group, stats in self.stats.items():
            if stats.gram is not None:
                stats.gram /= stats.count
            if group in self.cross:
                self.cross[group] /= stats.count
        self.last_inputs.clear()


def _summed(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    """``total + term`` in place (``term`` itself the first time)."""
    return term if total is None else total.add_(term)
