"""The streaming dense kernel (decode-sized calls of dense layers and the LM head) and the
compiled generation path that ``sdsprune.load(..., decode="compiled")`` sets up."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch import nn

from sdsprune.errors import SdspruneError
from sdsprune.inference import apply_backend, backend_report, load, weight_bytes
from sdsprune.inference.decode import compile_generation
from sdsprune.inference.gemv import MAX_GEMV_TOKENS, GemvLinear, gemv_problem
from sdsprune.models import model_linears

pytestmark = pytest.mark.skipif(
    gemv_problem(nn.Linear(16, 16)) is not None, reason="the CPU kernels do not build here"
)


def tolerance(dtype: torch.dtype, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item()
    return (1e-5 if dtype == torch.float32 else 1e-2) * scale + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 3, MAX_GEMV_TOKENS, MAX_GEMV_TOKENS + 1, 9])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_the_dense_layer_at_every_token_count(dtype, tokens, bias):
    torch.manual_seed(tokens)
    linear = nn.Linear(96, 200, bias=bias).to(dtype)
    layer = GemvLinear(linear)
    x = torch.randn(2, tokens, 96, dtype=dtype)
    with torch.inference_mode():
        expected = F.linear(
            x.float(), linear.weight.float(), None if not bias else linear.bias.float()
        )
        actual = layer(x)
    assert actual.dtype == dtype and actual.shape == (2, tokens, 200)
    assert (actual.float() - expected).abs().max().item() <= tolerance(dtype, expected)


def test_gemv_holds_the_layers_own_weight():
    linear = nn.Linear(32, 48)
    layer = GemvLinear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert weight_bytes(layer) == weight_bytes(linear)


def test_gemv_says_why_it_cannot_serve_a_layer():
    assert "whole chunks of 16" in gemv_problem(nn.Linear(40, 16))
    assert "float32 and bfloat16" in gemv_problem(nn.Linear(32, 16).double())


def test_auto_streams_the_dense_layers_and_a_tied_head_without_copies():
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    dense_bytes = weight_bytes(model)
    ids = torch.randint(0, 256, (1, 12))
    with torch.inference_mode():
        expected = model(ids).logits
        report = apply_backend(model, "auto")
        actual = model(ids).logits
        one_token = model(ids[:, :1]).logits
    assert report.counts() == {f"gemv<={MAX_GEMV_TOKENS}": len(report.layers)}
    assert report.head == f"gemv<={MAX_GEMV_TOKENS}" and report.to_dict()["head"] == report.head
    head = model.get_output_embeddings()
    assert isinstance(head, GemvLinear)
    assert head.weight is model.get_input_embeddings().weight  # still tied
    assert weight_bytes(model) == dense_bytes
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-5)
    assert torch.allclose(one_token, expected[:, :1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("bitmask_seconds", "kernel"), [(2.0, "gemv"), (0.5, "bitmask")])
def test_auto_races_sparse_kernels_against_the_streamed_dense_layer(
    monkeypatch, bitmask_seconds, kernel
):
    """The dense contender of the race is what the layer runs if it stays dense."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model_linears(model).values():
            layer.weight[:, ::2] = 0
    streamed_calls = []
    forward = GemvLinear.forward
    monkeypatch.setattr(
        GemvLinear, "forward", lambda self, x: streamed_calls.append(1) or forward(self, x)
    )

    def timer(contenders, _tokens):
        for fn in contenders.values():
            fn()
        return {name: 1.0 if name == "dense" else bitmask_seconds for name in contenders}

    report = apply_backend(model, "auto", timer=timer)
    assert streamed_calls  # dense was timed through the streaming kernel
    assert {choice.kernel for choice in report.layers} == {kernel}


def test_explicit_backends_and_dense_kernel_off_leave_torch_dense_layers():
    for options in ({"backend": "dense"}, {"backend": "auto", "dense_kernel": False}):
        model = tiny_model("llama")
        report = apply_backend(model, **options)
        assert report.head == "dense"
        assert not any(isinstance(m, GemvLinear) for m in model.modules())
        assert set(report.counts()) <= {"dense"} or options["backend"] == "auto"


@pytest.mark.parametrize("batch", [1, 8])
def test_compiled_generation_gives_eager_greedy_tokens_at_every_length(batch):
    """Static cache + compiled step (graph capture through the kernels' registered ops;
    aot_eager skips inductor's C++ build) against transformers' eager generation, for cache
    lengths from one token to the whole cache."""
    torch.manual_seed(batch)
    model = tiny_model("llama")
    apply_backend(model, "auto")
    ids = torch.randint(0, 256, (batch, 6))
    with torch.inference_mode():
        expected = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        compile_generation(model, backend="aot_eager")
        for new in (1, 2, 10):
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            assert torch.equal(out, expected[:, : 6 + new])


def test_load_sets_up_compiled_generation_and_refuses_an_unknown_mode(tiny_model_dir):
    loaded = load(tiny_model_dir, backend="auto", decode="compiled")
    config = loaded.model.generation_config
    assert config.cache_implementation == "static" and config.compile_config.fullgraph
    assert backend_report(loaded.model).head == f"gemv<={MAX_GEMV_TOKENS}"
    with pytest.raises(SdspruneError, match="unknown decode 'fast'"):
        load(tiny_model_dir, decode="fast")


def test_linears_of_a_dense_model_under_auto_are_all_streamed():
    model = tiny_model("qwen2")  # biases on q, k and v
    count = len(model_linears(model)) + 1  # and the head
    ids = torch.randint(0, 256, (1, 3))
    with torch.inference_mode():
        expected = model(ids).logits
        apply_backend(model, "auto")
        actual = model(ids).logits
    assert sum(isinstance(m, GemvLinear) for m in model.modules()) == count
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_without_the_kernels_auto_keeps_torchs_dense_layers_and_head(monkeypatch):
    from sdsprune.inference import gemv

    monkeypatch.setattr(gemv, "extension", lambda: "gemv needs a C++ compiler to build its kernel")
    model = tiny_model("llama")
    report = apply_backend(model, "auto")
    assert report.head == "dense"
    assert set(report.counts()) == {"dense"}
    assert not any(isinstance(m, GemvLinear) for m in model.modules())


def test_compiled_decode_without_a_compiler_stays_eager_with_a_reason(
    tiny_model_dir, monkeypatch, caplog
):
    from sdsprune.inference import loader

    monkeypatch.setattr(loader, "has_compiler", lambda: False)
    with caplog.at_level("WARNING", logger="sdsprune"):
        loaded = load(tiny_model_dir, backend="auto", decode="compiled")
    assert loaded.model.generation_config.cache_implementation != "static"
    assert "needs a C++ compiler" in caplog.text
    ids = torch.randint(0, 256, (1, 4))
    with torch.inference_mode():
        assert loaded.model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)
