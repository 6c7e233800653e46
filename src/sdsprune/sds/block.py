"""Block-level reconstruction: re-fit a pruned block's surviving weights to dense outputs.

Layer-wise steps fit every linear layer to its own dense outputs; their errors add up inside a
block (attention, the MLP's non-linearity) and across blocks. Here the whole block is
optimised at once through its real forward, so that its output on the calibration windows
matches the dense block's: the mask stays fixed (pruned weights never come back), only the
surviving weights move. Adam on mini-batches of windows, a few epochs, cosine-decayed step
size proportional to each layer's weight RMS (so one setting fits any model width).

The block's output error on all windows is measured at the start and after each epoch and the
best weights are kept, so the block never ends worse than it started. The block trains in fp32;
a bf16/fp16 model's block is cast back afterwards, and rounding can undo a small gain, so there
the start and the kept weights are both judged as the model will run them (in its dtype), the
start kept if the rounded block is worse, and the next block's inputs come from that forward.
With several processes each rank holds a slice of the windows: gradients and errors are summed
across ranks, so every rank takes the same steps (and the same decisions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from sdsprune.engine import ActivationStream
from sdsprune.engine.distributed import Distributed
from sdsprune.errors import SdspruneError
from sdsprune.sds.config import SDSConfig
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
class BlockFit:
    """How a block re-fit went; errors are ‖out − target‖² / ‖target‖² over all windows.

    ``start_error`` and ``final_error`` are measured as the model runs the block (in a
    bf16/fp16 model: after the cast back, in its dtype); ``epoch_errors`` are the fp32
    training measurements.
    """

    start_error: float
    final_error: float
    epoch_errors: list[float] = field(default_factory=list)
    kept_epoch: int = 0  # 0: the start was best (weights unchanged)
    outputs: torch.Tensor | None = None  # the kept weights' outputs on the stream
    masks_changed: float | None = None  # block_redense: share of pruned entries now kept


# A layer's weights pruned again: (layer name, its fp32 weights) -> the pruned weights
Reprune = Callable[[str, torch.Tensor], torch.Tensor]


def fit_block(
    index: int,
    block: nn.Module,
    linears: dict[str, nn.Linear],
    stream: ActivationStream,
    targets: torch.Tensor,
    config: SDSConfig,
    dist: Distributed | None = None,
    reprune: Reprune | None = None,
) -> BlockFit:
    """Optimise the non-zero weights of ``linears`` so ``block(stream) ≈ targets``; with
    ``config.block_redense`` every weight first, then the masks ``reprune`` chooses.

    With ``config.block_windows`` set, a seeded subset of the windows is used (and the error
    is judged on it); otherwise all windows. The last measurement runs the block on every
    window, so when its weights are the kept ones their outputs come back in
    ``BlockFit.outputs`` and the caller need not run the block again (the output pass).
    """
    fit_problem = _Problem(index, block, linears, stream, targets, dist)
    owned = _owned_windows(stream, dist)
    chosen = owned.choose(config.block_windows, seed=index)
    rows = owned.local(chosen)
    every_window = chosen.numel() == owned.total
    reference = _target_energy(index, targets, rows, dist)
    args = (chosen, owned, rows, every_window, reference)
    if config.block_redense:
        if reprune is None:
            raise ValueError("a block re-dense prunes again: fit_block needs reprune")
        return _fit_new_masks(fit_problem, config, *args, reprune)
    return _fit_masks(fit_problem, config, *args)


def _fit_masks(problem, config, chosen, owned, rows, every_window, reference) -> BlockFit:
    """The re-fit of the block's surviving weights, its masks fixed."""
    if _model_dtype(problem.block) == torch.float32:
        return _fit_fp32(problem, config, chosen, owned, rows, every_window, reference)
    return _fit_and_round(problem, config, chosen, owned, rows, reference)


