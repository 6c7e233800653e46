import pytest
import torch
from conftest import byte_tokenizer, cpu_run, tiny_model

from sdsprune import SdspruneError
from sdsprune.linalg import largest_eigenvalue, output_energy
from sdsprune.methods import SDS, parse_method, parse_settings
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


@pytest.mark.parametrize("solver", ["accelerated", "gd"])
@pytest.mark.parametrize("spec, group", [("2:4", "row"), ("0.5", "row"), ("0.5", "layer")])
def test_adjustment_keeps_the_exact_pattern_and_lowers_the_error(spec, group, solver):
    from sdsprune.pruners.patterns import pattern_mask

    A, _, Xi = problem(out=8, inp=16, tokens=64)
    g = Xi.T @ Xi / Xi.shape[0]
    pattern = SparsityPattern.parse(spec)
    start = A.masked_fill(pattern_mask(A.abs(), pattern, group), 0)  # magnitude pruning
    config = SDSConfig(adjust_iters=60, adjust_solver=solver)
    adjusted = adjust(start, A, g, pattern, group, config)
    assert output_energy(A - adjusted, g) < 0.9 * output_energy(A - start, g)
    zeros = adjusted == 0
    if pattern.is_nm:
        assert (zeros.view(8, -1, 4).sum(-1) == 2).all()
    elif group == "row":
        assert (zeros.sum(1) == 8).all()
    else:
        assert zeros.sum() == 64


def test_closed_form_with_mu_zero_is_the_exact_fit_and_survives_a_dead_feature():
    A, _, Xi = problem(out=6, inp=12, tokens=40)
    g = Xi.T @ Xi / Xi.shape[0]
    start = A.masked_fill(torch.rand_like(A) < 0.5, 0)
    exact = redense(A, start, g, g, SDSConfig(mu=0.0))
    torch.testing.assert_close(exact, A)  # sd, no proximity: the dense weights themselves
    Xi[:, 3] = 0  # a dead input feature: G + (mu + lambda2) I is singular
    g = Xi.T @ Xi / Xi.shape[0]
    fitted = redense(A, start, g, g, SDSConfig(mu=0.0))  # dampened and retried, no crash
    assert torch.isfinite(fitted).all() and (fitted[:, 3] == 0).all()
    error = output_energy(A - fitted, g) / output_energy(A, g)
    assert error < 1e-3 < output_energy(A - start, g) / output_energy(A, g)


def test_gd_is_the_papers_plain_recipe_without_a_proximity_term():
    A, _, Xi = problem()
    g = Xi.T @ Xi / Xi.shape[0]
    start = A.masked_fill(torch.rand_like(A) < 0.5, 0)
    runs = [
        redense(A, start, g, g, SDSConfig(solver="gd", mu=mu, redense_iters=200))
        for mu in (0.0, 1.0, 5.0)
    ]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])  # mu is ignored
    # plain steps of lr / λmax(G) from the start: reproduce them by hand
    weight, step = start.clone(), 0.1 / largest_eigenvalue(g)
    for _ in range(200):
        weight -= step * 2 * (weight @ g - A @ g)
    torch.testing.assert_close(runs[0], weight)
    assert output_energy(A - runs[0], g) < output_energy(A - start, g)


def assert_two_of_four(model) -> None:
    for name, layer in model_linears(model).items():
        zeros = (layer.weight == 0).view(layer.weight.shape[0], -1, 4).sum(-1)
        assert (zeros == 2).all(), name


def run_sds(arch="llama", sparsity="2:4", dtype="float32", windows=8, **config):
    model = tiny_model(arch).to(getattr(torch, dtype))
    loaded = LoadedModel(model, byte_tokenizer(), arch, None)
    calib = torch.randint(0, 256, (windows, 24), generator=torch.Generator().manual_seed(0))
    base = parse_method(config.pop("base", "sparsegpt"))
    result = prune(
        loaded,
        SDS(base=base, **config),
        sparsity=sparsity,
        calibration=calib,
        run=cpu_run(dtype=dtype),
    )
    return model, result


@pytest.mark.parametrize("schedule", ["fused", "staged"])
@pytest.mark.parametrize("base", ["sparsegpt", "wanda", "magnitude"])
def test_sds_final_model_has_exact_pattern(schedule, base):
    """The fused default re-fits each block after the layer-wise adjustment (its layer-wise
    errors may then rise: it fits the block's output, not each layer's)."""
    model, result = run_sds(schedule=schedule, base=base)
    assert_two_of_four(model)
    adjusted = "adjusted" if schedule == "fused" else "final"
    for name in model_linears(model):
        record = result.report["layers"][name]
        assert record[f"rel_error_{adjusted}"] <= record["rel_error_second_prune"] + 1e-9
    stages = {"first_prune", "redense", "second_prune", adjusted, "final"}
    assert set(result.report["sds"]["stage_mean_rel_error"]) == stages


