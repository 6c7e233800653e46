"""The bitmask kernel for unstructured sparse weights: packing, products, model, fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_model
from test_export import prune_weight

from sdsprune.inference import apply_backend, weight_bytes
from sdsprune.inference.kernels import SwitchedLinear
from sdsprune.models import model_linears
from sdsprune.utils import torch_threads

# every pruned layer shape of the default model (SmolLM2-135M), then widths that are not a
# multiple of the 16-input chunk and a row count below one parallel task
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (40, 37), (3, 16), (7, 1)]
KEPT = (0.0, 0.3, 0.5, 0.7, 1.0)  # fraction of weights kept: empty rows up to full rows
TOKENS = (1, 2, 3, 4, 5, 8, 9, 16)  # the kernel's token blocks and tails, then a prompt's path
# a prompt's register blocks of 8, 4, 2 and 1 vectors of 16 tokens, tails, two passes of 128
PROMPT_TOKENS = (9, 16, 40, 136, 300)


@pytest.fixture(scope="module")
def ext():
    from sdsprune.inference.bitmask import extension

    if isinstance(extension(), str):
        pytest.skip(extension())
    return extension()


def sparse_linear(out_features, in_features, kept, dtype=torch.float32, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator))
        linear.weight.mul_(torch.rand(out_features, in_features, generator=generator) < kept)
    return linear.to(dtype)


def dense_product(linear, x):
    """The float32 product of the layer's own numbers (bf16 weights widened exactly)."""
    bias = None if linear.bias is None else linear.bias.float()
    return torch.nn.functional.linear(x.float(), linear.weight.float(), bias)


