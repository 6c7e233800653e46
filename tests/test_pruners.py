import copy

import pytest
import torch
from conftest import byte_tokenizer, tiny_model
from reference_impl import slow_sequential_prune, slow_sparsegpt, slow_wanda

from sdsprune import SdspruneError
from sdsprune.models import LoadedModel, model_linears
from sdsprune.prune import prune
from sdsprune.pruners import InputStats, SparseGPTPruner, SparsityPattern, WandaPruner


def windows(count=8, length=24, seed=0):
    return torch.randint(0, 256, (count, length), generator=torch.Generator().manual_seed(seed))


def run(arch, method, sparsity, **kwargs):
    model = tiny_model(arch)
    loaded = LoadedModel(model, byte_tokenizer(), arch, None)
    result = prune(
        loaded,
        method=method,
        sparsity=sparsity,
        calibration=windows(),
        device="cpu",
        progress=False,
        **kwargs,
    )
    return model, result


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", ["0.5", "2:4", "4:8"])
def test_every_decoder_linear_gets_exactly_the_pattern(arch, method, sparsity):
    reference = tiny_model(arch)
    model, result = run(arch, method, sparsity)
    pattern = SparsityPattern.parse(sparsity)
    for name, layer in model_linears(model).items():
        zeros = layer.weight == 0
        if pattern.is_nm:
            per_group = zeros.view(zeros.shape[0], -1, pattern.m).sum(-1)
            assert (per_group == pattern.n).all(), name
        elif method == "wanda":
            assert (zeros.sum(1) == int(zeros.shape[1] * 0.5)).all(), name
        else:
            assert zeros.sum() == int(zeros.numel() * 0.5) or method == "sparsegpt", name
            assert abs(zeros.float().mean() - 0.5) < 0.01, name
        assert result.report["layers"][name]["sparsity"] == pytest.approx(
            zeros.float().mean().item()
        )
    # embeddings and lm_head untouched
    assert torch.equal(model.get_input_embeddings().weight, reference.get_input_embeddings().weight)
    assert torch.equal(
        model.get_output_embeddings().weight, reference.get_output_embeddings().weight
    )


def test_sparsegpt_unstructured_is_exact_per_column_block():
    torch.manual_seed(0)
    W, X = torch.randn(12, 40), torch.randn(200, 40)
    stats = InputStats(count=200, gram=X.T @ X / 200)
    out = SparseGPTPruner(blocksize=16).prune(W, stats, SparsityPattern.parse("0.5"))
    for start in range(0, 40, 16):
        block = out.mask[:, start : start + 16]
        assert block.sum() == int(block.numel() * 0.5)


@pytest.mark.parametrize("spec", ["0.5", "2:4", "0.7"])
def test_sparsegpt_layer_matches_slow_obs_implementation(spec):
    torch.manual_seed(1)
    W, X = torch.randn(10, 32), torch.randn(300, 32) @ torch.randn(32, 32)
    pattern = SparsityPattern.parse(spec)
    fast = SparseGPTPruner(blocksize=8).prune(W, InputStats(count=300, gram=X.T @ X / 300), pattern)
    nm = (pattern.n, pattern.m) if pattern.is_nm else None
    slow_w, slow_mask = slow_sparsegpt(W, X, pattern.fraction, nm, blocksize=8)
    assert torch.equal(fast.mask, slow_mask)
    torch.testing.assert_close(fast.weight, slow_w, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("spec", ["0.5", "2:4"])
def test_whole_model_matches_slow_reference(method, spec):
    model, _ = run("llama", method, spec)
    slow = tiny_model("llama")
    pattern = SparsityPattern.parse(spec)
    nm = (pattern.n, pattern.m) if pattern.is_nm else None
    if method == "wanda":
        layer_fn = lambda W, X: slow_wanda(W, X, pattern.fraction, nm)[0]  # noqa: E731
    else:
        layer_fn = lambda W, X: slow_sparsegpt(W, X, pattern.fraction, nm)[0]  # noqa: E731
    slow_sequential_prune(slow, windows(), layer_fn)
    for name, layer in model_linears(model).items():
        expected = model_linears(slow)[name].weight
        assert torch.equal(layer.weight == 0, expected == 0), name
        torch.testing.assert_close(layer.weight, expected, rtol=2e-3, atol=2e-4)


def test_wanda_uses_shared_statistics_for_shared_inputs():
    model, result = run("llama", "wanda", "0.5")
    # q/k/v read the same normalised hidden state: one statistic, identical feature norms
    assert result.report["summary"]["pruned_layers"] == len(model_linears(model))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("1.5", "strictly between"),
        ("0", "strictly between"),
        ("4:4", "0 < N < M"),
        ("abc", "neither"),
        ("2:3", "divisible by 3"),
    ],
)
def test_bad_sparsity_is_refused_before_work(spec, message):
    with pytest.raises(SdspruneError, match=message):
        run("llama", "magnitude", spec)


def test_wanda_reference_on_one_layer():
    torch.manual_seed(2)
    W, X = torch.randn(6, 16), torch.randn(50, 16)
    out = WandaPruner().prune(
        W, InputStats(count=50, sumsq=X.square().sum(0)), SparsityPattern.parse("2:4")
    )
    expected, mask = slow_wanda(W, X, nm=(2, 4))
    assert torch.equal(out.mask, mask) and torch.equal(out.weight, expected)


def test_pruning_is_deterministic():
    first, _ = run("qwen2", "sparsegpt", "0.5")
    second, _ = run("qwen2", "sparsegpt", "0.5")
    for (name, a), b in zip(
        model_linears(first).items(), model_linears(second).values(), strict=True
    ):
        assert torch.equal(a.weight, b.weight), name


def test_model_copy_is_not_needed_for_in_memory_use():
    model = tiny_model("opt")
    before = copy.deepcopy(model.state_dict())
    loaded = LoadedModel(model, byte_tokenizer(), "opt", None)
    prune(
        loaded,
        method="magnitude",
        sparsity="0.5",
        calibration=windows(),
        device="cpu",
        progress=False,
    )
    changed = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert changed and all(".layers." in k for k in changed)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_error_report_can_be_skipped_without_changing_the_result(method):
    measured, with_errors = run("llama", method, "2:4")
    skipped, without = run("llama", method, "2:4", measure_errors=False)
    for (name, a), b in zip(
        model_linears(measured).items(), model_linears(skipped).values(), strict=True
    ):
        assert torch.equal(a.weight, b.weight), name
    assert all(rec["rel_error"] >= 0 for rec in with_errors.report["layers"].values())
    assert with_errors.report["summary"]["mean_rel_error"] is not None
    if method == "sparsegpt":  # its Gram matrix gives the error for free: always reported
        assert without.report["layers"] == with_errors.report["layers"]
    else:
        assert all("rel_error" not in rec for rec in without.report["layers"].values())
        assert without.report["summary"]["mean_rel_error"] is None
