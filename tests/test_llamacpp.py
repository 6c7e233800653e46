"""llama.cpp export and runner: GGUF round trips through transformers' reader (run anywhere),
greedy decoding against torch (only where llama-cpp-python is installed)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import byte_tokenizer, tiny_config

from sdsprune.errors import SdspruneError
from sdsprune.export import export_checkpoint
from sdsprune.inference.decode import eager_step, new_cache, prefill
from sdsprune.inference.llamacpp import LlamaCppRunner, llamacpp_problem, write_gguf

VOCAB = 320  # 256 bytes + 32 merges + 2 special tokens, padded by the writer
PROMPT = torch.randint(0, 290, (12,), generator=torch.Generator().manual_seed(0)).tolist()
STEPS = 8
# which tiny models tie lm_head to the embedding (SmolLM2 does), to cover both GGUF layouts
TIED = {"llama": True, "mistral": False, "qwen2": True}


def bpe_tokenizer():
    """A byte-level BPE tokenizer with 32 merges: llama.cpp refuses a BPE vocab without any."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [(alphabet[2 * i], alphabet[2 * i + 1]) for i in range(32)]
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    vocab.update({a + b: len(alphabet) + i for i, (a, b) in enumerate(merges)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


def tiny_folder(tmp_path: Path, arch: str = "llama") -> Path:
    """A saved tiny model whose widths (64, 128) are whole q8_0 blocks of 32; weights drawn
    wide (std 0.2) so greedy choices are clear of float noise."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    config.vocab_size, config.initializer_range = VOCAB, 0.2
    config.tie_word_embeddings = TIED[arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = tmp_path / arch
    model.save_pretrained(folder)
    bpe_tokenizer().save_pretrained(folder)
    return folder


def read_back(gguf_path: Path) -> dict[str, torch.Tensor]:
    """The state dict transformers rebuilds from the GGUF (it un-permutes Q and K)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.state_dict()


def original(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).state_dict()


@pytest.mark.parametrize("arch", sorted(TIED))
def test_f32_gguf_reads_back_bit_for_bit(tmp_path: Path, arch: str):
    folder = tiny_folder(tmp_path, arch)
    path = write_gguf(folder, tmp_path / "model-f32.gguf", "f32")
    expected, actual = original(folder), read_back(path)
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_bf16_and_q8_0_read_back_within_their_rounding(tmp_path: Path):
    folder = tiny_folder(tmp_path)
    expected = original(folder)
    bf16 = read_back(write_gguf(folder, tmp_path / "model-bf16.gguf", "bf16"))
    q8 = read_back(write_gguf(folder, tmp_path / "model-q8_0.gguf", "q8_0"))
    for name, tensor in expected.items():
        if tensor.dim() == 1:  # norms stay f32 in every precision
            assert torch.equal(bf16[name], tensor) and torch.equal(q8[name], tensor), name
            continue
        torch.testing.assert_close(bf16[name], tensor, rtol=2**-8, atol=0, msg=name)
        # q8_0: per 32-value block, steps of max|block| / 127 (half a step of rounding) with
        # the step stored as f16 (relative error 2^-11, times up to 127 steps)
        block_max = tensor.reshape(-1, 32).abs().amax(dim=1, keepdim=True)
        error = (q8[name] - tensor).reshape(-1, 32).abs()
        assert (error <= block_max * (0.5 / 127 + 2**-11)).all(), name


def test_sparse_export_converts_to_the_same_weights(tmp_path: Path):
    folder = tiny_folder(tmp_path)
    sparse = tmp_path / "sparse"
    export_checkpoint(folder, sparse, format="sparse")
    actual = read_back(write_gguf(sparse, tmp_path / "sparse-f32.gguf", "f32"))
    for name, tensor in original(folder).items():
        assert torch.equal(actual[name], tensor), name


def test_unsupported_inputs_are_one_clear_error(tmp_path: Path):
    from conftest import tiny_model

    opt = tmp_path / "opt"
    tiny_model("opt").save_pretrained(opt)
    byte_tokenizer().save_pretrained(opt)
    with pytest.raises(SdspruneError, match=r"supports model types .* not 'opt'"):
        write_gguf(opt, tmp_path / "opt.gguf", "f32")
    folder = tiny_folder(tmp_path)
    with pytest.raises(SdspruneError, match="precision 'q4'"):
        write_gguf(folder, tmp_path / "x.gguf", "q4")
    merge_free = tmp_path / "merge-free"
    tiny_model("llama").save_pretrained(merge_free)
    byte_tokenizer().save_pretrained(merge_free)
    with pytest.raises(SdspruneError, match="no BPE merges"):
        write_gguf(merge_free, tmp_path / "x.gguf", "f32")
    assert not (tmp_path / "opt.gguf").exists() and not (tmp_path / "x.gguf").exists()


def test_missing_llama_cpp_is_one_line_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import raises ImportError
    problem = llamacpp_problem()
    assert problem is not None and "\n" not in problem
    assert "pip install 'sdsprune[llamacpp]'" in problem
    with pytest.raises(SdspruneError, match="not installed"):
        LlamaCppRunner(Path("absent.gguf"), threads=1, context=64)


needs_llamacpp = pytest.mark.skipif(llamacpp_problem() is not None, reason=llamacpp_problem() or "")


def torch_greedy(folder: Path) -> tuple[list[int], np.ndarray]:
    """Torch's eager greedy tokens after PROMPT (as bench decodes) and the logits at the last
    position of PROMPT + all but the last of them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.inference_mode():
        cache, step = new_cache(model, "eager", 64), eager_step(model)
        choice, chosen = prefill(model, torch.tensor([PROMPT]), cache), []
        for _ in range(STEPS):
            chosen.append(int(choice))
            _, choice = step(choice, cache)
        logits = model(torch.tensor([PROMPT + chosen[:-1]])).logits[0, -1]
    return chosen, logits.numpy()


@needs_llamacpp
@pytest.mark.parametrize("arch", sorted(TIED))
def test_f32_gguf_decodes_as_torch_does(tmp_path: Path, arch: str):
    folder = tiny_folder(tmp_path, arch)
    tokens, logits = torch_greedy(folder)
    assert len(set(tokens)) > 1  # a model stuck on one token would hide a wrong rope layout
    with LlamaCppRunner(write_gguf(folder, tmp_path / "m.gguf", "f32"), 1, 64) as runner:
        assert runner.greedy_tokens(PROMPT, STEPS) == tokens
        # llama.cpp keeps K and V in f16 by default: differences of ~4e-3 here (~5e-6 with
        # an f32 cache, checked by hand)
        np.testing.assert_allclose(runner.last_logits(PROMPT + tokens[:-1]), logits, atol=2e-2)


@needs_llamacpp
@pytest.mark.parametrize("precision", ["bf16", "q8_0"])
def test_lower_precisions_load_and_decode(tmp_path: Path, precision: str):
    folder = tiny_folder(tmp_path)
    with LlamaCppRunner(write_gguf(folder, tmp_path / "m.gguf", precision), 1, 64) as runner:
        tokens = runner.greedy_tokens(PROMPT, STEPS)
        assert len(tokens) == STEPS and all(0 <= t < VOCAB for t in tokens)
        assert runner.prefill_seconds(PROMPT) > 0
        assert runner.decode_seconds(PROMPT, 4) > 0
        with pytest.raises(SdspruneError, match="exceed the llama"):
            runner.decode_seconds(PROMPT, 64)