def assert_matches(actual, expected, dtype):
    """float32 within accumulation-order noise; bfloat16 within the rounding of its output."""
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    scale = max(expected.abs().max().item(), 1e-3)
    assert (actual.float() - expected).abs().max().item() <= tolerance * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_round_trips_and_keeps_only_the_kept_values(dtype):
    from sdsprune.inference.bitmask import CHUNK, PADDING, pack_bitmask, unpack_bitmask

    weight = sparse_linear(6, 37, 0.5, dtype).weight.detach().clone()
    weight[0] = 0.0  # an empty row
    weight[1] = 1.5  # a full row
    values, offsets, masks = pack_bitmask(weight)
    assert values.dtype == dtype and masks.dtype == torch.int16
    assert masks.shape == (6, -(-37 // CHUNK))
    assert int(offsets[-1]) == int(weight.count_nonzero())
    assert values.numel() == int(weight.count_nonzero()) + PADDING
    assert offsets[1] == 0 and offsets[2] == 37
    assert torch.equal(unpack_bitmask(values, offsets, masks, 37), weight)


def test_packed_float32_at_half_sparsity_takes_about_2_bytes_a_weight():
    from sdsprune.inference.bitmask import pack_bitmask

    weight = prune_weight(torch.randn(1536, 576), "unstructured")  # 50% zeros
    packed = sum(t.numel() * t.element_size() for t in pack_bitmask(weight))
    # 4 bytes x 0.5 values + 1/8 byte of mask, + an 8-byte offset a row (0.014 here)
    assert packed / weight.numel() == pytest.approx(2.125 + 8 / 576, abs=0.002)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_kernel_matches_dense_for_every_shape_density_and_token_count(
    ext, dtype, out_features, in_features
):
    """Up to 8 tokens the kernel (float32 accumulation), above it the tiled expansion into
    a dense GEMM in the weight's dtype."""
    from sdsprune.inference.bitmask import BitmaskLinear

    for kept in KEPT:
        linear = sparse_linear(out_features, in_features, kept, dtype)
        module = BitmaskLinear(linear)
        assert module.values.dtype == dtype
        with torch.no_grad():
            for tokens in TOKENS:
                x = torch.randn(1, tokens, in_features).to(dtype)
                actual = module(x)
                assert actual.dtype == dtype and actual.shape == (1, tokens, out_features)
                assert_matches(actual, dense_product(linear, x), dtype)
                assert_matches(module.dense_forward(x), dense_product(linear, x), dtype)


@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_both_prompt_paths_match_dense_for_every_shape_density_and_token_count(
    ext, out_features, in_features
):
    """A prompt is multiplied straight from the packed form (float32, up to 60% kept) or
    through the tiled expansion into torch's GEMM; both are checked on their own here."""
    from sdsprune.inference.bitmask import pack_bitmask

    for kept in KEPT:
        linear = sparse_linear(out_features, in_features, kept, bias=False)
        values, offsets, masks = pack_bitmask(linear.weight)
        for tokens in PROMPT_TOKENS:
            x = torch.randn(tokens, in_features)
            expected = dense_product(linear, x)
            sparse = ext.sparse_mm(x, values, offsets, masks, in_features)
            assert_matches(sparse, expected, torch.float32)
            assert_matches(
                ext.tiled_mm(x, values, offsets, masks, in_features, 7), expected, torch.float32
            )


@pytest.mark.parametrize(
    ("kept", "tokens", "path"),
    [(0.3, 40, "sparse_mm"), (0.6, 32, "sparse_mm"), (0.7, 40, "tiled"), (0.3, 31, "tiled")],
)
def test_a_float32_prompt_takes_the_packed_product_where_enough_weights_are_pruned(
    ext, kept, tokens, path
):
    """From the packed form with at most 60% kept and at least 32 tokens; shorter prompts
    and denser layers through the tiled GEMM."""
    from sdsprune.inference.bitmask import BitmaskLinear

    linear = sparse_linear(64, 96, kept, bias=False)
    module = BitmaskLinear(linear)
    x = torch.randn(tokens, 96)
    packed = (module.values, module.offsets, module.masks, 96)
    tiled = ext.tiled_mm(x, *packed, module._tile_rows)
    chosen = ext.sparse_mm(x, *packed) if path == "sparse_mm" else tiled
    with torch.no_grad():
        assert torch.equal(module(x), chosen)
        assert_matches(module(x), dense_product(linear, x), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompts_expand_tile_by_tile_with_a_last_partial_tile(ext, dtype):
    """Tiles of 7 rows over 40 rows: five whole tiles and one of 5 rows (80% kept: a float32
    prompt takes the tiled path there)."""
    from sdsprune.inference.bitmask import BitmaskLinear

    linear = sparse_linear(40, 37, 0.8, dtype)
    module = BitmaskLinear(linear)
    module._tile_rows = 7
    x = torch.randn(3, 11, 37).to(dtype)
    with torch.no_grad():
        assert_matches(module(x), dense_product(linear, x), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_each_thread_expands_and_multiplies_its_own_rows_in_inference_mode(ext, dtype, threads):
    """The tiled prompt path splits the rows over the threads (whole chunks of 16, the last
    thread takes the rest: 100 rows over 3 threads are 32, 32 and 36) and runs a GEMM on
    every worker thread; under ``torch.inference_mode`` those GEMMs must see the caller's
    mode (a worker without it refuses to write the inference tensor)."""
    from sdsprune.inference.bitmask import pack_bitmask

    linear = sparse_linear(100, 48, 0.5, dtype, bias=False)
    packed = pack_bitmask(linear.weight)
    x = torch.randn(24, 48).to(dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            actual = ext.tiled_mm(x, *packed, 48, 7)
    finally:
        torch.set_num_threads(before)
    assert_matches(actual, dense_product(linear, x), dtype)


def test_kernel_gives_the_same_bits_whatever_the_thread_count(ext):
    """Each row is summed by one thread in a fixed order, so the row split over threads
    leaves no row out and changes no bit, for one token and for a prompt (50% kept: the
    product from the packed form). From 129 tokens the passes are split over the threads
    whole: 300 tokens are passes of 128, 128 and 44 on one thread, 4 of 75 on two, 3 of 100
    on three; each output sums the same weights in the same order whatever the split."""
    from sdsprune.inference.bitmask import BitmaskLinear

    for out_features, in_features in SHAPES:
        linear = sparse_linear(out_features, in_features, 0.5)
        module = BitmaskLinear(linear)
        for tokens in (1, 3, 8, 40, 140, 300):
            x = torch.randn(tokens, in_features)
            with torch.inference_mode():
                outputs = []
                for threads in (1, 2, 3):
                    with torch_threads(threads):
                        outputs.append(module(x))
            assert_matches(outputs[0], dense_product(linear, x), torch.float32)
            assert all(torch.equal(outputs[0], other) for other in outputs[1:])


AVX2_CHECK = textwrap.dedent(
    """
    import torch
    from sdsprune.inference import bitmask, native
    assert native.cpu_capability() == "AVX2", native.cpu_capability()
    assert not isinstance(bitmask.extension(), str), bitmask.extension()
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for out_features, in_features in SHAPES:
            for kept in (0.0, 0.3, 0.7, 1.0):
                weight = torch.randn(out_features, in_features)
                weight *= torch.rand(out_features, in_features) < kept
                linear = torch.nn.Linear(in_features, out_features).to(dtype)
                with torch.no_grad():
                    linear.weight.copy_(weight)
                module = bitmask.BitmaskLinear(linear)
                for tokens in (1, 2, 5, 9, 40, 136):
                    x = torch.randn(tokens, in_features).to(dtype)
                    with torch.no_grad():
                        expected = torch.nn.functional.linear(
                            x.float(), linear.weight.float(), linear.bias.float()
                        )
                        actual = module(x).float()
                    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
                    scale = max(expected.abs().max().item(), 1e-3)
                    err = (actual - expected).abs().max().item()
                    assert err <= tolerance * scale, (dtype, out_features, in_features, kept, tokens)
    print("AVX2 OK")
    """
)


def test_the_avx2_path_is_correct_when_forced(ext):
    """ATEN_CPU_CAPABILITY=avx2 selects (and builds) the AVX2 code path on an AVX-512 CPU;
    in its own process, since each process registers the kernel's op once."""
    from sdsprune.inference.native import cpu_capability

    if cpu_capability() not in ("AVX512", "AVX2"):
        pytest.skip(f"no AVX2 on this CPU ({cpu_capability()})")
    script = f"SHAPES = {SHAPES!r}\n{AVX2_CHECK}"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "AVX2 OK" in result.stdout


def pruned_model(dtype=torch.float32):
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model_linears(model).values():
            layer.weight.copy_(prune_weight(layer.weight, "unstructured"))
    return model.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_on_a_model_matches_dense_and_holds_only_packed_weights(ext, dtype):
    model, reference = pruned_model(dtype), pruned_model(dtype)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    report = apply_backend(model, "bitmask")
    assert report.counts() == {"bitmask": 14}
    assert report.weight_bytes == weight_bytes(model) < weight_bytes(reference)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    with torch.no_grad():
        for tokens in (1, 10):  # the kernel, then a prompt's path
            torch.testing.assert_close(
                model(ids[:, :tokens]).logits.float(),
                reference(ids[:, :tokens]).logits.float(),
                rtol=tolerance,
                atol=tolerance,
            )


def test_generate_through_auto_gives_the_dense_models_greedy_tokens(ext):
    """The user's path: auto (here made to pick bitmask for decode-sized calls by a stub
    timer) then ``generate``; greedy tokens equal the dense model's, and the layers keep
    only their packed weights (the prompt goes through the expansion)."""
    model, reference = pruned_model(), pruned_model()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))

    def timer(contenders, tokens):
        fast = 0.5 if tokens <= 8 else 2.0
        return {name: {"dense": 1.0, "bitmask": fast}.get(name, 10.0) for name in contenders}

    report = apply_backend(model, "auto", timer=timer)
    assert report.counts() == {"bitmask<=8": 14}
    blocks = model.model.layers
    assert sum(isinstance(m, SwitchedLinear) for m in blocks.modules()) == 14
    assert not any(isinstance(m, torch.nn.Linear) for m in blocks.modules())
    assert report.weight_bytes < weight_bytes(reference)
    settings = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        expected = reference.generate(ids, **settings)
        actual = model.generate(ids, **settings)
    assert torch.equal(actual, expected)


def test_compiles_with_its_registered_op(ext):
    """torch.compile (whole graph) keeps the kernel's op for few tokens and many."""
    from sdsprune.inference.bitmask import BitmaskLinear

    module = BitmaskLinear(sparse_linear(40, 72, 0.4))
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True, dynamic=False)
    with torch.inference_mode():
        for tokens in (1, 16):
            x = torch.randn(2, tokens, 72)
            torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-5)


def test_auto_races_this_packages_kernels_where_they_build(ext, monkeypatch):
    """With the kernels built, auto never tries torch's CSR/BSR (8 bytes a kept weight,
    slow to expand for prompts); without them it falls back to torch's."""
    from sdsprune.inference import backends

    cpu = torch.device("cpu")
    assert backends.auto_candidates(cpu) == ["nm24", "bitmask"]
    timed: set[str] = set()

    def timer(contenders, tokens):
        timed.update(contenders)
        return {name: 0.5 if name == "bitmask" else 1.0 for name in contenders}

    report = apply_backend(pruned_model(), "auto", timer=timer)
    assert report.counts() == {"bitmask": 14} and timed == {"dense", "bitmask"}
    monkeypatch.setattr(backends, "_bitmask_problem_of_build", lambda: "no compiler")
    assert backends.auto_candidates(cpu) == ["csr", "bsr", "nm24", "bitmask"]
