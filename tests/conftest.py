"""Shared fixtures: tiny random models of several architectures, a byte-level tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as sdsprune does; before torch loads

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_ARCHS = ("llama", "opt", "qwen2", "mistral", "gemma3_text")


@pytest.fixture(autouse=True)
def _thread_count_is_not_leaked():
    """Results are compared bit for bit across processes; a test that leaves torch on another
    thread count changes later tests' float reductions (CI once failed on exactly that)."""
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    torch.set_num_threads(before)
    assert after == before, f"the test left torch on {after} threads (was {before})"


def tiny_config(arch: str):
    """A 2-block model with every width divisible by 8 (so 2:4 and 4:8 apply)."""
    from transformers import AutoConfig

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    extra = {
        "llama": dict(intermediate_size=128, num_key_value_heads=2, max_position_embeddings=256),
        "qwen2": dict(intermediate_size=128, num_key_value_heads=2, max_position_embeddings=256),
        "mistral": dict(intermediate_size=128, num_key_value_heads=2, max_position_embeddings=256),
        "gemma3_text": dict(
            intermediate_size=128,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=256,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "opt": dict(ffn_dim=128, max_position_embeddings=256, word_embed_proj_dim=64),
    }[arch]
    return AutoConfig.for_model(arch, **common, **extra)


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    return model.eval()


def benchmark_module(name: str):
    """``benchmarks/<name>.py`` imported by path: the benchmarks are scripts, not a package."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def every_method(*sds_bases: str) -> list[str]:
    """The method string of every base pruner alone, then of SDS on each of ``sds_bases``:
    a pruner added to the library is covered by the tests that run every method."""
    from sdsprune.methods import BASE_METHODS

    return [*BASE_METHODS, *(f"sds:{base}" for base in sds_bases)]


def cpu_run(**options):
    """A test's run options: on CPU, without progress bars."""
    from sdsprune.options import RunOptions

    return RunOptions(device="cpu", progress=False, **options)


def byte_tokenizer():
    """A 256-token byte-level tokenizer built in memory (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=alphabet[0], eos_token=alphabet[1]
    )


@pytest.fixture(params=TINY_ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A saved tiny Llama checkpoint folder with its tokenizer, loadable by spec."""
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def offline_harness(monkeypatch):
    """``offline_harness({task: dataset})`` makes those standard harness tasks' data
    unreachable, as offline; it returns the list of names the harness is then asked to load.

    The harness's task index (6 s to build) is replaced by entries shaped like its own.
    """

    def make_offline(datasets: dict[str, str]) -> list[str]:
        import lm_eval.tasks
        from lm_eval.tasks._index import Entry, Kind

        from sdsprune import hub

        asked: list[str] = []

        class OfflineManager:
            def __init__(self):
                self.all_tasks = list(datasets)
                self.task_index = {
                    name: Entry(name, Kind.TASK, None, cfg={"dataset_path": path})
                    for name, path in datasets.items()
                }

            def load(self, names):
                asked.extend(names)
                raise ConnectionError(f"Couldn't reach '{datasets[names[0]]}' (offline mode)")

        monkeypatch.setattr(lm_eval.tasks, "TaskManager", OfflineManager)
        monkeypatch.setattr(hub, "hub_reachable", lambda: False)
        monkeypatch.setattr(hub, "go_offline_unless_reachable", lambda: None)
        return asked

    return make_offline