def _fit_new_masks(
    problem, config, chosen, owned, rows, every_window, reference, reprune: Reprune
) -> BlockFit:
    """SDS at block level: every weight trains for ``block_redense`` epochs, each layer is
    pruned again by ``reprune``, and the remaining epochs re-fit the new survivors. The
    block as it came is judged first (as the model runs it) and comes back when the new
    masks end worse; ``kept_epoch`` counts the re-dense epochs."""
    weights, dtype = problem.weights, _model_dtype(problem.block)
    start_weights = snapshot(weights)
    start_pruned = {name: layer.weight == 0 for name, layer in problem.linears.items()}
    start, _ = problem.error(rows, keep_outputs=False, dtype=dtype)
    free = _Problem(*problem.parts, masks=FixedMasks({}))  # nothing held at zero
    with trainable(problem.block, weights):
        epoch = _Epoch(
            free,
            replace(
                config,
                block_epochs=config.block_redense,
                block_redense=0,
                block_lr=config.block_redense_lr,
            ),
            reference,
        )
        for number in range(1, config.block_redense + 1):
            epoch.run(number, chosen, owned)
    with torch.no_grad():
        for name, layer in problem.linears.items():
            layer.weight.copy_(reprune(name, layer.weight.detach().float()))
    remaining = replace(
        config, block_epochs=config.block_epochs - config.block_redense, block_redense=0
    )
    fit = _fit_masks(
        _Problem(*problem.parts), remaining, chosen, owned, rows, every_window, reference
    )
    fit.masks_changed = _masks_changed(start_pruned, problem.linears)
    fit.start_error = start / reference
    if fit.final_error > fit.start_error:
        restore(weights, start_weights)
        fit.final_error, fit.kept_epoch, fit.outputs = fit.start_error, 0, None
    else:
        fit.kept_epoch += config.block_redense
    return fit


def _masks_changed(before: dict[str, torch.Tensor], linears: dict[str, nn.Linear]) -> float:
    """The share of the block's pruned entries that the new masks keep (as many entries
    kept before are pruned in their place: the sparsity is the same)."""
    moved = sum(int((mask & (linears[name].weight != 0)).sum()) for name, mask in before.items())
    return moved / max(sum(int(mask.sum()) for mask in before.values()), 1)


def _fit_fp32(problem, config, chosen, owned, rows, every_window, reference) -> BlockFit:
    """The re-fit of an fp32 block: what trains is what runs, so the fp32 measurements
    decide, and the kept weights' outputs (measured anyway) feed the next block. On a
    subset of the windows only the last measurement runs them all: it is the kept one
    almost always (the error is judged on the windows it trains on), and then it stands in
    for the output pass."""
    weights = problem.weights
    with trainable(problem.block, weights):
        error, outputs = problem.error(rows, keep_outputs=every_window)
        fit = BlockFit(start_error=error / reference, final_error=error / reference)
        kept = (error, snapshot(weights), outputs)
        epoch = _Epoch(problem, config, reference)
        for number in range(1, config.block_epochs + 1):
            epoch.run(number, chosen, owned)
            last = number == config.block_epochs
            error, outputs = problem.error(rows, keep_outputs=every_window or last)
            fit.epoch_errors.append(error / reference)
            if error < kept[0]:
                kept = (error, snapshot(weights), outputs)
                fit.kept_epoch = number
        restore(weights, kept[1])
    fit.final_error = kept[0] / reference
    fit.outputs = kept[2]
    return fit


def _fit_and_round(problem, config, chosen, owned, rows, reference) -> BlockFit:
    """The re-fit of a bf16/fp16 block: trained in fp32, the best epoch's weights cast back,
    then judged against the start as the model runs both (in its dtype).

    An fp32 gain smaller than the rounding is lost in the cast, so the fp32 measurements only
    pick the best epoch; the start is kept when the rounded block is worse than it. The
    next block's inputs are the kept block's outputs in the model's dtype, as the output pass
    would compute them (none come back when the start is kept: the output pass runs then).
    """
    weights = problem.weights
    dtype = _model_dtype(problem.block)
    start_weights = snapshot(weights)
    start, _ = problem.error(rows, keep_outputs=False, dtype=dtype)
    fit = BlockFit(start_error=start / reference, final_error=start / reference)
    with trainable(problem.block, weights):
        best, best_weights = math.inf, None
        epoch = _Epoch(problem, config, reference)
        for number in range(1, config.block_epochs + 1):
            epoch.run(number, chosen, owned)
            error, _ = problem.error(rows, keep_outputs=False)
            fit.epoch_errors.append(error / reference)
            if error < best:
                best, best_weights, fit.kept_epoch = error, snapshot(weights), number
        if best_weights is not None:
            restore(weights, best_weights)
    if fit.kept_epoch == 0:  # no epoch ran: the weights are the start's
        return fit
    rounded, outputs = problem.error(rows, keep_outputs=True, dtype=dtype)
    if rounded > start:
        restore(weights, start_weights)
        fit.kept_epoch = 0
        return fit
    fit.final_error, fit.outputs = rounded / reference, outputs
    return fit


