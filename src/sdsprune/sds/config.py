"""Every knob of the SDS pipeline, in one place, with the paper's names."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from sdsprune.errors import SdspruneError
from sdsprune.settings import setting

SCHEDULES = ("fused", "staged")
DATA_MODES = ("sd", "dd", "kd")
REDENSE_SOLVERS = ("closed", "fista", "gd")
ADJUST_SOLVERS = ("accelerated", "gd")
ADJUST_RULES = ("auto", "always", "never")
ADJUST_DATA = ("sd", "kd")
EARLY_EXIT_PARAMS = 3_000_000_000  # the paper skips the adjustment above ~3B parameters
FUSED_BLOCK_EPOCHS = 2  # the block re-fit's default with the fused schedule (README ablation)
AUTO_DISTILL_EPOCHS = 1  # the distillation's default where it can run (docs/results.md)
DISTILL_HELD_OUT = 8  # one calibration window in this many judges the distillation


@dataclass(frozen=True)
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
    ``block_redense`` [ours]: SDS itself at block level, masks that move inside the re-fit:
    the first ``block_redense`` of the ``block_epochs`` train every weight of the block (its
    re-dense, toward the dense block's outputs), each layer is then pruned again by the base
    pruner on its statistics, and the remaining epochs re-fit the new masks' survivors. The
    block is still never left worse than it started (the start is judged first and kept when
    the new masks do worse).
    ``distill_*`` [ours]: a last stage that trains the surviving weights of the whole model to
    the dense model's next-token distribution (see :mod:`sdsprune.sds.distill`).
    ``distill_epochs`` None (the default) is decided per run by :meth:`for_run`: it trains
    the whole model in memory, reads the dense logits from the fused schedule's dense stream
    and needs windows to hold out, so a low-memory run, a staged one or one with too few
    windows goes without it; asked for explicitly there, it is an error.
    """

    schedule: str = setting("fused", "SDS: fused (one pass) or staged (paper order).")
    data_mode: str = setting("sd", "SDS re-dense data: sd, dd or kd.")
    solver: str = setting("closed", "SDS re-dense solver: closed, fista or gd (paper).")
    redense_iters: int = setting(200, "SDS re-dense iterations (fista, gd).")
    lr: float = setting(0.1, "SDS learning rate of the gd recipes, x 1/λmax(G).")
    lambda1: float = setting(0.0, "SDS L1 weight (scaled, see README).")
    lambda2: float = setting(0.0, "SDS L2 weight (scaled, see README).")
    mu: float = setting(1.0, "SDS proximity to the pruned start (scaled; closed, fista).")
    residual_start: bool = setting(
        True, "SDS: start re-dense from the pruned weights (off: from dense)."
    )
    adjust: str = setting("auto", "SDS weight adjustment: auto (skip > 3B), always, never.")
    adjust_solver: str = setting("accelerated", "SDS adjustment: accelerated or gd (paper).")
    adjust_iters: int = setting(50, "SDS adjustment iterations.")
    adjust_data: str = setting(
        "sd", "SDS adjustment targets: sd (pruned inputs) or kd (dense inputs)."
    )
    group_sweeps: int = setting(0, "SDS, N:M only: sweeps of the exact per-group pattern search.")
    rounds: int = setting(1, "SDS re-dense/prune rounds.")
    block_epochs: int | None = setting(
        None,
        "SDS block re-fit epochs over the calibration windows (0: off; default "
        f"{FUSED_BLOCK_EPOCHS} with the fused schedule, 0 with the staged one).",
    )
    block_lr: float = setting(0.01, "SDS block re-fit Adam step, x each layer's weight RMS.")
    block_batch: int = setting(4, "SDS block re-fit windows per optimiser step.")
    block_windows: int = setting(16, "SDS block re-fit on this many calibration windows (0: all).")
    block_redense: int = setting(
        0,
        "SDS block re-fit: its first epochs that train every weight (the block's re-dense), "
        "after which each layer is pruned again by the base pruner (0: masks fixed).",
    )
    block_redense_lr: float = setting(
        0.05,
        "SDS block re-dense Adam step, x each layer's weight RMS (pruned weights start at 0: "
        "they need a larger step than the re-fit's to matter).",
    )
    distill_epochs: int | None = setting(
        None,
        "SDS last stage: epochs distilling the dense model's next-token distribution into the "
        f"pruned model, masks fixed (0: off; default {AUTO_DISTILL_EPOCHS}, or 0 with "
        f"--low-memory, the staged schedule or fewer than {DISTILL_HELD_OUT} calibration "
        "windows).",
    )
    distill_lr: float = setting(0.003, "SDS distillation Adam step, x each layer's weight RMS.")
    distill_batch: int = setting(2, "SDS distillation windows per optimiser step.")
    figure_layer: str | None = setting(
        None, "SDS: layer for the weight figure, e.g. 15.mlp.up_proj."
    )

    def __post_init__(self) -> None:
        if self.block_epochs is None:  # frozen: set once, here
            default = FUSED_BLOCK_EPOCHS if self.schedule == "fused" else 0
            object.__setattr__(self, "block_epochs", default)
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
        weights.update(lr=self.lr, block_lr=self.block_lr, distill_lr=self.distill_lr)
        weights.update(block_redense_lr=self.block_redense_lr)
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
        if self.block_redense and not 0 < self.block_redense < self.block_epochs:
            raise SdspruneError(
                "--block-redense must be >= 0 and below --block-epochs (the new masks need "
                "at least one epoch of re-fit)"
            )
        if min(self.block_lr, self.block_redense_lr, self.distill_lr) <= 0:
            raise SdspruneError("the block re-fit and distillation learning rates must be > 0")
        if (self.distill_epochs or 0) < 0 or self.distill_batch < 1:
            raise SdspruneError("distillation epochs must be >= 0, distillation batch >= 1")
        if self.schedule != "fused" and (
            self.block_epochs or self.adjust_data == "kd" or self.distill_epochs
        ):
            raise SdspruneError(
                "block re-fit, kd adjustment and distillation need the fused schedule"
            )

    def for_run(self, low_memory: bool, windows: int) -> SDSConfig:
        """This config with the run-dependent defaults decided (``distill_epochs`` None):
        every later step, and the report, sees the value the run uses."""
        if self.distill_epochs is not None:
            return self
        possible = self.schedule == "fused" and not low_memory and windows >= DISTILL_HELD_OUT
        return replace(self, distill_epochs=AUTO_DISTILL_EPOCHS if possible else 0)

    @property
    def dense_stream(self) -> bool:
        """Whether the dense model must run alongside (dense inputs, dense block targets, or
        the last block's dense outputs, from which the distillation reads the dense logits)."""
        return self.dense_statistics or self.block_epochs > 0 or bool(self.distill_epochs)

    @property
    def dense_statistics(self) -> bool:
        """Whether a solver reads the dense inputs' Gram or cross-Gram matrices: the block
        re-fit needs only the dense block's outputs, which cost no statistics."""
        return self.data_mode != "sd" or self.adjust_data == "kd"

    def adjusts(self, parameters: int) -> bool:
        """The early-exit rule: ``auto`` skips the adjustment on models above ~3B parameters."""
        if self.adjust == "auto":
            return parameters <= EARLY_EXIT_PARAMS
        return self.adjust == "always"
