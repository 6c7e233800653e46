import pytest
import torch
from conftest import byte_tokenizer, tiny_model

from sdsprune import SdspruneError
from sdsprune.linalg import output_energy
from sdsprune.models import LoadedModel, model_linears
from sdsprune.prune import prune
from sdsprune.pruners import SparsityPattern
from sdsprune.sds import SDSConfig, adjust, redense
from sdsprune.sds.solver import soft_threshold


def problem(out=6, inp=12, tokens=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(out, inp, generator=g, dtype=torch.float64)
    Xt = torch.randn(tokens, inp, generator=g, dtype=torch.float64)
    Xi = Xt + 0.3 * torch.randn(tokens, inp, generator=g, dtype=torch.float64)
    return A, Xt, Xi


def test_gram_objective_and_gradient_equal_token_space():
    A, Xt, Xi = problem()
    W = torch.randn_like(A, requires_grad=True)
    n = Xt.shape[0]
    token_loss = (Xt @ A.T - Xi @ W.T).square().sum() / n
    token_loss.backward()
    g_ii, g_ti, g_tt = Xi.T @ Xi / n, Xt.T @ Xi / n, Xt.T @ Xt / n
    Wd = W.detach()
    gram_loss = (
        torch.trace(A @ g_tt @ A.T)
        - 2 * torch.trace(A @ g_ti @ Wd.T)
        + torch.trace(Wd @ g_ii @ Wd.T)
    )
    gram_grad = 2 * (Wd @ g_ii - A @ g_ti)
    torch.testing.assert_close(gram_loss, token_loss.detach())
    torch.testing.assert_close(gram_grad, W.grad)
    # the sd case is the plain reconstruction error used everywhere
    assert output_energy(A - Wd, g_ii) == pytest.approx(float((Xi @ (A - Wd).T).square().sum() / n))


def test_fista_reaches_the_closed_form_optimum_without_l1():
    A, Xt, Xi = problem()
    n = Xt.shape[0]
    g_ii, g_ti = Xi.T @ Xi / n, Xt.T @ Xi / n
    start = A.masked_fill(torch.rand_like(A) < 0.5, 0)
    closed = redense(A, start, g_ii, g_ti, SDSConfig(solver="closed", mu=0.5, lambda2=0.2))
    fista = redense(
        A, start, g_ii, g_ti, SDSConfig(solver="fista", mu=0.5, lambda2=0.2, redense_iters=3000)
    )
    torch.testing.assert_close(fista, closed, rtol=1e-6, atol=1e-7)
    # and the closed form zeroes the gradient of the regularised objective
    c = float(torch.diagonal(g_ii).mean())
    grad = 2 * (closed @ g_ii - A @ g_ti) + 2 * 0.2 * c * closed + 2 * 0.5 * c * (closed - start)
    assert grad.abs().max() < 1e-9


def test_fista_with_l1_satisfies_the_optimality_conditions():
    A, Xt, Xi = problem(seed=3)
    n = Xt.shape[0]
    g = Xi.T @ Xi / n
    config = SDSConfig(solver="fista", lambda1=0.5, mu=0.0, redense_iters=5000)
    W = redense(A, torch.zeros_like(A), g, g, config)
    c, sigma = float(torch.diagonal(g).mean()), float(A.square().mean().sqrt())
    l1 = 0.5 * c * sigma
    smooth = 2 * (W @ g - A @ g)
    nonzero = W != 0
    assert nonzero.any() and (~nonzero).any()  # L1 makes some exact zeros
    torch.testing.assert_close(smooth[nonzero], -l1 * W[nonzero].sign(), rtol=1e-5, atol=1e-6)
    assert (smooth[~nonzero].abs() <= l1 + 1e-6).all()


def test_soft_threshold():
    values = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5])
    assert torch.equal(soft_threshold(values, 1.0), torch.tensor([-1.0, 0.0, 0.0, 0.0, 0.5]))


@pytest.mark.parametrize("spec, group", [("2:4", "row"), ("0.5", "row"), ("0.5", "layer")])
def test_adjustment_keeps_pattern_and_never_increases_error(spec, group):
    A, _, Xi = problem(out=8, inp=16, tokens=64)
    g = Xi.T @ Xi / Xi.shape[0]
    pattern = SparsityPattern.parse(spec)
    start = A.masked_fill(torch.rand_like(A) < 0.5, 0)
    start = start.masked_fill(start.abs() < 0.3, 0) if not pattern.is_nm else A.clone()
    from sdsprune.pruners.patterns import pattern_mask

    start = start.masked_fill(pattern_mask(start.abs(), pattern, group), 0)
    adjusted = adjust(start, A, g, pattern, group, SDSConfig(adjust_iters=60))
    assert output_energy(A - adjusted, g) <= output_energy(A - start, g) + 1e-12
    assert (
        torch.equal(pattern_mask(adjusted.abs(), pattern, group), adjusted == 0)
        or (adjusted == 0).sum() >= (start == 0).sum()
    )