def _target_energy(index: int, targets: torch.Tensor, rows: torch.Tensor, dist) -> float:
    """Σ‖target‖² over the windows ``rows`` of every rank: the errors' denominator."""
    energy = sum(float(targets[b].float().square().sum()) for b in _batches(rows, 64))
    energy = sum_over_ranks(dist, energy)
    if energy <= 0:
        raise SdspruneError(f"decoder block {index} has all-zero target outputs")
    return energy


def _model_dtype(block: nn.Module) -> torch.dtype:
    return next(block.parameters()).dtype


class _Problem:
    """One block's re-fit: its layers (with their fixed masks), inputs and dense targets."""

    def __init__(self, index, block, linears, stream, targets, dist, masks=None):
        self.index, self.block, self.linears = index, block, linears
        self.stream, self.targets, self.dist = stream, targets, dist
        self.masks = FixedMasks(linears) if masks is None else masks

    @property
    def parts(self) -> tuple:
        """What makes the problem, for one with other masks."""
        return self.index, self.block, self.linears, self.stream, self.targets, self.dist

    @property
    def weights(self) -> list[nn.Parameter]:
        return [layer.weight for layer in self.linears.values()]

    def error(
        self, rows: torch.Tensor, keep_outputs: bool, dtype: torch.dtype = torch.float32
    ) -> tuple[float, torch.Tensor | None]:
        """The block's squared error on ``rows``, computed in ``dtype`` (fp32: training);
        with ``keep_outputs`` the block runs every window and their outputs come back."""
        return _block_error(
            self.index, self.block, self.stream, self.targets, rows, self.dist, keep_outputs, dtype
        )


class _Epoch:
    """One pass of Adam over the windows in mini-batches, with a cosine-decayed step size.

    Mini-batches come from a global window order seeded by the block index, so the same
    steps are taken by one process or several (see :class:`_OwnedWindows`).
    """

    def __init__(self, problem: _Problem, config: SDSConfig, reference: float):
        self.problem, self.config, self.reference = problem, config, reference
        self.optimizer = torch.optim.Adam(
            [{"params": [w], "lr": config.block_lr * weight_rms(w)} for w in problem.weights]
        )
        self.base_rates = [group["lr"] for group in self.optimizer.param_groups]
        self.generator = torch.Generator().manual_seed(problem.index)

    def run(self, number: int, chosen: torch.Tensor, owned: _OwnedWindows) -> None:
        """Epoch ``number`` over the global windows ``chosen`` (this rank's share of each
        mini-batch runs here)."""
        order = chosen[torch.randperm(chosen.numel(), generator=self.generator)]
        batch = self.config.block_batch
        steps = max(1, math.ceil(chosen.numel() / batch))
        scale = self.reference / steps  # each step's loss is about the relative error
        for step in range(steps):
            done = ((number - 1) * steps + step) / (steps * self.config.block_epochs)
            for group, rate in zip(self.optimizer.param_groups, self.base_rates, strict=True):
                group["lr"] = rate * 0.5 * (1 + math.cos(math.pi * done))
            self._accumulate_gradients(owned.local(order[step * batch : (step + 1) * batch]), scale)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.problem.masks.zero_weights_()

    def _accumulate_gradients(self, picked: torch.Tensor, scale: float) -> None:
        """This step's squared error over all ranks' windows, divided by ``scale``; pruned
        entries get no gradient, so Adam never moves them. ``picked`` (this rank's share)
        runs in batches of at most the capture's size."""
        problem = self.problem
        for rows in _batches(picked, problem.stream.batch_size):
            out = _forward(problem.index, problem.block, problem.stream, rows)
            ((out - _on(problem.targets[rows], out)).square().sum() / scale).backward()
        sum_gradients_over_ranks(problem.weights, problem.dist)
        problem.masks.zero_gradients_()


