"""The fused decode step (one C++ loop over a Llama-family model's blocks) against the
model's own forward, the ``generate()`` path ``load`` sets up with it, and its fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import byte_tokenizer, tiny_config, tiny_model
from test_export import prune_weight
from torch import nn

from sdsprune.inference import apply_backend, backend_report, load
from sdsprune.inference.decode import eager_step, fused_step, new_cache, prefill
from sdsprune.inference.fused import (
    FusedDecoder,
    cache_problem,
    enable_fused_decode,
    fused_problem,
)
from sdsprune.inference.gemv import gemv_problem
from sdsprune.models import model_linears
from sdsprune.utils import cache_keyword, torch_threads

pytestmark = pytest.mark.skipif(
    gemv_problem(nn.Linear(16, 16)) is not None, reason="the CPU kernels do not build here"
)

PROMPT, CACHE = 3, 12  # 9 decode steps: cache lengths from 4 to the whole cache


def pruned_model(arch: str, pattern: str = "unstructured", dtype=torch.float32, seed=0):
    """A tiny model whose block linears keep half their weights (by magnitude, per row, or
    2 of every 4); qwen2's q/k/v biases made non-zero (transformers may init them to 0)."""
    model = tiny_model(arch, seed)
    if arch == "mistral":
        # Mistral v0.2+ has no sliding window; with one, transformers' StaticCache makes
        # sliding layers, which the fused step does not write (cache_problem says so).
        model.config.sliding_window = None
    with torch.no_grad():
        for layer in model_linears(model).values():
            layer.weight.copy_(prune_weight(layer.weight, pattern))
        if arch == "qwen2":
            generator = torch.Generator().manual_seed(seed)
            for block in model.model.layers:
                attention = block.self_attn
                for linear in (attention.q_proj, attention.k_proj, attention.v_proj):
                    assert linear.bias is not None
                    linear.bias.copy_(torch.randn(linear.bias.shape, generator=generator) * 0.5)
    return model.to(dtype).eval()


def decode_both(model, batch: int, seed: int = 0):
    """Prefill the same prompt into two static caches, then step one eagerly and one fused
    with the same tokens until the cache is full; yield (eager, fused) per step, then the
    two caches."""
    ids = torch.randint(0, 256, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))
    eager, fused = eager_step(model), fused_step(model)
    caches = new_cache(model, "fused", CACHE), new_cache(model, "fused", CACHE)
    with torch.inference_mode():
        tokens = [prefill(model, ids, cache) for cache in caches]
        assert torch.equal(tokens[0], tokens[1])
        token = tokens[0]
        for _ in range(CACHE - PROMPT):
            expected = eager(token, caches[0])
            actual = fused(token, caches[1])
            yield expected, actual
            token = expected[1]
    yield caches


def assert_same_caches(expected, actual, tolerance: float):
    assert int(expected.get_seq_length()) == int(actual.get_seq_length()) == CACHE
    for ref, got in zip(expected.layers, actual.layers, strict=True):
        assert int(ref.cumulative_length) == int(got.cumulative_length)
        for a, b in ((ref.keys, got.keys), (ref.values, got.values)):
            scale = a.float().abs().max().item()
            assert (a.float() - b.float()).abs().max().item() <= tolerance * scale


def bitmask_for_decode(contenders, tokens):
    """A stub race timer that makes ``auto`` switch to bitmask for decode-sized calls."""
    fast = 0.5 if tokens <= 8 else 2.0
    return {name: {"dense": 1.0, "bitmask": fast}.get(name, 10.0) for name in contenders}


