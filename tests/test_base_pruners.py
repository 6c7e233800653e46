"""The paper's further base pruners (ADMM, DSnoT, Pruner-Zero), their options, and every
method at high sparsity."""

import pytest
import torch
from conftest import byte_tokenizer, cpu_run, every_method, tiny_model
from reference_impl import slow_admm, slow_wanda

from sdsprune import SdspruneError
from sdsprune.linalg import relative_error
from sdsprune.methods import ADMM, SDS, DSnoT, PrunerZero, SparseGPT, parse_method
from sdsprune.models import LoadedModel, model_linears
from sdsprune.prune import prune
from sdsprune.pruners import InputStats, SparsityPattern

NEW_PRUNERS = ("admm", "dsnot", "pruner-zero")


def windows(count=8, length=24, seed=0):
    return torch.randint(0, 256, (count, length), generator=torch.Generator().manual_seed(seed))


def run(arch, method, sparsity, calibration=None):
    model = tiny_model(arch)
    result = prune(
        LoadedModel(model, byte_tokenizer(), arch, None),
        method,
        sparsity=sparsity,
        calibration=windows() if calibration is None else calibration,
        run=cpu_run(),
    )
    return model, result


def pruner_of(method: str):
    """The pruner a method string's (SDS: its base's) settings build."""
    config = parse_method(method)
    return (config.base if isinstance(config, SDS) else config).pruner()