@pytest.mark.parametrize("mode", ["sd", "dd", "kd"])
def test_data_modes_and_unstructured(mode):
    model, _result = run_sds(arch="gemma3_text", sparsity="0.5", data_mode=mode, base="wanda")
    for name, layer in model_linears(model).items():
        assert ((layer.weight == 0).sum(1) == layer.weight.shape[1] // 2).all(), name


def layer_inputs(model, windows, name):
    """What layer ``name`` receives when ``model`` runs on ``windows`` (tokens x in)."""
    seen = []
    layer = model_linears(model)[name]
    handle = layer.register_forward_hook(lambda _m, args, _o: seen.append(args[0]) and None)
    with torch.no_grad():
        model(windows)
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).double()


@pytest.mark.parametrize("mode", ["sd", "dd", "kd"])
def test_data_modes_feed_the_right_grams_to_the_redense(mode, monkeypatch):
    """Block 1's q_proj: its input is the normalised hidden state, unchanged by block 1's own
    pruning, so the grams re-dense receives must be, exactly, those of the final model's
    inputs (X_s) and the dense model's (X_d): sd (X_sᵀX_s, X_sᵀX_s), dd (X_dᵀX_d, X_dᵀX_d),
    kd (X_sᵀX_s, X_dᵀX_s). A transposed cross-Gram, or kd falling back to sd, fails here."""
    from sdsprune.sds import pipeline

    received = {}
    original = pipeline.redense

    def spy(dense, start, gram_in, gram_cross, config, *args, **kwargs):
        received.setdefault(len(received), (gram_in.clone(), gram_cross.clone()))
        return original(dense, start, gram_in, gram_cross, config, *args, **kwargs)

    monkeypatch.setattr(pipeline, "redense", spy)
    model, _ = run_sds(data_mode=mode)
    calib = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(0))
    name = "1.self_attn.q_proj"
    order = list(model_linears(model)).index(name)
    gram_in, gram_cross = received[order]
    x_s = layer_inputs(model, calib, name)
    x_d = layer_inputs(tiny_model("llama"), calib, name)
    n = x_s.shape[0]
    sparse, dense, cross = x_s.T @ x_s / n, x_d.T @ x_d / n, x_d.T @ x_s / n
    expected = {"sd": (sparse, sparse), "dd": (dense, dense), "kd": (sparse, cross)}[mode]
    assert (cross - cross.T).abs().max() > 1e-3  # orientation matters on this data
    for got, want in zip((gram_in, gram_cross), expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-5)


def test_residual_start_off_redenses_from_the_dense_weights():
    """From the dense start, the sd closed form's optimum is the dense layer itself: re-dense
    error 0. From the pruned start (the default) the proximity term keeps it away."""
    _, from_dense = run_sds(residual_start=False)
    _, from_pruned = run_sds()
    for name, record in from_dense.report["layers"].items():
        assert record["rel_error_redense"] < 1e-9, name
        assert from_pruned.report["layers"][name]["rel_error_redense"] > 1e-4, name


def test_more_rounds_redense_and_prune_again(monkeypatch):
    from sdsprune.sds import pipeline

    calls = []
    original = pipeline.redense
    monkeypatch.setattr(pipeline, "redense", lambda *a, **k: calls.append(1) or original(*a, **k))
    model, one = run_sds()
    layers = len(model_linears(model))
    assert len(calls) == layers
    calls.clear()
    model, three = run_sds(rounds=3)
    assert len(calls) == 3 * layers
    assert_two_of_four(model)
    assert one.report["layers"] != three.report["layers"]


def test_sds_factorises_each_shared_input_once_per_block(monkeypatch):
    """q/k/v and gate/up share one Gram: its closed-form factor and λmax are computed once
    per distinct input (4 a block), and the dense output energy once per layer."""
    from sdsprune.sds import pipeline, solver

    counts = {"factor": 0, "lambda": 0, "energy": 0}

    def counting(module, name, key):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting(solver, "_closed_factor", "factor")
    counting(solver, "largest_eigenvalue", "lambda")
    counting(pipeline, "output_energy", "energy")
    model, _ = run_sds()
    layers = len(model_linears(model))
    assert counts["factor"] == counts["lambda"] == 2 * 4
    stages = 5  # first prune, re-dense, second prune, adjusted, after the block re-fit
    assert counts["energy"] == layers * (1 + stages)  # the dense energy, then one per stage


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
        loaded, SDS(), sparsity="2:4", calibration=calib, run=cpu_run(out=tmp_path / "out")
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