@pytest.mark.parametrize(
    ("backend", "pattern", "options", "kernels"),
    [
        ("dense", "unstructured", {}, {"dense"}),
        ("bitmask", "unstructured", {}, {"bitmask"}),
        ("auto", "unstructured", {}, None),  # what the race picks here (streamed dense)
        ("auto", "unstructured", {"timer": bitmask_for_decode}, {"bitmask<=8"}),  # switched
        ("nm24", "2:4", {}, {"nm24"}),
    ],
    ids=["dense", "bitmask", "auto", "auto-switched", "nm24"],
)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_fused_step_matches_the_eager_step_at_every_cache_length(
    arch, backend, pattern, options, kernels
):
    model = pruned_model(arch, pattern)
    report = apply_backend(model, backend, **options)
    if kernels is not None:
        assert set(report.counts()) == kernels
    assert fused_problem(model) is None
    for batch in (1, 8):
        steps = list(decode_both(model, batch, seed=batch))
        caches = steps.pop()
        assert len(steps) == CACHE - PROMPT
        for (logits, ids), (fused_logits, fused_ids) in steps:
            assert fused_logits.dtype == torch.float32 and fused_logits.shape == (batch, 256)
            scale = logits.abs().max().item()
            assert (fused_logits - logits).abs().max().item() <= 1e-4 * scale
            assert torch.equal(fused_ids, ids)
        assert_same_caches(*caches, tolerance=1e-4)


@pytest.mark.parametrize("threads", [1, 3])
def test_fused_step_splits_rows_over_any_thread_count(threads):
    """The rows of each layer are split over torch's threads by bytes, whatever their number
    (one thread: no barrier at all; three: parts that do not divide the rows evenly)."""
    model = pruned_model("llama")
    apply_backend(model, "bitmask")
    with torch_threads(threads):
        for (logits, ids), (fused_logits, fused_ids) in list(decode_both(model, 2))[:-1]:
            assert (fused_logits - logits).abs().max().item() <= 1e-4 * logits.abs().max().item()
            assert torch.equal(fused_ids, ids)


def test_bfloat16_fused_step_is_within_bfloat16_rounding_of_the_eager_step():
    """The fused step keeps activations in float32 (only the weights and the cache are
    bfloat16, and the inputs of the bfloat16 dot-product kernel are rounded), where
    transformers rounds every activation to bfloat16: the logits differ by bfloat16
    rounding accumulated over two blocks. Measured (4 seeds): at most 0.63% of the largest
    logit, and cached keys/values within 0.8% of the largest (one bfloat16 step); the
    bounds (2%) leave a margin of about 3x. Greedy ids are not compared (near-ties may
    flip under different rounding)."""
    model = pruned_model("llama", dtype=torch.bfloat16)
    assert set(apply_backend(model, "bitmask").counts()) == {"bitmask"}
    for batch in (1, 8):
        steps = list(decode_both(model, batch))
        caches = steps.pop()
        for (logits, _), (fused_logits, _) in steps:
            assert fused_logits.dtype == torch.float32
            logits = logits.float()
            scale = logits.abs().max().item()
            assert (fused_logits - logits).abs().max().item() <= 0.02 * scale
        assert_same_caches(*caches, tolerance=0.02)


@pytest.fixture
def fused_calls(monkeypatch):
    """The number of fused steps run (a list to count on)."""
    calls = []
    call = FusedDecoder.__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(FusedDecoder, "__call__", counting)
    return calls