def layer_stats(rows=200, cols=32, seed=0):
    """Inputs with uneven feature scales and non-zero means (so DSnoT has work to do)."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(cols, generator=generator) * 3
    shift = 0.3 * torch.randn(cols, generator=generator)
    X = torch.randn(rows, cols, generator=generator) * scale + shift
    stats = InputStats(count=rows, sumsq=X.square().sum(0), gram=X.T @ X / rows, total=X.sum(0))
    return X, stats


def assert_exact_pattern(weight, pattern, group):
    zeros = weight == 0
    if pattern.is_nm:
        per_group = zeros.view(zeros.shape[0], -1, pattern.m).sum(-1)
        assert (per_group == pattern.n).all()
    elif group == "row":
        assert (zeros.sum(1) == int(zeros.shape[1] * pattern.fraction)).all()
    else:
        assert zeros.sum() == int(zeros.numel() * pattern.fraction)


@pytest.mark.parametrize("method", NEW_PRUNERS)
@pytest.mark.parametrize("sparsity", ["0.5", "0.7", "2:4"])
def test_new_pruners_give_the_exact_pattern_on_every_architecture(arch, method, sparsity):
    model, result = run(arch, method, sparsity)
    pattern = SparsityPattern.parse(sparsity)
    group = pruner_of(method).unstructured_group
    for name, layer in model_linears(model).items():
        assert_exact_pattern(layer.weight, pattern, group)
        assert torch.isfinite(layer.weight).all(), name
        assert result.report["layers"][name]["sparsity"] == pytest.approx(
            (layer.weight == 0).float().mean().item()
        )


@pytest.mark.parametrize("base", NEW_PRUNERS)
def test_new_pruners_work_as_the_sds_base(base):
    model, result = run("llama", f"sds:{base}", "0.7")
    group = pruner_of(base).unstructured_group
    for layer in model_linears(model).values():
        assert_exact_pattern(layer.weight, SparsityPattern.parse("0.7"), group)
    assert result.report["config"]["base"] == base


@pytest.mark.parametrize(("spec", "nm"), [("0.6", None), ("2:4", (2, 4)), ("4:8", (4, 8))])
def test_admm_equals_slow_reference_of_the_published_update(spec, nm):
    X, stats = layer_stats()
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    pattern = SparsityPattern.parse(spec)
    fast = ADMM().pruner().prune(W, stats, pattern)
    slow, slow_mask = slow_admm(W, X, pattern.fraction, nm=nm)
    assert torch.equal(fast.mask, slow_mask)
    torch.testing.assert_close(fast.weight, slow, rtol=1e-4, atol=1e-5)


def test_admm_beats_sparsegpt_on_the_layer_objective():
    """What the method is for: a lower layer error than SparseGPT for the same sparsity."""
    _X, stats = layer_stats(cols=64)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    for spec in ("0.5", "0.7", "2:4"):
        pattern = SparsityPattern.parse(spec)
        admm = ADMM().pruner().prune(W, stats, pattern).weight
        sparsegpt = SparseGPT().pruner().prune(W, stats, pattern).weight
        assert relative_error(W, admm, stats.gram) < relative_error(W, sparsegpt, stats.gram)


def test_admm_mask_grows_gradually_not_at_once():
    """One growth iteration is a fixed mask from |W|·‖x‖: 15 iterations find another one
    with a lower error (the point of the gradual schedule)."""
    _X, stats = layer_stats(cols=64)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    pattern = SparsityPattern.parse("0.7")
    at_once = ADMM(growth_iterations=1).pruner().prune(W, stats, pattern)
    gradual = ADMM().pruner().prune(W, stats, pattern)
    assert not torch.equal(at_once.mask, gradual.mask)
    assert relative_error(W, gradual.weight, stats.gram) < relative_error(
        W, at_once.weight, stats.gram
    )


@pytest.mark.parametrize("spec", ["0.5", "2:4"])
def test_dsnot_without_cycles_is_its_initial_mask(spec):
    X, stats = layer_stats()
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    pattern = SparsityPattern.parse(spec)
    nm = (pattern.n, pattern.m) if pattern.is_nm else None
    outcome = DSnoT(max_cycles=0).pruner().prune(W, stats, pattern)
    _, wanda_mask = slow_wanda(W, X, fraction=pattern.fraction, nm=nm)
    assert torch.equal(outcome.mask, wanda_mask)


@pytest.mark.parametrize("spec", ["0.5", "0.7", "2:4"])
def test_dsnot_swaps_cut_the_mean_output_shift_and_keep_the_pattern(spec):
    """DSnoT's objective: the expected output shift Σ_pruned W_ij E[x_j] of every row
    shrinks; weights keep their dense values and counts stay exact."""
    X, stats = layer_stats()
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(5))
    pattern = SparsityPattern.parse(spec)
    before = DSnoT(max_cycles=0).pruner().prune(W, stats, pattern)
    after = DSnoT().pruner().prune(W, stats, pattern)
    mean = X.mean(0)
    shift_before = ((W - before.weight) @ mean).abs()
    shift_after = ((W - after.weight) @ mean).abs()
    assert shift_after.mean() < 0.5 * shift_before.mean()
    assert not torch.equal(before.mask, after.mask)
    assert_exact_pattern(after.weight, pattern, "row")
    kept = ~after.mask
    assert torch.equal(after.weight[kept], W[kept])


def test_dsnot_initial_method_is_an_option():
    _X, stats = layer_stats()
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(6))
    pattern = SparsityPattern.parse("0.5")
    masks = {
        initial: pruner_of(f"dsnot[initial={initial};max_cycles=0]").prune(W, stats, pattern).mask
        for initial in ("wanda", "sparsegpt", "magnitude")
    }
    assert not torch.equal(masks["wanda"], masks["magnitude"])
    assert not torch.equal(masks["wanda"], masks["sparsegpt"])
    assert DSnoT(initial="sparsegpt").pruner().needs == "gram"
    assert DSnoT().pruner().needs == "sumsq"


def test_pruner_zero_metric_is_squared_weight_times_scaled_norm():
    """Its score |W|²·σ(‖X_j‖): equal input norms reduce it to per-row magnitude; the input
    with the smallest norm scores 0, so every row prunes it."""
    _X, stats = layer_stats()
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(7))
    pattern = SparsityPattern.parse("0.5")
    outcome = PrunerZero().pruner().prune(W, stats, pattern)
    assert outcome.mask[:, stats.feature_norms.argmin()].all()
    even = InputStats(count=10, sumsq=torch.ones(32))
    magnitude_rows = W.abs().argsort(dim=1, stable=True)[:, :16]
    expected = torch.zeros_like(W, dtype=torch.bool).scatter_(1, magnitude_rows, True)
    assert torch.equal(PrunerZero().pruner().prune(W, even, pattern).mask, expected)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lasso", "unknown method"),
        ("dsnot[colour=red]", "bad option 'colour=red' for dsnot"),
        ("dsnot[max_cycles=many]", "expected a int"),
        ("dsnot[initial=oracle]", "initial must be one of"),
        ("admm[growth_iterations=30]", "growth_iterations <= iterations"),
    ],
)
def test_bad_pruner_specs_are_refused_with_one_line(spec, message):
    with pytest.raises(SdspruneError, match=message.replace("[", r"\[")):
        parse_method(spec)


def test_pruner_options_reach_the_pruner_through_prune():
    _, result = run("llama", "dsnot[initial=magnitude;max_cycles=3]", "0.5")
    assert result.report["config"]["method"] == "dsnot[initial=magnitude;max_cycles=3]"
    with pytest.raises(SdspruneError, match="bad option"):
        run("llama", "sds:admm[speed=11]", "0.5")


@pytest.mark.parametrize("method", every_method("sparsegpt", "wanda", "admm"))
def test_eighty_percent_runs_end_to_end_with_sane_numerics(method):
    """80% on a tiny model with fewer calibration tokens (32) than input features (128 in
    the MLP): rank-deficient Gram matrices, where dampening, Cholesky retries and the SDS
    solvers must still give finite weights, exact sparsity and errors below 1 (pruning all
    weights would be 1)."""
    calibration = windows(count=2, length=16)
    model, result = run("llama", method, "0.8", calibration=calibration)
    group = pruner_of(method).unstructured_group
    for name, layer in model_linears(model).items():
        assert torch.isfinite(layer.weight).all(), name
        assert_exact_pattern(layer.weight, SparsityPattern.parse("0.8"), group)
        assert result.report["layers"][name]["rel_error"] < 1.0, name
    with torch.no_grad():
        logits = model(input_ids=windows(count=2, length=16, seed=1)).logits
    assert torch.isfinite(logits).all()