def test_settings_text_parses_each_field_type():
    config = SDS(
        **parse_settings(
            SDS, "schedule=staged, mu=0.5,residual-start=false,rounds=2,figure_layer=none"
        )
    )
    assert (config.schedule, config.mu, config.residual_start, config.rounds) == (
        "staged",
        0.5,
        False,
        2,
    )
    assert config.figure_layer is None
    assert SDS(**parse_settings(SDS, "")) == SDS()


@pytest.mark.parametrize(
    "text, message",
    [
        ("mu", "bad option 'mu' for sds"),
        ("temperature=1", "bad option 'temperature=1' for sds"),
        ("mu=high", "mu=high: expected a float"),
        ("residual_start=maybe", "expected a bool"),
        ("schedule=weekly", "unknown schedule"),
        ("block_epochs=2,block_redense=2", "below --block-epochs"),
        ("block_redense=-1", "below --block-epochs"),
        ("block_redense_lr=0", "learning rates must be > 0"),
    ],
)
def test_settings_text_rejects_bad_settings(text, message):
    with pytest.raises(SdspruneError, match=message):
        SDS(**parse_settings(SDS, text))


@pytest.mark.parametrize("arch, windows", [("llama", 0), ("opt", 5), ("gemma3_text", 0)])
def test_block_refit_lowers_block_error_and_keeps_the_pattern(arch, windows):
    model, result = run_sds(arch=arch, block_epochs=2, block_batch=3, block_windows=windows)
    assert_two_of_four(model)
    blocks = {
        name.split(".")[0]: rec
        for name, rec in result.report["layers"].items()
        if "block_error_start" in rec
    }
    assert len(blocks) == 2
    for record in blocks.values():
        assert record["block_error_final"] < record["block_error_start"]
        assert record["block_kept_epoch"] > 0
    means = result.report["sds"]
    assert means["mean_block_error_final"] < means["mean_block_error_start"]


def test_block_refit_never_ends_worse_than_its_start():
    """A step size that only diverges: every block keeps its layer-wise weights."""
    plain, _ = run_sds(block_epochs=0)
    refit, result = run_sds(block_epochs=2, block_lr=1e4)
    for name, layer in model_linears(refit).items():
        assert torch.equal(layer.weight, model_linears(plain)[name].weight), name
    for record in result.report["layers"].values():
        assert record["block_kept_epoch"] == 0
        assert record["block_error_final"] == record["block_error_start"]


@pytest.mark.parametrize(
    "sparsity, dtype", [("2:4", "float32"), ("2:4", "bfloat16"), ("0.5", "float32")]
)
def test_block_redense_moves_masks_keeps_the_exact_pattern_and_never_ends_worse(sparsity, dtype):
    """SDS at block level: the masks move, the pattern stays exact, the error falls below
    the start's; and with step sizes that only diverge the start comes back unchanged."""
    model, result = run_sds(
        sparsity=sparsity, dtype=dtype, block_epochs=2, block_redense=1, block_batch=2
    )
    linears = model_linears(model)
    if sparsity == "2:4":
        assert_two_of_four(model)
    else:
        assert sum(int((layer.weight == 0).sum()) for layer in linears.values()) == sum(
            layer.weight.numel() // 2 for layer in linears.values()
        )
    records = [r for r in result.report["layers"].values() if "block_masks_changed" in r]
    assert len(records) == len(linears)
    assert all(r["block_error_final"] <= r["block_error_start"] for r in records)
    kept = [r for r in records if r["block_kept_epoch"] > 0]
    assert kept and all(r["block_kept_epoch"] == 2 for r in kept)
    assert all(0 < r["block_masks_changed"] < 1 for r in records)
    assert 0 < result.report["sds"]["mean_block_masks_changed"] < 1
    plain, _ = run_sds(sparsity=sparsity, dtype=dtype, block_epochs=0)
    diverged, result = run_sds(
        sparsity=sparsity,
        dtype=dtype,
        block_epochs=2,
        block_redense=1,
        block_lr=30,
        block_redense_lr=30,
    )
    for name, layer in model_linears(diverged).items():
        assert torch.equal(layer.weight, model_linears(plain)[name].weight), name
    assert all(r["block_kept_epoch"] == 0 for r in result.report["layers"].values())


def test_block_refit_in_bfloat16_trains_in_float32_and_keeps_the_dtype():
    model, result = run_sds(dtype="bfloat16", windows=6, block_epochs=1, block_batch=2)
    for layer in model_linears(model).values():
        assert layer.weight.dtype == torch.bfloat16 and layer.weight.grad is None
    assert_two_of_four(model)
    sds = result.report["sds"]
    assert sds["mean_block_error_final"] <= sds["mean_block_error_start"]