def test_generate_through_the_default_load_gives_eager_greedy_tokens(tiny_model_dir, fused_calls):
    fused = load(tiny_model_dir, backend="auto").model
    eager = load(tiny_model_dir, backend="dense", decode="eager").model
    assert fused.generation_config.cache_implementation == "static"
    assert eager.generation_config.cache_implementation != "static"
    settings = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    # two prompts of different lengths, left-padded with token 0
    short, long = torch.randint(1, 256, (3,)), torch.randint(1, 256, (7,))
    padded = torch.zeros(2, 7, dtype=torch.long)
    padded[0, 4:], padded[1] = short, long
    mask = (torch.arange(7) >= torch.tensor([[4], [0]])).long()
    with torch.inference_mode():
        expected = eager.generate(ids, **settings)
        assert torch.equal(fused.generate(ids, **settings), expected)
        assert len(fused_calls) == 9  # every step after the prompt's
        # the logits too: a tiny random model's greedy tokens hardly depend on the context,
        # so a wrong mask or position would not always show in the tokens
        logits = {"output_logits": True, "return_dict_in_generate": True}
        expected = eager.generate(padded, attention_mask=mask, **settings, **logits)
        actual = fused.generate(padded, attention_mask=mask, **settings, **logits)
        alone = eager.generate(short[None], **settings)
    assert len(fused_calls) == 18
    assert torch.equal(actual.sequences, expected.sequences)
    assert torch.equal(actual.sequences[0, 4:], alone[0])  # padding changes nothing
    assert len(actual.logits) == len(expected.logits) == 10
    for got, want in zip(actual.logits, expected.logits, strict=True):
        assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_auto_packs_every_pruned_layer_for_the_fused_step_and_races_otherwise(tmp_path):
    """With the fused step, bytes set the speed: auto gives every pruned layer the bitmask
    kernel without a race; decoding eagerly, it races (here with a timer under which dense
    always wins, so no layer is packed)."""
    folder = tmp_path / "pruned"
    pruned_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    fused = backend_report(load(folder, backend="auto").model)
    assert set(fused.counts()) == {"bitmask"}
    assert all("fused decode step" in layer.reason for layer in fused.layers)

    def dense_wins(candidates, tokens):
        return {kernel: (1e-6 if kernel == "dense" else 1.0) for kernel in candidates}

    eager = backend_report(load(folder, backend="auto", decode="eager", timer=dense_wins).model)
    assert "bitmask" not in eager.counts()


def test_fused_problem_names_the_models_it_does_not_serve():
    for arch in ("gemma3_text", "opt"):
        problem = fused_problem(tiny_model(arch))
        assert problem is not None and arch in problem
        with pytest.raises(ValueError, match=arch):
            fused_step(tiny_model(arch))
    config = tiny_config("llama")
    config.intermediate_size = 72  # down_proj reads 72 inputs: not whole chunks of 16
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    problem = fused_problem(model)
    assert "layers.0.mlp.down_proj" in problem and "whole chunks of 16" in problem
    model = tiny_model("llama")
    model.model.layers[1].self_attn.o_proj = nn.Identity()
    assert fused_problem(model) == "layers.1.self_attn.o_proj: Identity layers are not fused"
    assert "float32 or bfloat16" in fused_problem(tiny_model("llama").double())
    windowed = tiny_model("mistral")
    windowed.config.sliding_window = 8  # Mistral v0.1: a static cache of sliding layers
    assert "sliding window" in fused_problem(windowed)
    qwen = tiny_model("qwen2")  # a sliding_window value, but use_sliding_window off
    assert not qwen.config.use_sliding_window and fused_problem(qwen) is None
    dynamic = tiny_model("llama")
    dynamic.model.rotary_emb.rope_type = "dynamic"  # frequencies that grow with the length
    assert "dynamic rotary scaling" in fused_problem(dynamic)


def test_load_fused_on_a_model_it_cannot_serve_warns_and_falls_back(tmp_path, monkeypatch, caplog):
    from sdsprune.inference import loader

    folder = tmp_path / "tiny-gemma3"
    tiny_model("gemma3_text").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    compiled = []
    monkeypatch.setattr(loader, "compile_generation", compiled.append)
    with caplog.at_level(logging.WARNING, logger="sdsprune"):
        model = load(folder, decode="fused").model
    assert "cannot serve this model" in caplog.text and "gemma3_text" in caplog.text
    assert compiled == [model] or "needs a C++ compiler" in caplog.text
    caplog.clear()
    # without a compiler too, generation stays eager and works (no inductor build here)
    monkeypatch.setattr(loader, "has_compiler", lambda: False)
    with caplog.at_level(logging.WARNING, logger="sdsprune"):
        model = load(folder, decode="fused").model
    assert "cannot serve" in caplog.text and "stays eager" in caplog.text
    ids = torch.randint(0, 256, (1, 4))
    with torch.inference_mode():
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)
    # auto falls back silently to eager generation
    model = load(folder).model
    assert model.generation_config.cache_implementation != "static"
    assert model.forward.__func__ is type(model).forward


