"""Sparse inference backends: correctness against dense, and the auto choice logic."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_export import prune_weight, pruned_dir

import sdsprune
from sdsprune.errors import SdspruneError
from sdsprune.export import export_checkpoint
from sdsprune.inference import apply_backend, backend_report
from sdsprune.inference.kernels import (
    BsrLinear,
    CsrLinear,
    SemiStructuredLinear,
    semi_structured_device_problem,
    semi_structured_problem,
)
from sdsprune.models import model_linears

IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


def pruned_model(pattern: str = "2:4", arch: str = "llama", dtype=torch.float32):
    model = tiny_model(arch)
    with torch.no_grad():
        for layer in model_linears(model).values():
            layer.weight.copy_(prune_weight(layer.weight, pattern))
    return model.to(dtype)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def kernels_used(model) -> set[type]:
    return {type(m) for m in model.modules() if m.__class__.__name__.endswith("Linear")}


def fixed_timer(speeds: dict[str, float]):
    """A timer that reports fixed times per kernel (what a real measurement might say)."""

    def timer(contenders, _tokens):
        return {name: (fn(), speeds[name])[1] for name, fn in contenders.items()}

    return timer


@pytest.mark.parametrize("arch", ["llama", "opt", "gemma3_text"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_csr_matches_dense(arch, pattern):
    model = pruned_model(pattern, arch)
    expected = logits(model)
    report = apply_backend(model, "csr")
    assert report.counts() == {"csr": len(report.layers)}
    assert CsrLinear in kernels_used(model)
    torch.testing.assert_close(logits(model), expected, rtol=1e-4, atol=1e-4)


def test_dense_backend_changes_nothing():
    model = pruned_model()
    before = logits(model)
    report = apply_backend(model, "dense")
    assert set(report.counts()) == {"dense"}
    assert torch.equal(logits(model), before)
    assert backend_report(model) is report


def test_unpruned_layers_stay_dense():
    model = tiny_model("llama")
    report = apply_backend(model, "csr")
    assert report.counts() == {"dense": 14}
    assert "below" in report.layers[0].reason


def test_bsr_only_where_whole_blocks_are_zero():
    model = pruned_model("unstructured")
    report = apply_backend(model, "bsr")
    assert report.counts() == {"dense": 14} and "blocks" in report.layers[0].reason
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model_linears(model).values():
            layer.weight[:, : layer.in_features // 2] = 0.0  # half the 16x16 blocks empty
    expected = logits(model)
    report = apply_backend(model, "bsr")
    assert report.counts() == {"bsr": 14} and BsrLinear in kernels_used(model)
    torch.testing.assert_close(logits(model), expected, rtol=1e-4, atol=1e-4)


def test_auto_keeps_dense_where_sparse_is_slower():
    model = pruned_model("unstructured")
    before = logits(model)
    timer = fixed_timer({"dense": 1.0, "csr": 1.5, "bsr": 0.1})
    report = apply_backend(model, "auto", timer=timer)
    assert report.counts() == {"dense": 14}
    assert all("not faster" in layer.reason for layer in report.layers)
    assert report.layers[0].timings_us["csr"][1] > report.layers[0].timings_us["dense"][1]
    assert torch.equal(logits(model), before)


def test_auto_picks_sparse_only_when_faster_at_every_probe_size():
    """Decode (1), small batch (16) and prefill (512 tokens): a kernel that loses at any of
    them stays out, and is not timed at larger sizes once it has lost."""
    timed = []

    def timer_from(csr_by_tokens):
        def timer(contenders, tokens):
            timed.append((tokens, set(contenders)))
            return {"dense": 1.0, "csr": csr_by_tokens[tokens]}

        return timer

    model = pruned_model("unstructured")
    slow_batch = timer_from({1: 0.5, 16: 2.0})
    assert apply_backend(model, "auto", timer=slow_batch).counts() == {"dense": 14}
    assert {tokens for tokens, _ in timed} == {1, 16}  # lost at 16: never timed at 512
    model = pruned_model("unstructured")
    report = apply_backend(model, "auto", timer=timer_from({1: 0.5, 16: 0.5, 512: 2.0}))
    assert report.counts() == {"dense": 14}
    assert "at 512 tokens" in report.layers[0].reason
    model = pruned_model("unstructured")
    expected = logits(model)
    report = apply_backend(model, "auto", timer=timer_from({1: 0.5, 16: 0.5, 512: 0.5}))
    assert report.counts() == {"csr": 14}
    assert report.layers[0].reason == "measured faster than dense"
    assert report.layers[0].timings_us["csr"] == {1: 500000.0, 16: 500000.0, 512: 500000.0}
    torch.testing.assert_close(logits(model), expected, rtol=1e-4, atol=1e-4)


class RefusesPrefill(CsrLinear):
    """A kernel that converts fine and then refuses a shape when the product runs (as
    torch's 2:4 kernels may for some token counts)."""

    def _matmul(self, x2d):
        if x2d.shape[0] > 8:
            raise RuntimeError("kernel does not support this shape")
        return super()._matmul(x2d)


class RefusesEverything(CsrLinear):
    def _matmul(self, x2d):
        raise NotImplementedError("no kernel for this layout")


@pytest.mark.parametrize("backend", ["auto", "csr"])
@pytest.mark.parametrize("kernel", [RefusesPrefill, RefusesEverything])
def test_a_kernel_that_refuses_after_conversion_leaves_the_layer_dense(backend, kernel):
    model = pruned_model()
    before = logits(model)
    timer = fixed_timer({"dense": 1.0, "csr": 0.1, "bsr": 0.1})
    report = apply_backend(model, backend, timer=timer, converters={"csr": kernel})
    assert report.counts() == {"dense": 14}
    reason = report.layers[0].reason
    assert "csr" in reason and ("does not support" in reason or "no kernel" in reason)
    assert torch.equal(logits(model), before)


def test_auto_margin_rejects_marginal_wins():
    model = pruned_model("unstructured")
    timer = fixed_timer({"dense": 1.0, "csr": 0.98, "bsr": 1.0})
    assert apply_backend(model, "auto", timer=timer).counts() == {"dense": 14}


def test_auto_with_real_timings_is_correct_whatever_it_picks():
    model = pruned_model("unstructured")
    expected = logits(model)
    report = apply_backend(model, "auto", probe_tokens=(1,))
    assert sum(report.counts().values()) == 14
    torch.testing.assert_close(logits(model), expected, rtol=1e-4, atol=1e-4)


def test_a_kernel_that_disagrees_with_dense_is_rejected():
    class Wrong(CsrLinear):
        def _matmul(self, x2d):
            return super()._matmul(x2d) + 1.0

    model = pruned_model()
    before = logits(model)
    report = apply_backend(model, "csr", converters={"csr": Wrong})
    assert report.counts() == {"dense": 14}
    assert "did not match" in report.layers[0].reason
    assert torch.equal(logits(model), before)


def test_unknown_backend_is_a_user_error():
    with pytest.raises(SdspruneError, match="unknown backend"):
        apply_backend(pruned_model(), "onnx")


# --- 2:4 semi-structured (CUDA only; the checks and the plumbing are tested here) ---------


def test_semi_structured_is_refused_without_a_capable_gpu():
    if semi_structured_device_problem(torch.device("cuda")) is None:
        pytest.skip("this machine has a GPU that supports 2:4 kernels")
    with pytest.raises(SdspruneError, match="semi-structured"):
        apply_backend(pruned_model(dtype=torch.float16), "semi-structured")
    assert "CUDA" in semi_structured_device_problem(torch.device("cpu"))


def test_semi_structured_eligibility_rules():
    linear = torch.nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(prune_weight(linear.weight, "2:4"))
    assert "float16" in semi_structured_problem(linear)
    linear.half()
    assert semi_structured_problem(linear) is None
    with torch.no_grad():
        linear.weight.copy_(prune_weight(torch.randn(64, 64), "unstructured"))
    assert "2:4" in semi_structured_problem(linear)
    narrow = torch.nn.Linear(64, 48).half()
    with torch.no_grad():
        narrow.weight.copy_(prune_weight(narrow.weight.float(), "2:4"))
    assert "multiple" in semi_structured_problem(narrow)


def test_semi_structured_plumbing_with_a_stand_in_converter():
    """Swapping, bias, reshaping and verification, with the dense weight standing in."""
    model = pruned_model("2:4", dtype=torch.float16)
    expected = logits(model)

    def factory(linear):
        return SemiStructuredLinear(linear, converter=lambda w: w.clone())

    report = apply_backend(model, "semi-structured", converters={"semi-structured": factory})
    assert report.counts() == {"semi-structured": 14}
    assert SemiStructuredLinear in kernels_used(model)
    torch.testing.assert_close(logits(model), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(
    semi_structured_device_problem(torch.device("cuda")) is not None,
    reason="needs a CUDA GPU with compute capability >= 8.0",
)
def test_semi_structured_on_gpu_matches_dense():
    model = pruned_model("2:4", dtype=torch.float16).cuda()
    with torch.no_grad():
        expected = model(IDS.cuda()).logits.float()
    report = apply_backend(model, "semi-structured")
    assert report.counts().get("semi-structured", 0) > 0
    with torch.no_grad():
        actual = model(IDS.cuda()).logits.float()
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)


# --- sdsprune.load ---------------------------------------------------------------------


def test_load_sparse_checkpoint_with_a_backend(tmp_path):
    source = pruned_dir(tmp_path, "unstructured")
    export_checkpoint(source, tmp_path / "sparse", format="sparse")
    dense = sdsprune.load(source)
    sparse = sdsprune.load(tmp_path / "sparse", backend="csr")
    assert backend_report(sparse.model).counts() == {"csr": 14}
    torch.testing.assert_close(logits(sparse.model), logits(dense.model), rtol=1e-4, atol=1e-4)
    fp32 = sdsprune.load(tmp_path / "sparse", dtype="float32")
    assert next(fp32.model.parameters()).dtype == torch.float32


# --- nm24: the AVX-512 2:4 CPU kernel (compiled on first use) ---------------------------


def test_nm24_eligibility_needs_float32_and_2_4():
    from sdsprune.inference.nm24 import nm24_problem

    linear = torch.nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.copy_(prune_weight(linear.weight, "unstructured"))
    assert "2:4" in nm24_problem(linear)
    assert "float32" in nm24_problem(linear.half())


def test_nm24_packing_matches_the_weight():
    from sdsprune.inference.nm24 import pack_nm24

    weight = prune_weight(torch.randn(8, 16), "2:4")
    weight[0, :4] = 0.0
    values, positions = pack_nm24(weight)
    rebuilt = torch.zeros(8, 4, 4)
    rebuilt.scatter_(2, positions.view(8, 4, 2).long(), values.view(8, 4, 2))
    assert torch.equal(rebuilt.view(8, 16), weight)


@pytest.mark.slow
def test_nm24_kernel_matches_dense_at_every_token_count():
    from sdsprune.inference.nm24 import Nm24Linear, extension

    if isinstance(extension(), str):
        pytest.skip(extension())
    linear = torch.nn.Linear(72, 40)  # 36 kept values per row: two 16-wide chunks + a tail
    with torch.no_grad():
        linear.weight.copy_(prune_weight(linear.weight, "2:4"))
    module = Nm24Linear(linear)
    with torch.no_grad():
        for tokens in (1, 3, 4, 5, 8, 9, 33):
            x = torch.randn(2, tokens, 72)
            torch.testing.assert_close(module(x), linear(x), rtol=1e-5, atol=1e-5)
    model = pruned_model("2:4")
    expected = logits(model)
    assert apply_backend(model, "nm24").counts() == {"nm24": 14}
    torch.testing.assert_close(logits(model), expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # decode-sized inputs go through the kernel itself
        step = model(IDS[:1, :1]).logits
    torch.testing.assert_close(step, pruned_model("2:4")(IDS[:1, :1]).logits, rtol=1e-4, atol=1e-4)
