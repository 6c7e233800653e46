"""Every knob of the SDS pipeline, in one place, with the paper's names."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from sdsprune.errors import SdspruneError

SCHEDULES = ("fused", "staged")
DATA_MODES = ("sd", "dd", "kd")
REDENSE_SOLVERS = ("closed", "fista", "gd")
ADJUST_SOLVERS = ("accelerated", "gd")
ADJUST_RULES = ("auto", "always", "never")
ADJUST_DATA = ("sd", "kd")
EARLY_EXIT_PARAMS = 3_000_000_000  # the paper skips the adjustment above ~3B parameters
FUSED_BLOCK_EPOCHS = 2  # the block re-fit's default with the fused schedule (README ablation)


@dataclass
class SDSConfig:
    """Sparse-Dense-Sparse settings.

    Regularizer scaling [ours]: with c = mean(diag G_ii) (the typical output energy a unit
    weight carries) and σ = RMS of the dense weights of the layer, re-dense minimises

        tr((A−W) G (A−W)ᵀ) + λ2·c·‖W‖² + λ1·c·σ·‖W‖₁ + μ·c·‖W − W_start‖²

    so every λ is dimensionless: invariant to the scale of the activations and of the weights.
    ``mu`` is the explicit form of the implicit "few steps from the pruned start" effect.

    ``adjust_data`` [ours]: ``kd`` fits the adjustment to the dense model's layer outputs
    (dense inputs) instead of the dense layer on the pruned model's inputs (``sd``), so it
    also corrects the error earlier blocks left. ``group_sweeps`` [ours, N:M]: sweeps of the
    exact per-group pattern choice after the adjustment (:mod:`sdsprune.sds.groups`).
    ``block_*`` [ours]: after the layer-wise steps, re-fit each block's surviving weights so
    that its output on the pruned model's inputs matches the dense model's block output
    (see :mod:`sdsprune.sds.block`).
    ``block_epochs`` None (the default) means ``FUSED_BLOCK_EPOCHS`` with the fused schedule
    and 0 with the staged one, which cannot re-fit. ``block_lr`` is Adam's step as a fraction
    of each layer's weight RMS; ``block_windows`` (0: all) re-fits on a seeded subset of the
    calibration windows, which bounds its cost whatever the calibration size.
    """

    schedule: str = "fused"
    data_mode: str = "sd"
    solver: str = "closed"
    redense_iters: int = 200
    lr: float = 0.1
    lambda1: float = 0.0
    lambda2: float = 0.0
    mu: float = 1.0
    residual_start: bool = True
    adjust: str = "auto"
    adjust_solver: str = "accelerated"
    adjust_iters: int = 50
    adjust_data: str = "sd"
    group_sweeps: int = 0
    rounds: int = 1
    block_epochs: int | None = None
    block_lr: float = 0.01
    block_batch: int = 4
    block_windows: int = 16
    figure_layer: str | None = None

    def __post_init__(self) -> None:
        if self.block_epochs is None:
            self.block_epochs = FUSED_BLOCK_EPOCHS if self.schedule == "fused" else 0
        for value, allowed, what in (
            (self.schedule, SCHEDULES, "schedule"),
            (self.data_mode, DATA_MODES, "data mode"),
            (self.solver, REDENSE_SOLVERS, "re-dense solver"),
            (self.adjust_solver, ADJUST_SOLVERS, "adjustment solver"),
            (self.adjust, ADJUST_RULES, "adjustment rule"),
            (self.adjust_data, ADJUST_DATA, "adjustment data"),
        ):
            if value not in allowed:
                raise SdspruneError(f"unknown {what} '{value}' (choose from {', '.join(allowed)})")
        if self.solver == "closed" and self.lambda1 > 0:
            raise SdspruneError("the closed-form re-dense has no L1 term: use --solver fista or gd")
        weights = {"lambda1": self.lambda1, "lambda2": self.lambda2, "mu": self.mu}
        weights.update(lr=self.lr, block_lr=self.block_lr)
        for name, value in weights.items():  # nan passes every comparison below
            if not math.isfinite(value):
                raise SdspruneError(f"--{name.replace('_', '-')} must be a finite number")
        if min(self.lambda1, self.lambda2, self.mu, self.lr) < 0:
            raise SdspruneError("lambdas, mu and lr must be non-negative")
        if self.rounds < 1 or self.redense_iters < 1 or self.adjust_iters < 0:
            raise SdspruneError("rounds and iterations must be positive")
        if self.group_sweeps < 0:
            raise SdspruneError("group sweeps must be >= 0")
        if min(self.block_epochs, self.block_windows) < 0 or self.block_batch < 1:
            raise SdspruneError("block epochs and windows must be >= 0, block batch >= 1")
        if self.block_lr <= 0:
            raise SdspruneError("the block re-fit learning rate must be > 0")
        if self.schedule != "fused" and (self.block_epochs or self.adjust_data == "kd"):
            raise SdspruneError("block re-fit and kd adjustment need the fused schedule")

    @property
    def dense_stream(self) -> bool:
        """Whether the dense model must run alongside (dense inputs or dense block targets)."""
        return self.dense_statistics or self.block_epochs > 0

    @property
    def dense_statistics(self) -> bool:
        """Whether a solver reads the dense inputs' Gram or cross-Gram matrices: the block
        re-fit needs only the dense block's outputs, which cost no statistics."""
        return self.data_mode != "sd" or self.adjust_data == "kd"

    @classmethod
    def from_text(cls, text: str) -> SDSConfig:
        """Settings from ``"key=value,key=value"`` (e.g. ``schedule=staged,mu=0.5``).

        Lets commands that run several methods (``compare``) take every SDS knob through one
        option instead of repeating each of ``prune``'s flags.
        """
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in types:
                raise SdspruneError(
                    f"bad SDS setting '{item}': use key=value with keys {', '.join(types)}"
                )
            values[key] = _parse_value(key, raw.strip(), types[key])
        return cls(**values)

    def adjusts(self, parameters: int) -> bool:
        """The early-exit rule: ``auto`` skips the adjustment on models above ~3B parameters."""
        if self.adjust == "auto":
            return parameters <= EARLY_EXIT_PARAMS
        return self.adjust == "always"


def _parse_value(key: str, raw: str, kind: str) -> object:
    """``raw`` as the field's type (annotations are strings under postponed evaluation)."""
    optional = kind.endswith(" | None")
    kind = kind.removesuffix(" | None")
    if optional and raw.lower() in ("", "none"):
        return None
    try:
        if kind == "bool":
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise SdspruneError(f"SDS setting {key}={raw}: expected a {kind}") from None
    return raw