def test_cache_problem_names_caches_the_step_cannot_write():
    from transformers import DynamicCache

    model = tiny_model("llama")
    assert "static cache" in cache_problem(DynamicCache(config=model.config), 1)
    cache = new_cache(model, "fused", 4)
    assert "after a prompt" in cache_problem(cache, 1)
    with torch.inference_mode():
        prefill(model, torch.randint(0, 256, (2, 3)), cache)
    assert cache_problem(cache, 2) is None
    assert "no room" in cache_problem(cache, 1)  # another batch size
    windowed = tiny_model("mistral")  # a sliding window: sliding static layers
    cache = new_cache(windowed, "fused", 4)
    with torch.inference_mode():
        prefill(windowed, torch.randint(0, 256, (1, 2)), cache)
    assert "sliding windows" in cache_problem(cache, 1)


def test_fused_step_refuses_a_full_cache():
    model = tiny_model("llama")
    step = fused_step(model)
    cache = new_cache(model, "fused", 4)
    with torch.inference_mode():
        token = prefill(model, torch.randint(0, 256, (1, 3)), cache)
        step(token, cache)  # the last position
        assert int(cache.get_seq_length()) == 4
        with pytest.raises(ValueError, match="no room for another token"):
            step(token, cache)
    assert int(cache.get_seq_length()) == 4


def test_wrapped_forward_sends_other_calls_to_the_models_own_forward(fused_calls):
    from transformers import DynamicCache

    model, reference = tiny_model("llama"), tiny_model("llama")
    enable_fused_decode(model)
    kw = cache_keyword(model)  # the wrapped forward keeps the model's signature
    assert kw == cache_keyword(reference)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        # the prompt (several tokens) and a one-token step on a dynamic cache
        dynamic, reference_dynamic = DynamicCache(), DynamicCache()
        for cache, net in ((dynamic, model), (reference_dynamic, reference)):
            net(ids[:, :4], **{kw: cache}, use_cache=True)
        actual = model(ids[:, 4:], **{kw: dynamic}, use_cache=True).logits
        expected = reference(ids[:, 4:], **{kw: reference_dynamic}, use_cache=True)
        assert torch.equal(actual, expected.logits)
        # a multi-token call on a filled static cache, a call asking for hidden states
        static, reference_static = new_cache(model, "fused", 8), new_cache(model, "fused", 8)
        for cache, net in ((static, model), (reference_static, reference)):
            net(ids[:, :2], **{kw: cache}, use_cache=True)
        actual = model(ids[:, 2:4], **{kw: static}, use_cache=True).logits
        expected = reference(ids[:, 2:4], **{kw: reference_static}, use_cache=True)
        assert torch.equal(actual, expected.logits)
        out = model(ids[:, 4:], **{kw: static}, output_hidden_states=True)
        reference_out = reference(ids[:, 4:], **{kw: reference_static}, output_hidden_states=True)
        assert out.hidden_states is not None
        assert torch.equal(out.logits, reference_out.logits)
        assert not fused_calls
        # a one-token call on the filled static cache is the fused step's
        actual = model(ids[:, 4:], **{kw: static}, use_cache=True).logits
        expected = reference(ids[:, 4:], **{kw: reference_static}, use_cache=True).logits
    assert len(fused_calls) == 1
    assert actual.shape == expected.shape == (2, 1, 256)
    assert (actual - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    # with gradients enabled, the model's own forward (autograd works)
    cache = new_cache(model, "fused", 8)
    with torch.no_grad():
        model(ids[:, :4], **{kw: cache}, use_cache=True)
    out = model(ids[:, 4:], **{kw: cache}, use_cache=True)
    assert out.logits.requires_grad and len(fused_calls) == 1
