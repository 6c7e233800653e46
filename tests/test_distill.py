"""SDS's distillation stage: it lowers the KL to the dense model on windows it did not train
on, keeps the exact pattern and the model's dtype, never ends worse than its start, and
refuses what it cannot do."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import byte_tokenizer, cpu_run, tiny_model
from test_sds import assert_two_of_four, run_sds

from sdsprune import SdspruneError
from sdsprune.methods import SDS
from sdsprune.models import LoadedModel
from sdsprune.models.blocks import model_linears
from sdsprune.prune import prune
from sdsprune.sds import SDSConfig
from sdsprune.sds.config import AUTO_DISTILL_EPOCHS, DISTILL_HELD_OUT
from sdsprune.sds.distill import _split, _token_kl


def test_distillation_lowers_the_held_out_kl_and_keeps_the_pattern():
    """Weights x10 make the tiny model's next-token distributions peaked (at the usual init
    they are near uniform and there is nothing to learn that carries to other windows)."""
    model = tiny_model("llama")
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(10)
    loaded = LoadedModel(model, byte_tokenizer(), "tiny", None)
    calib = torch.randint(0, 256, (32, 24), generator=torch.Generator().manual_seed(0))
    method = SDS(block_epochs=0, distill_epochs=3, distill_lr=0.01)
    result = prune(loaded, method, sparsity="2:4", calibration=calib, run=cpu_run())
    fit = result.report["sds"]["distill"]
    assert fit["kept_epoch"] > 0
    assert fit["final_kl"] < 0.97 * fit["start_kl"]
    assert fit["final_kl"] == min(fit["epoch_kl"])
    assert (fit["trained_windows"], fit["held_out_windows"]) == (28, 4)
    assert_two_of_four(model)
    assert "distill" in result.report["timings"]


def test_distillation_never_ends_worse_than_its_start():
    """A step size that only diverges: the weights stay those the blocks left."""
    plain, _ = run_sds(windows=16, block_epochs=0, distill_epochs=0)
    distilled, result = run_sds(windows=16, block_epochs=0, distill_epochs=2, distill_lr=1e4)
    assert result.report["sds"]["distill"]["kept_epoch"] == 0
    for name, layer in model_linears(distilled).items():
        assert torch.equal(layer.weight, model_linears(plain)[name].weight), name


@pytest.mark.parametrize("block_epochs", [0, 1])
def test_the_kl_it_reports_is_the_kl_to_the_dense_models_forward(block_epochs):
    """The dense logits come from the dense stream through the model's head, with no dense
    copy, and the start's from the pruned stream (left by the output pass, or by the
    re-fit's last measurement on a window subset): the held-out KL reported at the start
    equals the KL between a dense copy's forward and the model the stage kept (its start:
    the step size only diverges)."""
    dense = tiny_model("llama")
    with torch.no_grad():  # peaked distributions: a KL the report's 5 decimals resolve
        for parameter in dense.parameters():
            if parameter.dim() == 2:
                parameter.mul_(10)
    model = copy.deepcopy(dense)
    calib = torch.randint(0, 256, (16, 24), generator=torch.Generator().manual_seed(0))
    method = SDS(block_epochs=block_epochs, block_windows=4, distill_epochs=1, distill_lr=1e4)
    loaded = LoadedModel(model, byte_tokenizer(), "tiny", None)
    fit = prune(loaded, method, sparsity="2:4", calibration=calib, run=cpu_run()).report
    fit = fit["sds"]["distill"]
    assert fit["kept_epoch"] == 0
    held = calib[DISTILL_HELD_OUT - 1 :: DISTILL_HELD_OUT]
    with torch.no_grad():
        kl = _token_kl(model(held).logits, dense(held).logits) / held.numel()
    assert float(kl) > 0.1
    assert fit["start_kl"] == pytest.approx(float(kl), abs=1e-5)


def test_distillation_of_a_bfloat16_model_keeps_its_dtype_and_pattern():
    model, result = run_sds(dtype="bfloat16", windows=16, block_epochs=0, distill_epochs=1)
    for layer in model_linears(model).values():
        assert layer.weight.dtype == torch.bfloat16 and layer.weight.grad is None
    assert_two_of_four(model)
    fit = result.report["sds"]["distill"]
    assert fit["final_kl"] <= fit["start_kl"]


def test_held_out_windows_are_the_same_with_one_process_or_several():
    train, held = _split(20, None)
    assert held.tolist() == [7, 15] and len(train) == 18

    class Rank:  # the second of two ranks holding 12 and 8 windows
        rank = 1

        def gather_objects(self, value):
            return [12, value]

    train1, held1 = _split(8, Rank())
    assert held1.tolist() == [3] and len(train1) == 7  # global window 15


def test_distillation_refuses_too_few_windows_and_low_memory(tiny_model_dir, tmp_path):
    with pytest.raises(SdspruneError, match=f"at least {DISTILL_HELD_OUT} calibration windows"):
        run_sds(windows=6, block_epochs=0, distill_epochs=1)
    calib = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(0))
    with pytest.raises(SdspruneError, match=r"distillation .* cannot run with --low-memory"):
        prune(
            str(tiny_model_dir),
            SDS(distill_epochs=1),
            calibration=calib,
            run=cpu_run(low_memory=True, out=tmp_path / "low"),
        )
    assert not (tmp_path / "low").exists()
    with pytest.raises(SdspruneError, match="distillation need the fused schedule"):
        SDS(schedule="staged", distill_epochs=1)


@pytest.mark.parametrize(
    ("low_memory", "windows", "epochs"),
    [
        (False, DISTILL_HELD_OUT, AUTO_DISTILL_EPOCHS),
        (True, 64, 0),
        (False, DISTILL_HELD_OUT - 1, 0),
    ],
)
def test_the_default_distils_where_the_run_can(low_memory, windows, epochs):
    """By default the stage runs unless the run cannot train the whole model in memory, has
    no dense stream (the staged schedule) or too few windows to hold some out; a value given
    is kept (and refused later if impossible)."""
    assert SDS().for_run(low_memory, windows).distill_epochs == epochs
    assert SDS(schedule="staged").for_run(low_memory, windows).distill_epochs == 0
    assert SDS(distill_epochs=2).for_run(low_memory, windows).distill_epochs == 2
    assert SDS(distill_epochs=0).for_run(low_memory, windows).distill_epochs == 0


def test_a_default_run_reports_the_distillation_it_decided_on(tiny_model_dir, tmp_path):
    """The report's settings hold the value the run used; a low-memory run goes without the
    stage instead of failing."""
    calib = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(0))
    result = prune(str(tiny_model_dir), SDS(block_epochs=0), calibration=calib, run=cpu_run())
    assert result.report["config"]["sds"]["distill_epochs"] == AUTO_DISTILL_EPOCHS
    assert result.report["sds"]["distill"]["held_out_windows"] == 1
    low_run = cpu_run(low_memory=True, out=tmp_path / "low")
    low = prune(str(tiny_model_dir), SDS(block_epochs=0), calibration=calib, run=low_run)
    assert low.report["config"]["sds"]["distill_epochs"] == 0 and "distill" not in low.report["sds"]


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(distill_epochs=-1), "distillation epochs"),
        (dict(distill_batch=0), "distillation batch"),
        (dict(distill_lr=0.0), "learning rates"),
        (dict(distill_lr=float("nan")), "--distill-lr"),
    ],
)
def test_bad_distillation_settings(settings, message):
    with pytest.raises(SdspruneError, match=message):
        SDSConfig(**settings)
