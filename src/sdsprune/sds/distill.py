"""Whole-model distillation with the masks fixed: SDS's optional last stage.

The block re-fit matches each block's output to the dense model's, one block at a time; what
a user sees is the model's next-token distribution, and errors the blocks leave still add up
on the way there. This stage trains the surviving weights of every decoder linear so that
the pruned model's next-token distribution on the calibration windows matches the dense
model's: the loss is KL(dense ‖ pruned) per token, Adam with a cosine-decayed step size
proportional to each layer's weight RMS (as the block re-fit), pruned weights never move
(their gradients are zeroed and the weights re-zeroed after each step, so the pattern and
the sparsity stay exact). Embeddings, norms and the output head do not train.

Every ``DISTILL_HELD_OUT``-th window is held out: the KL on those windows is measured before
training and after each epoch, and the best weights are kept, so the stage never leaves the
model worse on text it did not train on (the start included). The model trains in fp32 and is
judged as it will run (in its dtype): a bf16 model's kept weights are the rounded ones.

The dense model's logits come from the dense stream the blocks leave behind: its last
block's outputs on every window, through the model's own head (final norm and output
projection, which SDS does not change; :func:`sdsprune.engine.capture.head_logits`), so no
dense copy is held and no dense forward runs. The pruned model's start logits come the same
way from the pruned stream (the last block's outputs the pruning left), so the start is
judged without a forward. The cost: per training window a forward and backward of the
pruned model and the head once more, plus one forward per held-out window; the whole
model trains in memory, so low-memory runs cannot use it. With several processes each rank
holds a slice of the windows, gradients and held-out sums are summed across ranks, and every
rank takes the same steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sdsprune.engine.capture import head_logits
from sdsprune.engine.distributed import Distributed
from sdsprune.errors import SdspruneError
from sdsprune.models.blocks import model_linears
from sdsprune.sds.config import DISTILL_HELD_OUT, SDSConfig
from sdsprune.sds.training import (
    FixedMasks,
    restore,
    snapshot,
    sum_gradients_over_ranks,
    sum_over_ranks,
    trainable,
    weight_rms,
)


@dataclass
class DistillFit:
    """How the stage went: mean KL per token on the held-out windows (start, each epoch)."""

    start_kl: float
    final_kl: float
    epoch_kl: list[float] = field(default_factory=list)
    train_kl: list[float] = field(default_factory=list)
    kept_epoch: int = 0  # 0: the start was best (weights unchanged)
    trained_windows: int = 0
    held_out_windows: int = 0

    def to_dict(self) -> dict:
        return {
            "start_kl": round(self.start_kl, 5),
            "final_kl": round(self.final_kl, 5),
            "epoch_kl": [round(v, 5) for v in self.epoch_kl],
            "train_kl": [round(v, 5) for v in self.train_kl],
            "kept_epoch": self.kept_epoch,
            "trained_windows": self.trained_windows,
            "held_out_windows": self.held_out_windows,
        }


def distill(
    student: nn.Module,
    windows: torch.Tensor,
    dense_outputs: torch.Tensor,
    config: SDSConfig,
    device: torch.device,
    dist: Distributed | None = None,
    progress: bool = False,
    student_outputs: torch.Tensor | None = None,
) -> DistillFit:
    """Fit ``student``'s surviving decoder weights to the dense model's next-token
    distribution on ``windows`` (this rank's share of the token windows), given the dense
    model's last-block outputs on them, for ``config.distill_epochs``. ``student_outputs``,
    the student's own last-block outputs on the windows when known, spare the forwards that
    judge the start."""
    train, held = _split(windows.shape[0], dist)
    held_out_windows = int(sum_over_ranks(dist, float(held.numel())))
    if held_out_windows == 0:
        raise SdspruneError(
            f"distillation needs at least {DISTILL_HELD_OUT} calibration windows "
            "(one in eight is held out to judge it)"
        )
    linears = model_linears(student)
    masks = FixedMasks(linears)
    weights = [layer.weight for layer in linears.values()]
    dtype = next(student.parameters()).dtype
    teacher = _Teacher(student, windows, dense_outputs, device)
    judge = _HeldOut(student, teacher, held, dist)
    start_kl = judge.kl(student_outputs)
    fit = DistillFit(start_kl=start_kl, final_kl=start_kl)
    fit.trained_windows = int(sum_over_ranks(dist, float(train.numel())))
    fit.held_out_windows = held_out_windows
    start = snapshot(weights)
    best, best_weights = fit.start_kl, None
    with trainable(student, weights):
        optimizer = torch.optim.Adam(
            [{"params": [w], "lr": config.distill_lr * weight_rms(w)} for w in weights]
        )
        steps = _Steps(config, train, optimizer, dist)
        bar = tqdm(
            total=config.distill_epochs,
            desc=f"distill ({fit.trained_windows} windows)",
            unit="epoch",
            disable=not progress or (dist is not None and dist.rank != 0),
        )
        for number in range(1, config.distill_epochs + 1):
            fit.train_kl.append(steps.epoch(number, student, teacher, masks))
            with _as_model_dtype(student, dtype):
                fit.epoch_kl.append(judge.kl())
            if fit.epoch_kl[-1] < best:
                best, best_weights, fit.kept_epoch = fit.epoch_kl[-1], snapshot(weights), number
            bar.set_postfix(held_out_kl=f"{fit.epoch_kl[-1]:.4f}", start=f"{fit.start_kl:.4f}")
            bar.update(1)
        bar.close()
    restore(weights, best_weights if best_weights is not None else start)
    fit.final_kl = best
    return fit


def _split(count: int, dist: Distributed | None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's training and held-out windows: global window i is held out when
    i % DISTILL_HELD_OUT == DISTILL_HELD_OUT - 1 (the same split with any number of ranks)."""
    first = 0 if dist is None else sum(dist.gather_objects(count)[: dist.rank])
    positions = torch.arange(first, first + count)
    held = positions % DISTILL_HELD_OUT == DISTILL_HELD_OUT - 1
    local = torch.arange(count)
    return local[~held], local[held]


class _Steps:
    """Mini-batches of ``config.distill_batch`` windows from a seeded global order, so one
    process and several take the same steps (each rank its share of every batch)."""

    def __init__(
        self,
        config: SDSConfig,
        train: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        dist: Distributed | None,
    ):
        self.config, self.optimizer, self.dist = config, optimizer, dist
        self.rates = [group["lr"] for group in optimizer.param_groups]
        counts = [train.numel()] if dist is None else dist.gather_objects(train.numel())
        self.first = 0 if dist is None else sum(counts[: dist.rank])
        self.total = sum(counts)
        self.train = train
        self.generator = torch.Generator().manual_seed(0)

    def epoch(self, number, student, teacher: _Teacher, masks: FixedMasks) -> float:
        """One epoch; returns its mean training KL per token (over all ranks)."""
        optimizer = self.optimizer
        order = torch.randperm(self.total, generator=self.generator)
        batch = self.config.distill_batch
        steps = max(1, math.ceil(self.total / batch))
        total_kl, total_tokens = 0.0, 0.0
        for step in range(steps):
            done = ((number - 1) * steps + step) / (steps * self.config.distill_epochs)
            for group, rate in zip(optimizer.param_groups, self.rates, strict=True):
                group["lr"] = rate * 0.5 * (1 + math.cos(math.pi * done))
            picked = order[step * batch : (step + 1) * batch]
            mine = picked[(picked >= self.first) & (picked < self.first + self.train.numel())]
            tokens = sum_over_ranks(self.dist, float(mine.numel() * teacher.seqlen))
            for row in self.train[mine - self.first].tolist():
                ids, target = teacher.window(row)
                loss = _token_kl(student(ids).logits, target)
                (loss / tokens).backward()
                total_kl += float(loss.detach())
            total_tokens += tokens
            _reduce_gradients(masks, self.dist)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            masks.zero_weights_()
        return sum_over_ranks(self.dist, total_kl) / max(total_tokens, 1.0)


class _Teacher:
    """A window's token ids and the dense model's logits on it: the model's head on the
    dense last-block outputs (recomputed each time: a window's logits over the vocabulary
    weigh more than the head's work on it)."""

    def __init__(self, model: nn.Module, windows, dense_outputs, device: torch.device):
        self.model, self.windows, self.outputs, self.device = model, windows, dense_outputs, device
        self.seqlen = windows.shape[1]

    @torch.no_grad()
    def window(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.windows[row : row + 1].to(self.device)
        return ids, self.through_head(ids, self.outputs, row)

    @torch.no_grad()
    def through_head(self, ids: torch.Tensor, outputs: torch.Tensor, row: int) -> torch.Tensor:
        """The model's logits on window ``row`` from last-block ``outputs`` on every window."""
        return head_logits(self.model, ids, outputs[row : row + 1].to(self.device))


class _HeldOut:
    """The mean KL per token on the held-out windows."""

    def __init__(self, student, teacher: _Teacher, rows: torch.Tensor, dist):
        self.student, self.teacher, self.rows, self.dist = student, teacher, rows.tolist(), dist
        self.tokens = sum_over_ranks(dist, float(len(self.rows) * teacher.seqlen))

    @torch.no_grad()
    def kl(self, student_outputs: torch.Tensor | None = None) -> float:
        """The student's KL, from its forward or from its last-block outputs when given."""
        total = 0.0
        for row in self.rows:
            ids, target = self.teacher.window(row)
            if student_outputs is None:
                logits = self.student(ids).logits
            else:
                logits = self.teacher.through_head(ids, student_outputs, row)
            total += float(_token_kl(logits, target))
        return sum_over_ranks(self.dist, total) / self.tokens


def _token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of KL(teacher ‖ student), in fp32."""
    student_log = student_logits.float().log_softmax(-1).flatten(0, 1)
    teacher_log = teacher_logits.float().log_softmax(-1).flatten(0, 1)
    return F.kl_div(student_log, teacher_log, log_target=True, reduction="sum")


def _reduce_gradients(masks: FixedMasks, dist: Distributed | None) -> None:
    """Missing gradients as zeros, summed over ranks, pruned entries zeroed."""
    sum_gradients_over_ranks([layer.weight for layer in masks.linears.values()], dist)
    for name, layer in masks.linears.items():
        if not torch.isfinite(layer.weight.grad).all():
            raise SdspruneError(f"NaN/Inf gradient in the distillation of layer {name}")
    masks.zero_gradients_()


@contextmanager
def _as_model_dtype(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """The model as it will run (weights rounded to ``dtype``) for a measurement, then the
    fp32 training weights back."""
    if dtype == torch.float32:
        yield
        return
    saved = snapshot(list(model.parameters()))
    model.to(dtype)
    try:
        yield
    finally:
        model.float()
        restore(list(model.parameters()), saved)