def _forward(
    index: int, block: nn.Module, stream: ActivationStream, rows, dtype=torch.float32
) -> torch.Tensor:
    """The block's output on the windows ``rows``, computed in ``dtype``: fp32 while it
    trains; the model's dtype as the output pass runs it (inputs and extras as captured).

    The captured extras (masks, rotary tables) were recorded for a batch of
    ``stream.batch_size`` windows; windows carry no padding, so every row of them is the
    same and a smaller batch takes their first rows.
    """
    hidden = stream.hidden[rows].to(_compute_device(block), dtype)
    fit = _fitted_extras(hidden.shape[0], stream.batch_size, dtype == torch.float32)
    args = fit(stream.block_args[index])
    kwargs = fit(stream.block_kwargs[index])
    out = block(hidden, *args, **kwargs)
    out = out[0] if isinstance(out, tuple | list) else out
    if not torch.isfinite(out).all():
        raise SdspruneError(f"NaN/Inf activations in the re-fit of decoder block {index}")
    return out


def _fitted_extras(rows: int, captured: int, to_fp32: bool = True):
    """A converter of captured extras for a batch of ``rows`` windows (in fp32 if asked)."""

    def convert(value):
        if isinstance(value, torch.Tensor):
            if value.dim() and value.shape[0] == captured != rows:
                value = value[:rows]
            return value.float() if to_fp32 and value.is_floating_point() else value
        if isinstance(value, tuple | list):
            return type(value)(convert(v) for v in value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert


@torch.no_grad()
def _block_error(
    index, block, stream, targets, rows: torch.Tensor, dist, keep_outputs: bool, dtype
) -> tuple[float, torch.Tensor | None]:
    """Σ‖block(x) − target‖² (in fp32) over the windows ``rows`` of every rank, the block run
    in ``dtype``, and (when asked) this rank's outputs on all its windows: the block then
    runs every window, the error still summed over ``rows`` alone."""
    count = stream.hidden.shape[0]
    outputs = torch.empty_like(stream.hidden) if keep_outputs else None
    judged = torch.zeros(count, dtype=torch.bool)
    judged[rows] = True
    error = 0.0
    for batch in _batches(torch.arange(count) if keep_outputs else rows, stream.batch_size):
        out = _forward(index, block, stream, batch, dtype)
        if outputs is not None:
            outputs[batch] = out.to(outputs.device, outputs.dtype)
        scored = judged[batch]
        if scored.any():
            target = _on(targets[batch[scored]], out)
            error += (out[scored.to(out.device)].float() - target).square().sum().item()
    return sum_over_ranks(dist, error), outputs


@dataclass
class _OwnedWindows:
    """Which of all ranks' windows this rank holds (ranks hold contiguous slices in order).

    Mini-batches are drawn from the global window order, so one and several processes take
    the same steps; each rank contributes the gradient of its share of every batch.
    """

    total: int
    first: int
    count: int

    def local(self, global_rows: torch.Tensor) -> torch.Tensor:
        mine = global_rows[(global_rows >= self.first) & (global_rows < self.first + self.count)]
        return mine - self.first

    def choose(self, count: int, seed: int) -> torch.Tensor:
        """``count`` global windows (0 or more than there are: all), seeded, in order."""
        if count <= 0 or count >= self.total:
            return torch.arange(self.total)
        generator = torch.Generator().manual_seed(10_000 + seed)
        return torch.randperm(self.total, generator=generator)[:count].sort().values


def _owned_windows(stream: ActivationStream, dist: Distributed | None) -> _OwnedWindows:
    count = stream.hidden.shape[0]
    if dist is None:
        return _OwnedWindows(total=count, first=0, count=count)
    counts = dist.gather_objects(count)
    return _OwnedWindows(total=sum(counts), first=sum(counts[: dist.rank]), count=count)


def _batches(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    """``rows`` in pieces of at most ``size`` (none when a rank has no share of a step)."""
    return [piece for piece in rows.split(size) if piece.numel()]


def _compute_device(block: nn.Module) -> torch.device:
    """Where the block computes (activations may be offloaded to CPU memory)."""
    return next(block.parameters()).device


def _on(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, torch.float32)