def test_block_refit_runs_the_dense_model_without_its_statistics(monkeypatch):
    """Only kd/dd read the dense inputs' Grams; the re-fit needs just the dense outputs."""
    from sdsprune.sds.pipeline import FusedSDS

    seen = []
    process = FusedSDS.process  # the solve stage: the only one that reads statistics

    def spy(self, ctx):
        seen.append((ctx.dense_stats, ctx.dense_targets))
        process(self, ctx)

    monkeypatch.setattr(FusedSDS, "process", spy)
    run_sds(block_epochs=1)
    assert seen and all(stats is None and targets is not None for stats, targets in seen)
    seen.clear()
    run_sds(block_epochs=1, adjust_data="kd")
    assert seen and all(stats is not None for stats, _ in seen)


def test_block_refit_needs_the_fused_schedule():
    with pytest.raises(SdspruneError, match="fused schedule"):
        SDSConfig(block_epochs=1, schedule="staged")
    with pytest.raises(SdspruneError, match="fused schedule"):
        SDSConfig(adjust_data="kd", schedule="staged")


def test_group_search_finds_the_optimal_two_of_four_pattern_of_a_group():
    """Correlated inputs: keeping the two largest |w| is wrong; brute force over the six
    patterns (each with its least-squares survivors) says what is right."""
    import itertools

    from sdsprune.sds.groups import refine_groups

    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 4, generator=g, dtype=torch.float64)
    X[:, 1] = X[:, 0] + 0.1 * X[:, 1]  # inputs 0 and 1 nearly equal
    G = X.T @ X / 50
    dense = torch.randn(3, 4, generator=g, dtype=torch.float64)
    start = dense.masked_fill(torch.tensor([False, False, True, True]), 0)
    found = refine_groups(start, dense, G, SparsityPattern.parse("2:4"))
    for row in range(3):
        errors = {}
        for keep in itertools.combinations(range(4), 2):
            kept = list(keep)
            values = torch.zeros(4, dtype=torch.float64)
            values[kept] = torch.linalg.solve(G[kept][:, kept], (G @ dense[row])[kept])
            errors[keep] = (output_energy((dense[row] - values)[None], G), values)
        best = min(errors.values(), key=lambda item: item[0])[1]
        torch.testing.assert_close(found[row], best)


def test_group_search_never_increases_the_error_and_keeps_n_of_m():
    from sdsprune.pruners.patterns import pattern_mask
    from sdsprune.sds.groups import refine_groups

    A, _, Xi = problem(out=8, inp=16, tokens=64, seed=4)
    g = Xi.T @ Xi / Xi.shape[0]
    pattern = SparsityPattern.parse("2:4")
    start = A.masked_fill(pattern_mask(A.abs(), pattern, "row"), 0)
    adjusted = adjust(start, A, g, pattern, "row", SDSConfig(adjust_iters=60))
    errors = [output_energy(A - adjusted, g)]
    for sweeps in (1, 2):
        refined = refine_groups(adjusted, A, g, pattern, sweeps)
        assert ((refined == 0).view(8, -1, 4).sum(-1) >= 2).all()
        errors.append(output_energy(A - refined, g))
    assert errors[2] <= errors[1] <= errors[0] + 1e-12
    assert errors[1] < errors[0]  # the magnitude projection left something to gain


def test_kd_adjustment_fits_dense_inputs_targets():
    """With T = A G_ti the adjustment minimises ‖A X_t − W X_i‖², not ‖A X_i − W X_i‖²."""
    from sdsprune.sds.solver import fit_objective

    A, Xt, Xi = problem(out=6, inp=16, tokens=80, seed=2)
    n = Xt.shape[0]
    g_ii, g_ti = Xi.T @ Xi / n, Xt.T @ Xi / n
    pattern = SparsityPattern.parse("2:4")
    config = SDSConfig(adjust_iters=200)
    start = A.masked_fill(torch.tensor([True, True, False, False]).repeat(4), 0)

    def token_error(weight):
        return float((Xt @ A.T - Xi @ weight.T).square().sum() / n)

    plain = adjust(start, A, g_ii, pattern, "row", config)
    cross = adjust(start, A, g_ii, pattern, "row", config, target=A @ g_ti)
    assert token_error(cross) < token_error(plain)
    shift = token_error(cross) - fit_objective(cross, g_ii, A @ g_ti)
    assert token_error(plain) - fit_objective(plain, g_ii, A @ g_ti) == pytest.approx(shift)
