import copy

import pytest
import torch
from conftest import byte_tokenizer, tiny_model
from reference_impl import slow_sequential_prune, slow_sparsegpt, slow_wanda

from sdsprune import SdspruneError
from sdsprune.methods import SparseGPT, Wanda
from sdsprune.models import LoadedModel, model_linears
from sdsprune.options import RunOptions
from sdsprune.prune import prune
from sdsprune.pruners import InputStats, SparsityPattern


def windows(count=8, length=24, seed=0):
    return torch.randint(0, 256, (count, length), generator=torch.Generator().manual_seed(seed))


def run(arch, method, sparsity, **run_options):
    model = tiny_model(arch)
    loaded = LoadedModel(model, byte_tokenizer(), arch, None)
    options = RunOptions(device="cpu", progress=False, **run_options)
    result = prune(loaded, method, sparsity=sparsity, calibration=windows(), run=options)
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
    out = SparseGPT(blocksize=16).pruner().prune(W, stats, SparsityPattern.parse("0.5"))
    for start in range(0, 40, 16):
        block = out.mask[:, start : start + 16]
        assert block.sum() == int(block.numel() * 0.5)


@pytest.mark.parametrize("spec", ["0.5", "2:4", "0.7"])
def test_sparsegpt_layer_matches_slow_obs_implementation(spec):
    torch.manual_seed(1)
    W, X = torch.randn(10, 32), torch.randn(300, 32) @ torch.randn(32, 32)
    pattern = SparsityPattern.parse(spec)
    fast = (
        SparseGPT(blocksize=8).pruner().prune(W, InputStats(count=300, gram=X.T @ X / 300), pattern)
    )
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


@pytest.mark.parametrize("level", ["sumsq", "gram"])
def test_shared_inputs_share_one_statistic_equal_to_the_token_space_one(level):
    """q/k/v read one normalised hidden state, gate/up another: each group gets one
    statistic object, equal to what its recorded input gives; o_proj and down_proj their own."""
    from sdsprune.engine.stats import StatsCollector
    from sdsprune.models import block_linears, decoder_blocks

    model = tiny_model("llama")
    block = decoder_blocks(model)[0]
    linears = block_linears(block)
    inputs = {}

    def record(name):
        def hook(_module, args, _output):
            inputs[name] = args[0].reshape(-1, 64)

        return hook

    handles = [
        linears[name].register_forward_hook(record(name))
        for name in ("self_attn.q_proj", "mlp.gate_proj")
    ]
    collector = StatsCollector(linears, level)
    with collector.hooks(), torch.no_grad():
        model(windows(2, 12))
    for handle in handles:
        handle.remove()
    collector.finalize()
    stats = collector.for_layer
    assert stats("self_attn.q_proj") is stats("self_attn.k_proj") is stats("self_attn.v_proj")
    assert stats("mlp.gate_proj") is stats("mlp.up_proj")
    distinct = {id(stats(name)) for name in linears}
    assert len(distinct) == 4  # qkv, o, gate/up, down
    for leader in ("self_attn.q_proj", "mlp.gate_proj"):
        x = inputs[leader].double()
        if level == "gram":
            expected = (x.T @ x / x.shape[0]).float()
            torch.testing.assert_close(stats(leader).gram, expected, rtol=1e-4, atol=1e-6)
        else:
            torch.testing.assert_close(stats(leader).sumsq, x.square().sum(0).float())


def test_sparsegpt_factorises_a_shared_hessian_once(monkeypatch):
    from sdsprune.pruners import sparsegpt

    calls = []
    original = sparsegpt.inverse_hessian_cholesky
    monkeypatch.setattr(
        sparsegpt,
        "inverse_hessian_cholesky",
        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs),
    )
    model, _ = run("llama", "sparsegpt", "0.5")
    assert len(model_linears(model)) == 14 and len(calls) == 2 * 4  # 4 distinct inputs a block


@pytest.mark.parametrize("nm", [(1, 3), (2, 6)])
def test_sparsegpt_nm_with_m_not_dividing_its_128_column_block(nm):
    """Groups of 3 or 6 columns must not straddle a 128-column block: blocks shrink to 126."""
    torch.manual_seed(4)
    W, X = torch.randn(8, 192), torch.randn(400, 192)
    pattern = SparsityPattern.parse(f"{nm[0]}:{nm[1]}")
    out = SparseGPT().pruner().prune(W, InputStats(count=400, gram=X.T @ X / 400), pattern)
    per_group = out.mask.view(8, -1, nm[1]).sum(-1)
    assert (per_group == nm[0]).all()
    expected, mask = slow_sparsegpt(W, X, nm=nm, blocksize=126)
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.weight, expected, rtol=2e-3, atol=2e-4)


def test_masks_break_ties_by_position_whatever_the_device():
    from sdsprune.pruners.patterns import lowest_k_mask, nm_mask

    flat = torch.zeros(3, 16)
    assert lowest_k_mask(flat, 8)[:, :8].all() and not lowest_k_mask(flat, 8)[:, 8:].any()
    scores = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0] * 4])
    mask = lowest_k_mask(scores, 22)  # all 20 zeros, then the first two ones
    expected = (scores == 0) | (torch.arange(32) < 4) & (scores == 1)
    assert torch.equal(mask, expected)
    assert torch.equal(nm_mask(torch.ones(2, 8), 2, 4), torch.tensor([[1, 1, 0, 0] * 2] * 2) == 1)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 4), (2, 8), (5, 8), (1, 2), (4, 16)])
def test_nm_mask_by_rank_equals_top_k_with_ties(nm):
    from sdsprune.pruners.patterns import lowest_k_mask, nm_mask

    n, m = nm
    g = torch.Generator().manual_seed(m * 10 + n)
    scores = torch.randn(37, 16 * m, generator=g).abs().round(decimals=1)  # many ties
    scores[:5] = 0.5  # whole groups tied
    by_top_k = lowest_k_mask(scores.reshape(37, 16, m), n).reshape(scores.shape)
    assert torch.equal(nm_mask(scores, n, m), by_top_k)
    assert (nm_mask(scores, n, m).view(37, 16, m).sum(-1) == n).all()


def test_threshold_search_near_a_guess_gives_the_exact_mask():
    from sdsprune.pruners.patterns import lowest_k_mask, lowest_k_near

    g = torch.Generator().manual_seed(1)
    scores = torch.randn(5000, generator=g).abs().round(decimals=2)  # many ties
    for k in (1, 37, 2500, 4999):
        exact = lowest_k_mask(scores.reshape(1, -1), k).reshape(-1)
        _, threshold = lowest_k_near(scores, k, None)
        for guess in (threshold, threshold * 1.3, threshold * 0.2, 50.0):
            mask, found = lowest_k_near(scores, k, guess)
            assert torch.equal(mask, exact), (k, guess)
            assert found == threshold


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
    out = (
        Wanda()
        .pruner()
        .prune(W, InputStats(count=50, sumsq=X.square().sum(0)), SparsityPattern.parse("2:4"))
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
        "magnitude",
        sparsity="0.5",
        calibration=windows(),
        run=RunOptions(device="cpu", progress=False),
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
