"""Run by tests/test_distributed.py under torchrun: prune a tiny model with several
configurations on every rank; rank 0 saves the weights and records for comparison."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from sdsprune.models import LoadedModel
from sdsprune.options import RunOptions
from sdsprune.prune import prune

CONFIGS = {
    "wanda": dict(method="wanda"),
    "sparsegpt-2of4": dict(method="sparsegpt", sparsity="2:4"),
    "sds-kd": dict(method="sds[data_mode=kd]:wanda"),
    "sds-block": dict(method="sds[block_epochs=2;block_batch=4]", sparsity="2:4"),
    "sds-block-redense": dict(
        method="sds[block_epochs=2;block_redense=1;block_batch=4]", sparsity="2:4"
    ),
    "sds-distill": dict(
        method="sds[block_epochs=0;distill_epochs=2;distill_batch=4]", sparsity="2:4", windows=16
    ),
}


def calibration(count: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, 24), generator=torch.Generator().manual_seed(0))


def run(name: str, windows: int = 6, **kwargs) -> tuple[dict, dict]:
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import byte_tokenizer, tiny_model

    model = tiny_model("llama")
    loaded = LoadedModel(model, byte_tokenizer(), "tiny", None)
    run_options = RunOptions(device="cpu", progress=False)
    result = prune(loaded, calibration=calibration(windows), run=run_options, **kwargs)
    layers = {k: v for k, v in result.report["layers"].items()}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, layers


def main(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")  # once: prune() joins an existing group and keeps it
    for name, kwargs in CONFIGS.items():
        state, layers = run(name, **kwargs)
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save({"state": state, "layers": layers}, out / f"{name}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
