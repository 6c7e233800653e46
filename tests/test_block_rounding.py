"""The block re-fit of a bf16 model: judged after the cast back to bf16, as the model runs
it; and pruned entries that stay exactly zero whatever their gradient holds."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from sdsprune.engine import capture_block_inputs, sequential
from sdsprune.methods import Magnitude
from sdsprune.models.blocks import block_linears, decoder_blocks
from sdsprune.pruners import SparsityPattern
from sdsprune.sds import SDSConfig
from sdsprune.sds import block as refit
from sdsprune.sds.block import fit_block

CPU = torch.device("cpu")


def pruned_block(dtype: torch.dtype):
    """Block 0 of a tiny Llama in ``dtype``, magnitude-pruned 2:4, its captured inputs and
    the dense block's outputs (the re-fit's targets)."""
    model = tiny_model("llama").to(dtype)
    windows = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(0))
    stream = capture_block_inputs(model, windows, CPU, 3)
    block = decoder_blocks(model)[0]
    linears = block_linears(block)
    with torch.no_grad():
        targets = block_outputs(block, stream)
        pruner, pattern = Magnitude().pruner(), SparsityPattern.parse("2:4")
        for layer in linears.values():
            pruned = pruner.prune(layer.weight.float(), None, pattern).weight
            layer.weight.copy_(pruned.to(dtype))
    return block, linears, stream, targets


@torch.no_grad()
def block_outputs(block, stream) -> torch.Tensor:
    """The block's outputs on every window as the engine's output pass computes them."""
    return torch.cat([sequential._forward(0, block, stream, s) for s in stream.batches()])


def relative_error(outputs: torch.Tensor, targets: torch.Tensor, batch: int) -> float:
    error = sum(
        float((o.float() - t.float()).square().sum())
        for o, t in zip(outputs.split(batch), targets.split(batch), strict=True)
    )
    return error / float(targets.float().square().sum())


def test_bf16_refit_error_and_outputs_are_those_of_the_saved_bf16_block():
    block, linears, stream, targets = pruned_block(torch.bfloat16)
    start = relative_error(block_outputs(block, stream), targets, stream.batch_size)
    config = SDSConfig(block_epochs=3, block_batch=2, block_windows=0)
    fit = fit_block(0, block, linears, stream, targets, config)
    assert fit.kept_epoch > 0  # the re-fit helped, even after rounding
    assert all(layer.weight.dtype == torch.bfloat16 for layer in linears.values())
    saved = block_outputs(block, stream)  # the bf16 block as saved, run as the model runs it
    assert fit.start_error == pytest.approx(start, rel=1e-6)
    assert fit.final_error == pytest.approx(
        relative_error(saved, targets, stream.batch_size), rel=1e-6
    )
    assert fit.final_error < fit.start_error
    assert torch.equal(fit.outputs, saved)  # the next block's inputs: the saved weights'


def test_bf16_refit_keeps_the_start_when_the_rounded_block_is_worse(monkeypatch):
    """An epoch the fp32 measurement calls better but whose bf16 weights are worse (here:
    noise, with the fp32 error faked lower): the start weights stay."""
    block, linears, stream, targets = pruned_block(torch.bfloat16)
    start = {name: layer.weight.detach().clone() for name, layer in linears.items()}
    fp32_errors = iter([1e-9, 1e-10, 1e-11])
    measure = refit._Problem.error

    def faked(self, rows, keep_outputs, dtype=torch.float32):
        if dtype == torch.float32:
            return next(fp32_errors), None
        return measure(self, rows, keep_outputs, dtype)

    def noisy_epoch(self, number, chosen, owned):
        generator = torch.Generator().manual_seed(number)
        with torch.no_grad():
            for layer in linears.values():
                noise = torch.randn(layer.weight.shape, generator=generator)
                layer.weight.add_(noise * layer.weight.abs().mean() * (layer.weight != 0))

    monkeypatch.setattr(refit._Problem, "error", faked)
    monkeypatch.setattr(refit._Epoch, "run", noisy_epoch)
    config = SDSConfig(block_epochs=2, block_batch=2, block_windows=0)
    fit = fit_block(0, block, linears, stream, targets, config)
    for name, layer in linears.items():
        assert torch.equal(layer.weight, start[name]), name
    assert fit.kept_epoch == 0
    assert fit.final_error == fit.start_error
    assert fit.outputs is None  # the output pass runs the kept (start) block


def test_nan_in_the_gradient_of_pruned_weights_does_not_survive():
    """NaN x 0 is NaN: a mask multiplication would carry a NaN gradient at a pruned entry
    into Adam's moments and from there into the weight."""
    block, linears, stream, targets = pruned_block(torch.float32)
    pruned = {name: layer.weight == 0 for name, layer in linears.items()}
    for name, layer in linears.items():
        layer.weight.register_hook(
            lambda grad, mask=pruned[name]: grad.masked_fill(mask, float("nan"))
        )
    config = SDSConfig(block_epochs=2, block_batch=2, block_windows=0)
    fit = fit_block(0, block, linears, stream, targets, config)
    for name, layer in linears.items():
        assert torch.isfinite(layer.weight).all(), name
        assert (layer.weight[pruned[name]] == 0).all(), name
    assert fit.final_error <= fit.start_error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refit_on_a_subset_judges_the_subset_and_returns_every_windows_outputs(dtype):
    """On a subset of the windows the error is the subset's, and the last measurement runs
    every window: its outputs are the kept block's on all of them (the output pass's)."""
    block, linears, stream, targets = pruned_block(dtype)
    config = SDSConfig(block_epochs=2, block_batch=2, block_windows=3)
    chosen = refit._OwnedWindows(total=6, first=0, count=6).choose(3, seed=0)
    fit = fit_block(0, block, linears, stream, targets, config)
    assert fit.kept_epoch == 2  # judged on the windows it trains on: the last epoch is best
    saved = block_outputs(block, stream)
    assert torch.equal(fit.outputs, saved)
    subset = relative_error(saved[chosen], targets[chosen], stream.batch_size)
    assert fit.final_error == pytest.approx(subset, rel=1e-5)
    assert fit.final_error < fit.start_error
