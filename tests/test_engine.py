"""Engine behaviour: determinism, layer ownership across ranks, the explicit runtime."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import byte_tokenizer, cpu_run, tiny_model

from sdsprune.engine import (
    BlockProcessor,
    BlockStore,
    Runtime,
    capture,
    capture_block_inputs,
    run_blocks,
)
from sdsprune.engine.capture import (
    check_head_replay,
    head_logits,
    logits_and_last_block_outputs,
)
from sdsprune.engine.distributed import layer_owners
from sdsprune.errors import SdspruneError
from sdsprune.models import LoadedModel, model_linears
from sdsprune.models.blocks import decoder_blocks
from sdsprune.prune import prune
from sdsprune.utils import torch_threads

METHODS = [
    dict(method="wanda"),
    dict(method="sparsegpt"),
    dict(method="sparsegpt", sparsity="2:4"),
    dict(method="sds:sparsegpt"),
]


def pruned(seed: int = 0, threads: int | None = None, **options) -> dict[str, torch.Tensor]:
    windows = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(seed))
    model = tiny_model("llama")
    with torch_threads(threads):
        loaded = LoadedModel(model, byte_tokenizer(), "tiny", None)
        prune(loaded, calibration=windows, run=cpu_run(), **options)
    return {name: layer.weight.detach().clone() for name, layer in model_linears(model).items()}


@pytest.mark.parametrize("options", METHODS, ids=lambda o: o["method"] + o.get("sparsity", ""))
def test_same_seed_and_inputs_give_bit_identical_results(options):
    first, second = pruned(**options), pruned(**options)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("options", METHODS, ids=lambda o: o["method"] + o.get("sparsity", ""))
def test_thread_count_changes_results_only_within_tolerance(options):
    """The documented tolerance (README): masks equal, weights within rtol 1e-4 / atol 1e-5
    (thread count changes the summation order of matmuls, nothing else)."""
    one, two = pruned(threads=1, **options), pruned(threads=2, **options)
    for name in one:
        assert torch.equal(one[name] == 0, two[name] == 0), name
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-5)


def test_layer_owners_balance_and_agree():
    sizes = {"q": 64, "k": 16, "v": 16, "o": 64, "up": 128, "gate": 128, "down": 128}
    owners = layer_owners(list(sizes), sizes, 2)
    assert owners == layer_owners(list(reversed(sizes)), sizes, 2)  # order-independent
    loads = [sum(sizes[n] for n, r in owners.items() if r == rank) for rank in (0, 1)]
    assert abs(loads[0] - loads[1]) <= 64
    assert set(layer_owners(["a"], {"a": 1}, 3).values()) == {0}


class _Untouched(BlockProcessor):
    """Changes no weight: the pass only propagates the activations."""

    def process(self, ctx) -> None:
        pass


def test_default_runtime_is_plain():
    runtime = Runtime()
    assert type(runtime.store) is BlockStore and runtime.dist is None and runtime.is_main
    assert runtime.checkpoint is None and runtime.passes == 0


def test_capture_and_run_blocks_honour_the_runtime_they_are_given_and_only_it():
    cpu, model = torch.device("cpu"), tiny_model("llama")
    windows = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(0))
    runtime = Runtime(offload_activations=True, tokens_per_batch=2 * 24)
    stream = capture_block_inputs(model, windows, cpu, runtime=runtime)
    assert (stream.batch_size, stream.compute) == (2, cpu)
    plain = capture_block_inputs(model, windows, cpu)  # a default runtime: nothing shared
    assert (plain.batch_size, plain.compute) == (8, None)
    run_blocks(model, stream, _Untouched(), cpu, progress=False, runtime=runtime)
    run_blocks(model, plain, _Untouched(), cpu, progress=False)
    assert runtime.passes == 1
    torch.testing.assert_close(stream.hidden, plain.hidden)


def test_the_head_replay_gives_the_dense_models_logits_from_its_last_block(arch):
    """What the distillation relies on: a pruned model's own head, run on the dense model's
    last-block outputs, gives the dense model's logits (no block runs, the pruned ones
    included), on every architecture the tests cover; the check accepts each of them."""
    dense = tiny_model(arch)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    check_head_replay(dense, ids[:1, :8])
    expected, outputs = logits_and_last_block_outputs(dense, ids)
    with torch.no_grad():
        pruned = copy.deepcopy(dense)
        for layer in model_linears(pruned).values():
            layer.weight.zero_()
        replayed = head_logits(pruned, ids, outputs)
    torch.testing.assert_close(replayed, expected, rtol=1e-5, atol=1e-5)
    assert len(decoder_blocks(pruned)) == len(decoder_blocks(dense))  # the blocks are back
    assert all(type(block).__name__ != "_Replay" for block in decoder_blocks(pruned))


def test_a_model_whose_loop_the_replay_does_not_fit_fails_the_check(monkeypatch):
    """A loop that reads block outputs otherwise than as the hidden states (simulated: the
    stand-in hands on one sequence only) is refused with one message, blocks restored."""
    model = tiny_model("llama")
    monkeypatch.setattr(capture._Replay, "forward", lambda self, hidden, *a, **k: hidden[:1])
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(SdspruneError, match="head"):
        check_head_replay(model, ids)
    assert all(type(block).__name__ != "_Replay" for block in decoder_blocks(model))