def run_sds(arch="llama", sparsity="2:4", **config):
    model = tiny_model(arch)
    loaded = LoadedModel(model, byte_tokenizer(), arch, None)
    calib = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(0))
    result = prune(
        loaded,
        method="sds",
        base=config.pop("base", "sparsegpt"),
        sparsity=sparsity,
        calibration=calib,
        device="cpu",
        progress=False,
        sds=SDSConfig(**config),
    )
    return model, result


@pytest.mark.parametrize("schedule", ["fused", "staged"])
@pytest.mark.parametrize("base", ["sparsegpt", "wanda", "magnitude"])
def test_sds_final_model_has_exact_pattern(schedule, base):
    model, result = run_sds(schedule=schedule, base=base)
    for name, layer in model_linears(model).items():
        zeros = (layer.weight == 0).view(layer.weight.shape[0], -1, 4).sum(-1)
        assert (zeros == 2).all(), name
        record = result.report["layers"][name]
        assert record["rel_error_final"] <= record["rel_error_second_prune"] + 1e-9
    assert set(result.report["sds"]["stage_mean_rel_error"]) == {
        "first_prune",
        "redense",
        "second_prune",
        "final",
    }


@pytest.mark.parametrize("mode", ["sd", "dd", "kd"])
def test_data_modes_and_unstructured(mode):
    model, _result = run_sds(arch="gemma3_text", sparsity="0.5", data_mode=mode, base="wanda")
    for name, layer in model_linears(model).items():
        assert ((layer.weight == 0).sum(1) == layer.weight.shape[1] // 2).all(), name


def test_redense_in_sd_mode_lowers_error_and_adjust_rule():
    _, result = run_sds()
    stages = result.report["sds"]["stage_mean_rel_error"]
    assert stages["redense"] < stages["first_prune"]
    assert result.report["sds"]["adjusted"] is True
    _, skipped = run_sds(adjust="never")
    assert skipped.report["sds"]["adjusted"] is False
    assert SDSConfig().adjusts(7_000_000_000) is False and SDSConfig(adjust="always").adjusts(
        7_000_000_000
    )


def test_sds_weight_figure(tmp_path):
    model = tiny_model("llama")
    loaded = LoadedModel(model, byte_tokenizer(), "llama", None)
    calib = torch.randint(0, 256, (4, 16))
    result = prune(
        loaded,
        method="sds",
        sparsity="2:4",
        calibration=calib,
        device="cpu",
        progress=False,
        out=tmp_path / "out",
    )
    assert (tmp_path / "out" / "weight_distribution.png").stat().st_size > 10_000
    assert result.report["figures"] == ["weight_distribution.png"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"solver": "closed", "lambda1": 0.1}, "no L1 term"),
        ({"data_mode": "xx"}, "unknown data mode"),
        ({"rounds": 0}, "positive"),
    ],
)
def test_bad_sds_config(kwargs, message):
    with pytest.raises(SdspruneError, match=message):
        SDSConfig(**kwargs)


def test_power_iteration_bounds_the_largest_eigenvalue():
    from sdsprune.linalg import largest_eigenvalue

    g = torch.Generator().manual_seed(5)
    X = torch.randn(500, 40, generator=g, dtype=torch.float64) + 3.0  # one dominant direction
    gram = X.T @ X / 500
    exact = float(torch.linalg.eigvalsh(gram)[-1])
    estimate = largest_eigenvalue(gram)
    assert exact <= estimate <= 1.05 * exact


def test_config_from_text_parses_each_field_type():
    config = SDSConfig.from_text(
        "schedule=staged, mu=0.5,residual-start=false,rounds=2,figure_layer=none"
    )
    assert (config.schedule, config.mu, config.residual_start, config.rounds) == (
        "staged",
        0.5,
        False,
        2,
    )
    assert config.figure_layer is None
    assert SDSConfig.from_text("") == SDSConfig()


@pytest.mark.parametrize(
    "text, message",
    [
        ("mu", "bad SDS setting 'mu'"),
        ("temperature=1", "bad SDS setting"),
        ("mu=high", "mu=high: expected a float"),
        ("residual_start=maybe", "expected a bool"),
        ("schedule=weekly", "unknown schedule"),
    ],
)
def test_config_from_text_rejects_bad_settings(text, message):
    with pytest.raises(SdspruneError, match=message):
        SDSConfig.from_text(text)
