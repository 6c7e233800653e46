"""Run by tests/test_distributed.py as two processes: rank 1 raises in the middle of block 2
(after the ranks split its layers, so rank 0 waits in a collective for rank 1's share).

``raise``: the error ends rank 1's process (the usual case). ``linger``: the caller made the
group and rank 1's process stays alive after the error, group and all, as a process stuck in
its teardown does; its peers' collectives then never see a closed connection.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from sdsprune.errors import SdspruneError
from sdsprune.models import LoadedModel
from sdsprune.options import RunOptions
from sdsprune.prune import PruneProcessor, prune

FAILING_RANK, FAILING_BLOCK = 1, 2
MESSAGE = "injected failure on rank 1 in block 2"
LINGER_SECONDS = 90


def four_block_model():
    from conftest import tiny_config

    config = tiny_config("llama")
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def fail_in_block(rank: int, block: int) -> None:
    """This rank's solve of ``block`` raises (the other rank is solving its share then)."""
    solve = PruneProcessor.process

    def process(self, ctx):
        if ctx.index == block and int(os.environ["RANK"]) == rank:
            raise SdspruneError(MESSAGE)
        solve(self, ctx)

    PruneProcessor.process = process


def run(out: Path) -> None:
    from conftest import byte_tokenizer

    loaded = LoadedModel(four_block_model(), byte_tokenizer(), "tiny", None)
    windows = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(0))
    run_options = RunOptions(device="cpu", out=out, progress=False)
    prune(loaded, "sparsegpt", calibration=windows, run=run_options)


def main(mode: str, out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    fail_in_block(FAILING_RANK, FAILING_BLOCK)
    if mode == "raise":
        run(out)
        return
    import torch.distributed as dist

    dist.init_process_group("gloo")  # the caller's group: prune() leaves it up
    try:
        run(out)
    except SdspruneError:
        if dist.get_rank() != FAILING_RANK:
            raise
        time.sleep(LINGER_SECONDS)
        raise


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
