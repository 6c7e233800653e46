"""--low-memory: blocks read from the checkpoint and written out one at a time give the
same checkpoint as the in-memory run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdsprune.options import RunOptions
from sdsprune.prune import prune


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


@pytest.mark.parametrize(
    "options",
    [
        dict(method="wanda"),
        dict(method="sparsegpt", sparsity="2:4"),
        dict(method="sds[data_mode=kd]:wanda"),
        dict(method="sds[schedule=staged]:sparsegpt"),
        dict(method="sds[block_epochs=1;block_batch=2]", sparsity="2:4"),
    ],
    ids=["wanda", "sparsegpt-2of4", "sds-fused-kd", "sds-staged", "sds-block-refit"],
)
def test_low_memory_checkpoint_equals_the_in_memory_one(tiny_model_dir, tmp_path, options):
    windows = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(0))

    def run(**run_options):
        options_run = RunOptions(device="cpu", progress=False, **run_options)
        return prune(str(tiny_model_dir), calibration=windows, run=options_run, **options)

    normal = run(out=tmp_path / "normal")
    low = run(out=tmp_path / "low", low_memory=True)
    expected, got = weights(tmp_path / "normal"), weights(tmp_path / "low")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert low.report["summary"] == normal.report["summary"]
    assert low.report["config"]["low_memory"] is True
    # the blocks were never all in memory: the returned skeleton still has them on meta
    assert all(p.is_meta for p in low.model.model.model.layers.parameters())
    assert not list(tmp_path.glob(".low*")), "scratch blocks left behind"


def test_low_memory_output_loads_with_transformers(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    run = RunOptions(device="cpu", progress=False, out=tmp_path / "low", low_memory=True)
    prune(str(tiny_model_dir), "magnitude", calibration=windows, run=run)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "low")
    q = model.model.layers[0].self_attn.q_proj.weight
    assert (q == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)  # outside: unchanged
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
