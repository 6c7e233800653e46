"""Big-model readiness: the memory plan, activation offloading, in-place activation
buffers, staged dense copies, and layers shared across ranks by fused SDS."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os

import pytest
import torch
from conftest import benchmark_module, byte_tokenizer, cpu_run, tiny_model

from sdsprune import SdspruneError
from sdsprune.engine import capture_block_inputs, run_blocks
from sdsprune.engine import memory_plan as mp
from sdsprune.engine.distributed import Distributed
from sdsprune.engine.stats import StatsCollector
from sdsprune.methods import SDS, SparseGPT
from sdsprune.models import LoadedModel, model_linears
from sdsprune.options import Calibration
from sdsprune.prune import PruneProcessor, prune
from sdsprune.pruners import SparsityPattern
from sdsprune.pruners.sparsegpt import inverse_hessian_cholesky
from sdsprune.runinfo import Timer, resident_bytes
from sdsprune.sds.solver import _closed_factor

GIB = 2**30
CPU = torch.device("cpu")
LLAMA3_SHAPES = benchmark_module("llama3_shapes")


def windows(count=8, length=24):
    return torch.randint(0, 256, (count, length), generator=torch.Generator().manual_seed(0))


def pruned(method, model=None, sparsity="0.5", **run_options):
    model = model if model is not None else tiny_model("llama")
    loaded = LoadedModel(model, byte_tokenizer(), "tiny", None)
    run = cpu_run(**run_options)
    result = prune(loaded, method, sparsity=sparsity, calibration=windows(), run=run)
    return {n: la.weight.detach().clone() for n, la in model_linears(model).items()}, result


def sds_terms(**terms) -> mp.MethodTerms:
    """SDS's plan terms (SparseGPT base, closed-form re-dense) without adjustment steps or a
    block re-fit, unless ``terms`` set them."""
    plain = SDS(adjust_iters=0, block_epochs=0, block_windows=0).plan_terms()
    return dataclasses.replace(plain, **terms)


def llama_8b_shaped():
    """Llama-3-8B's shapes on the meta device: no memory, exact dimensions."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = LLAMA3_SHAPES.llama_3_8b_config(num_hidden_layers=32, vocab_size=128256)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def test_plan_of_an_8b_model_counts_activations_and_grams_exactly(monkeypatch):
    monkeypatch.setattr(mp, "_free_memory", lambda compute: (None, None))
    request = mp.PlanRequest(windows=128, seqlen=2048, batch=4, terms=SparseGPT().plan_terms())
    plan = mp.plan_run(llama_8b_shaped(), request, torch.device("cpu"), measure=False)
    items = {what.split(" (")[0]: size for what, size, _ in plan.items}
    assert items["activations"] == 128 * 2048 * 4096 * 2  # one bf16 stream: 2 GiB
    assert items["statistics"] == (3 * 4096**2 + 14336**2) * 4  # qkv, o, gate/up, down
    kd = mp.PlanRequest(
        windows=128,
        seqlen=2048,
        batch=4,
        terms=sds_terms(dense_stream=True, dense_statistics=True),
    )
    plan_kd = mp.plan_run(llama_8b_shaped(), kd, torch.device("cpu"), measure=False)
    kd_items = {what.split(" (")[0]: size for what, size, _ in plan_kd.items}
    assert kd_items["activations"] == 2 * items["activations"]  # the dense stream too
    assert kd_items["statistics"] == 3 * items["statistics"]  # + dense Grams + cross-Grams
    assert plan_kd.flops > plan.flops > 0


def gpu_plan(monkeypatch, free_gib: float, offload: str):
    monkeypatch.setattr(mp, "_free_memory", lambda compute: (int(free_gib * GIB), 512 * GIB))
    request = mp.PlanRequest(
        windows=128, seqlen=2048, batch=4, terms=SparseGPT().plan_terms(), offload=offload
    )
    return request, mp.plan_run(llama_8b_shaped(), request, torch.device("cuda"), measure=False)


def test_plan_offloads_activations_when_the_gpu_would_not_hold_them(monkeypatch):
    _, roomy = gpu_plan(monkeypatch, 80, "auto")
    assert not roomy.offload
    request, tight = gpu_plan(monkeypatch, 11, "auto")  # 11.2 GiB with, 9.2 without
    assert tight.offload
    assert tight.host_extra == 128 * 2048 * 4096 * 2
    mp.check_plan(tight, request)  # fits once offloaded
    assert "offloaded to CPU: yes" in tight.describe()


def test_plan_refuses_with_the_flag_that_would_make_it_fit(monkeypatch):
    request, plan = gpu_plan(monkeypatch, 11, "off")
    with pytest.raises(SdspruneError, match="--offload-activations on"):
        mp.check_plan(plan, request)
    request, plan = gpu_plan(monkeypatch, 1, "auto")  # not even the solver fits
    with pytest.raises(SdspruneError, match="--nsamples, --seqlen"):
        mp.check_plan(plan, request)


def test_refusal_inside_the_headroom_names_the_usable_memory(monkeypatch):
    """A run needing 95% of the free memory is refused for the 10% headroom: the message
    must say what may be used, not print a need below the free amount as if that failed."""
    request, plan = gpu_plan(monkeypatch, 11, "off")
    free = int(plan.device_peak / 0.95)
    plan = dataclasses.replace(plan, device_free=free)
    usable = f"{mp.HEADROOM * free / GIB:.2f} GiB"
    with pytest.raises(SdspruneError, match=f"may use only {usable} \\(90% of the"):
        mp.check_plan(plan, request)


def test_plan_lowers_the_forward_batch_before_refusing(monkeypatch):
    """An 8B-shaped SDS kd block at 4 windows of 2048 tokens needs more than a 24 GiB machine
    offers; at fewer windows a batch it fits, so the run goes on at that batch."""
    monkeypatch.setattr(mp, "_free_memory", lambda compute: (None, None))
    request = mp.PlanRequest(
        windows=8, seqlen=2048, batch=4, terms=sds_terms(dense_stream=True, dense_statistics=True)
    )
    net = llama_8b_shaped()
    peaks = {
        b: mp.plan_run(net, dataclasses.replace(request, batch=b), CPU, False).device_peak
        for b in (1, 2, 4)
    }
    assert peaks[1] < peaks[2] < peaks[4]
    available = int((peaks[2] + peaks[4]) / 2 / mp.HEADROOM)
    monkeypatch.setattr(mp, "_free_memory", lambda compute: (available, available))
    plan, fitted = mp.fit_plan(net, request, CPU)
    assert (plan.batch, fitted.batch, plan.lowered_from) == (2, 2, 4)
    mp.check_plan(plan, fitted)
    assert "forward batch: 2 window(s) (lowered from 4 to fit)" in plan.describe()
    short = int(peaks[1] / mp.HEADROOM) - 2**20  # not even one window: refused as before
    monkeypatch.setattr(mp, "_free_memory", lambda compute: (short, short))
    plan, fitted = mp.fit_plan(net, request, CPU)
    with pytest.raises(SdspruneError, match="lower --nsamples or --seqlen"):
        mp.check_plan(plan, fitted)


def test_prune_at_a_lowered_batch_captures_in_that_batch_and_matches(monkeypatch):
    prune_module = importlib.import_module("sdsprune.prune")  # the package exports prune()
    reference, _ = pruned(method="sparsegpt")
    request = mp.PlanRequest(windows=8, seqlen=24, batch=8, terms=SparseGPT().plan_terms())
    peaks = {
        b: mp.plan_run(tiny_model("llama"), dataclasses.replace(request, batch=b), CPU, False)
        for b in (4, 8)
    }
    available = int((peaks[4].device_peak + peaks[8].device_peak) / 2 / mp.HEADROOM)
    monkeypatch.setattr(mp, "_meminfo_available", lambda: available)
    batches = []
    capture = prune_module.capture_block_inputs

    def spy(*args, **kwargs):
        stream = capture(*args, **kwargs)
        batches.append(stream.batch_size)
        return stream

    monkeypatch.setattr(prune_module, "capture_block_inputs", spy)
    weights, result = pruned(method="sparsegpt")
    assert (result.report["plan"]["batch"], result.report["plan"]["lowered_from"]) == (4, 8)
    assert batches == [4]
    for name, weight in reference.items():  # the batch changes only the summation order
        assert torch.equal(weight == 0, weights[name] == 0), name
        torch.testing.assert_close(weights[name], weight, rtol=1e-4, atol=1e-5)


def test_prune_refuses_before_any_work_when_memory_is_short(monkeypatch):
    from sdsprune.engine import capture

    monkeypatch.setattr(mp, "_meminfo_available", lambda: 2**20)
    monkeypatch.setattr(capture, "capture_block_inputs", None)  # must not be reached
    with pytest.raises(SdspruneError, match="lower --nsamples or --seqlen"):
        pruned(method="sparsegpt")


def test_plan_is_in_the_report():
    _, result = pruned(method="wanda")
    plan = result.report["plan"]
    assert plan["offload"] is False and plan["device_peak"] > 0 and plan["flops"] > 0


@pytest.mark.parametrize("data_mode", ["sd", "kd"])
def test_offloaded_activations_give_identical_results(data_mode):
    """The offload path (activations in CPU memory, each batch moved to the compute device)
    changes where tensors live, never a value."""
    sds = SDS(data_mode=data_mode, adjust_iters=5)
    kept, _ = pruned(sds, offload_activations="off")
    offloaded, result = pruned(sds, offload_activations="on")
    assert result.report["plan"]["offload"] is True
    for name in kept:
        assert torch.equal(kept[name], offloaded[name]), name


def test_passes_reuse_one_activation_buffer_and_it_holds_the_right_outputs():
    """Outputs overwrite their inputs batch by batch: no second buffer, no thrown-away
    stats-pass outputs; after block 0 the stream is the pruned model's block-0 output."""
    model = tiny_model("llama")
    stream = capture_block_inputs(model, windows(), torch.device("cpu"), 4)
    pointer = stream.hidden.data_ptr()
    after_block0 = {}

    def snapshot(index, stream, _dense, _records):
        after_block0.setdefault(index, stream.hidden.clone())

    processor = PruneProcessor(SparseGPT().pruner(), SparsityPattern.parse("0.5"))
    run_blocks(
        model, stream, processor, torch.device("cpu"), progress=False, on_block_done=snapshot
    )
    assert stream.hidden.data_ptr() == pointer
    with torch.no_grad():
        hidden = model(windows(), output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(after_block0[0], hidden, rtol=1e-5, atol=1e-5)


def test_staged_keeps_dense_copies_in_the_model_dtype_and_converts_once_per_block(monkeypatch):
    from sdsprune.engine import sequential

    seen = []
    original = sequential.swapped_weights

    def checking(linears, weights):
        if weights:
            seen.append(all(weights[n].dtype == la.weight.dtype for n, la in linears.items()))
        return original(linears, weights)

    monkeypatch.setattr(sequential, "swapped_weights", checking)
    model = tiny_model("llama").to(torch.bfloat16)
    _, result = pruned(SDS(schedule="staged", data_mode="kd", adjust_iters=5), model)
    linear_bytes = sum(la.weight.numel() * 2 for la in model_linears(model).values())
    assert result.report["sds"]["dense_copies_mib"] == round(linear_bytes / 2**20, 3)
    assert seen and all(seen)


def test_staged_under_low_memory_reads_the_dense_weights_back_from_disk(tiny_model_dir, tmp_path):
    corpus = tmp_path / "calib.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog while pruning. " * 40)
    sds = SDS(schedule="staged", data_mode="kd", adjust_iters=5)
    calibration = Calibration(corpus=str(corpus), nsamples=4, seqlen=32)
    memory = prune(
        str(tiny_model_dir), sds, calibration=calibration, run=cpu_run(out=tmp_path / "memory")
    )
    low = cpu_run(out=tmp_path / "disk", low_memory=True)
    disk = prune(str(tiny_model_dir), sds, calibration=calibration, run=low)
    assert disk.report["sds"]["dense_copies_mib"] == 0
    assert memory.report["sds"]["dense_copies_mib"] > 0
    from safetensors.torch import load_file

    one = load_file(str(tmp_path / "memory" / "model.safetensors"))
    two = {}
    for path in (tmp_path / "disk").glob("*.safetensors"):
        two.update(load_file(str(path)))
    for name, tensor in one.items():
        assert torch.equal(tensor, two[name]), name


class PretendRank(Distributed):
    """Rank ``rank`` of a group whose other ranks contribute nothing and receive nothing:
    lets one process check which layers this rank solves."""

    def __init__(self, rank: int, world: int):
        super().__init__(rank=rank, world=world, device=torch.device("cpu"))
        self.sources: list[int] = []

    def shard(self, windows):
        return windows

    def all_reduce_(self, tensor):
        return tensor

    def sum_floats(self, values):
        return values

    def broadcast_(self, tensor, src):
        self.sources.append(src)

    def gather_objects(self, value):
        return [value if rank == self.rank else {} for rank in range(self.world)]

    def barrier(self):
        pass


def test_fused_sds_solves_each_layer_on_one_rank_only(monkeypatch):
    import importlib

    from sdsprune.sds.pipeline import FusedSDS

    prune_module = importlib.import_module("sdsprune.prune")  # the package exports the function

    rank = PretendRank(1, 2)

    @contextlib.contextmanager
    def joined(_compute):
        yield rank

    monkeypatch.setattr(prune_module, "distributed_from_env", joined)
    solved = []
    original = FusedSDS._solve_layer
    monkeypatch.setattr(
        FusedSDS,
        "_solve_layer",
        lambda self, ctx, name, dense: (
            solved.append(f"{ctx.index}.{name}") or original(self, ctx, name, dense)
        ),
    )
    # the distillation's steps are shared by every rank: dist_worker.py checks it for real
    _, result = pruned(SDS(adjust_iters=5, block_epochs=0, distill_epochs=0))
    layers = len(model_linears(tiny_model("llama")))
    assert 0 < len(solved) < layers  # this rank's share, not every layer
    assert set(rank.sources) == {0, 1}  # the rest arrives from rank 0
    assert sorted(result.report["layers"]) == sorted(solved)
    assert result.report["figure_layer"] not in solved  # drawn by rank 0


def test_plan_time_counts_the_block_refit_on_its_windows(monkeypatch):
    monkeypatch.setattr(mp, "_free_memory", lambda compute: (None, None))
    net = llama_8b_shaped()

    def flops(**refit) -> float:
        request = mp.PlanRequest(windows=128, seqlen=2048, batch=4, terms=sds_terms(**refit))
        return mp.plan_run(net, request, torch.device("cpu"), measure=False).flops

    without = flops()
    shapes = mp._shapes(net)
    one_pass = mp._forward_flops(shapes, 16 * 2048, 2048)  # a forward over 16 windows
    # 2 epochs of forward + backward (3 passes each) and 3 error measurements on the 16
    # windows (the start and each epoch in fp32); the bf16 block's after the cast back runs
    # every window in place of the output pass, per block
    expected = shapes.blocks * (2 * 3 + 3) * one_pass
    assert flops(block_epochs=2, block_windows=16) - without == pytest.approx(expected)
    assert flops(block_epochs=2, block_windows=0) > flops(block_epochs=2, block_windows=16)
    assert flops(block_windows=16) == without  # no epochs, no re-fit


def _stage_peak_above_entry(run) -> float:
    """MiB the resident memory rose above its level at entry while ``run()`` ran."""
    timer = Timer()
    entry = _resident_mib()
    with timer.stage("measured"):
        run()
    return timer.stage_peaks()["measured"]["peak_rss_mib"] - entry


def _resident_mib() -> float:
    return resident_bytes() / 2**20


def _spd(width: int) -> torch.Tensor:
    inputs = torch.randn(2 * width, width, generator=torch.Generator().manual_seed(0))
    return inputs.T @ inputs / (2 * width)


# 3072 wide: each in x in matrix (36 MiB fp32, 72 MiB fp64) is above glibc's largest mmap
# threshold, so it is mapped on allocation and unmapped on release, and lives for more
# than the stage meter's sampling interval
needs_proc_status = pytest.mark.skipif(
    not os.path.exists("/proc/self/status"), reason="needs Linux's /proc/self/status"
)
WIDE = 3072
FP32_SQUARE, FP64_SQUARE = WIDE**2 * 4 / 2**20, WIDE**2 * 8 / 2**20


@needs_proc_status
def test_redense_factor_holds_two_float64_squares_as_the_plan_budgets():
    gram = _spd(WIDE)
    # the plan's closed-form budget: the float64 system and its factor (an identity and a
    # damped sum beside them were 3 GiB more at width 14336 than planned)
    assert _stage_peak_above_entry(lambda: _closed_factor(gram, 0.1)) < 2.5 * FP64_SQUARE


@needs_proc_status
def test_sparsegpt_factor_holds_two_squares_beside_the_hessian_as_the_plan_budgets():
    hessian = _spd(WIDE)
    peak = _stage_peak_above_entry(lambda: inverse_hessian_cholesky(hessian, 0.01))
    assert peak < 2.5 * FP32_SQUARE


@needs_proc_status
def test_kd_statistics_make_one_square_product_at_a_time():
    linears = {"layer": torch.nn.Linear(WIDE, 8)}
    dense = StatsCollector(linears, "gram", keep_inputs=True)
    current = StatsCollector(linears, "gram")
    current.cross_source = dense
    batch = torch.randn(1024, WIDE)  # products that take longer than a sampling interval
    for _ in range(2):  # the second batch adds into existing sums
        dense._accumulate("layer", batch)
        peak = _stage_peak_above_entry(lambda: current._accumulate("layer", batch))
    assert peak < 1.5 * FP32_SQUARE


def test_damped_factor_restores_the_matrix_it_damps_in_place():
    matrix = _spd(16)
    matrix[3, :] = matrix[:, 3] = 0.0  # a dead feature: the first try fails
    before = matrix.clone()
    factor = _closed_factor(matrix, 0.0)
    assert torch.equal(matrix, before)
    damped = before.double() + 0.01 * before.diagonal().mean().double() * torch.eye(16).double()
    torch.testing.assert_close(factor @ factor.T, damped)


@needs_proc_status
def test_prune_report_has_each_stages_peak_memory():
    _, result = pruned(SDS(block_epochs=1))
    stages = result.report["memory"]["stages"]
    for stage in ("capture", "stats_pass", "solve", "refine", "sds_fused"):
        assert stages[stage]["peak_rss_mib"] > 0, stage
    # a nested stage's peak is inside its parent's; the run's peak covers them all
    assert stages["solve"]["peak_rss_mib"] <= stages["sds_fused"]["peak_rss_mib"]
    assert stages["sds_fused"]["peak_rss_mib"] <= result.report["memory"]["peak_rss_mib"]


def test_refit_starts_without_the_solvers_state(monkeypatch):
    """The re-fit's Adam state comes on top of the block; the cross-Grams, the dense inputs'
    Grams and the cached factorisations are not needed any more and must be gone."""
    from sdsprune.sds import pipeline

    seen = []
    refit = pipeline._SDSSteps.refit_block

    def watched(self, ctx):
        caches = [stats.derived for stats in ctx.stats.stats.values()]
        seen.append((ctx.dense_stats, dict(ctx.stats.cross), any(caches)))
        refit(self, ctx)

    monkeypatch.setattr(pipeline._SDSSteps, "refit_block", watched)
    pruned(SDS(data_mode="kd", block_epochs=1), sparsity="2:4")
    assert seen and all(state == (None, {}, False) for state in seen)


@needs_proc_status
def test_stage_meter_leaves_the_processs_peak_counters_alone():
    """A caller's getrusage (and /usr/bin/time) must still see the run's peak."""
    import resource

    timer = Timer()
    with timer.stage("big"):
        big = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched
        del big
    with timer.stage("small"):
        torch.ones(1024)
    maxrss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks = timer.stage_peaks()
    assert peaks["big"]["peak_rss_mib"] > peaks["small"]["peak_rss_mib"] + 200
    assert maxrss_mib >= peaks["big"]["peak_rss_mib"] - 1


def test_plan_budgets_the_refits_optimiser_state_and_fp32_block(monkeypatch):
    monkeypatch.setattr(mp, "_free_memory", lambda compute: (None, None))
    net = llama_8b_shaped()  # bf16: the re-fit trains the block in fp32
    refit = mp.PlanRequest(
        windows=8,
        seqlen=2048,
        batch=2,
        # an iterative re-dense: its scratch (1.9 GB) is below the re-fit's, which is then
        # the item
        terms=sds_terms(block_epochs=2, redense="iterative"),
    )
    plan = mp.plan_run(net, refit, CPU, measure=False)
    solver = next(size for what, size, _ in plan.items if what.startswith("solver scratch"))
    shapes = mp._shapes(net)
    cached = sum(4 * width**2 for width in shapes.group_inputs)  # SparseGPT's factors
    # gradient, two Adam moments, best weights (fp32), masks and the start weights (bf16),
    # plus the block made fp32
    assert solver - cached == shapes.linear_params * 19 + shapes.block_params * 2


def refit_request(**options) -> mp.PlanRequest:
    """An SDS kd-free request with the block re-fit on (its dense stream gives the targets)."""
    terms = sds_terms(dense_stream=True, **{"block_epochs": 2, **options})
    return mp.PlanRequest(windows=128, seqlen=2048, batch=4, terms=terms)


def planned_items(net, request) -> dict[str, int]:
    plan = mp.plan_run(net, request, CPU, measure=False)
    return {what.split(" (")[0]: size for what, size, _ in plan.items}


def test_plan_counts_the_refits_output_buffers(monkeypatch):
    """A bf16 block keeps one stream-sized buffer (its rounded block's outputs) on a window
    subset or all windows; an fp32 block one on a subset (the last measurement's, which
    runs every window) and two on every window (the kept and the latest measurement's)."""
    monkeypatch.setattr(mp, "_free_memory", lambda compute: (None, None))
    stream = 128 * 2048 * 4096  # values in one stream buffer
    bf16 = llama_8b_shaped()
    assert planned_items(bf16, refit_request(block_windows=16))["activations"] == 3 * stream * 2
    assert planned_items(bf16, refit_request(block_windows=0))["activations"] == 3 * stream * 2
    assert planned_items(bf16, refit_request(block_windows=128))["activations"] == 3 * stream * 2
    assert planned_items(bf16, refit_request(block_epochs=0))["activations"] == 2 * stream * 2
    fp32 = llama_8b_shaped().float()
    assert planned_items(fp32, refit_request(block_windows=16))["activations"] == 3 * stream * 4
    assert planned_items(fp32, refit_request(block_windows=0))["activations"] == 4 * stream * 4


def test_plan_sizes_the_refits_forward_in_fp32_with_autograds_activations(monkeypatch):
    """A bf16 model's block re-fits in fp32: its forward scratch is fp32-sized, and a
    training step keeps autograd's saved activations of its mini-batch for the backward."""
    monkeypatch.setattr(mp, "_free_memory", lambda compute: (None, None))
    net = llama_8b_shaped()
    hidden, inner, heads, kv, seqlen = 4096, 14336, 32, 1024, 2048
    # the statistics pass: 4 windows in bf16, the hooks' fp32 input copy and one product
    tokens = 4 * seqlen
    stats = (tokens * (6 * hidden + 3 * inner) + 4 * heads * seqlen**2) * 2
    stats += tokens * inner * 4 + 4 * inner**2
    assert planned_items(net, refit_request(block_epochs=0))["forward scratch"] == stats
    # a re-fit step of 4 windows (block_batch) in fp32, with what autograd keeps per token:
    # layer inputs (qkv, o, gate/up, down), outputs, the two norms' inputs, the gated
    # product, and the rotary tables, norm scales and softmax statistics
    saved = (3 * hidden + inner) + (3 * hidden + 2 * kv + 2 * inner) + 2 * hidden + inner
    saved += 2 * hidden // heads + 2 + heads
    step = (tokens * (6 * hidden + 3 * inner) + 4 * heads * seqlen**2) * 4 + tokens * saved * 4
    assert step > stats
    assert planned_items(net, refit_request())["forward scratch"] == step
    smaller = refit_request(block_batch=2)  # a step of 2 windows; a measurement runs 4
    step2 = (2 * seqlen * (6 * hidden + 3 * inner) + 2 * heads * seqlen**2) * 4
    step2 += 2 * seqlen * saved * 4
    measure = (tokens * (6 * hidden + 3 * inner) + 4 * heads * seqlen**2) * 4
    assert planned_items(net, smaller)["forward scratch"] == max(step2, measure, stats)


def test_autograd_keeps_no_more_of_a_refit_step_than_the_plan_counts():
    """The saved-activation term against what autograd really keeps of a tiny Llama block's
    fp32 forward (the re-fit's own forward), counted through saved-tensor hooks."""
    from sdsprune.models.blocks import decoder_blocks
    from sdsprune.sds import block as refit

    model = tiny_model("llama")
    stream = capture_block_inputs(model, windows(4, 32), CPU, 4)
    block = decoder_blocks(model)[0]
    parameters = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        refit._forward(0, block, stream, torch.arange(4))
    planned = mp._autograd_saved(mp._shapes(model), 4 * 32)
    assert 0.5 * planned < sum(saved.values()) <= planned


def test_prune_plans_the_refit_step_at_the_configured_mini_batch(monkeypatch):
    prune_module = importlib.import_module("sdsprune.prune")  # the package exports prune()
    requests = []
    fit = prune_module.fit_plan

    def spy(net, request, compute):
        requests.append(request)
        return fit(net, request, compute)

    monkeypatch.setattr(prune_module, "fit_plan", spy)
    pruned(SDS(block_epochs=1, block_batch=2, adjust_iters=5))
    assert [request.terms.block_batch for request in requests] == [2]


def test_the_engine_names_no_method():
    """Each method config reports its own plan terms: no method's or solver's name is spelled
    anywhere in the engine, so a new method changes no engine code."""
    from pathlib import Path

    from sdsprune.methods import BASE_METHODS, OWL
    from sdsprune.sds.config import REDENSE_SOLVERS, SCHEDULES

    names = [*BASE_METHODS, SDS.name, OWL.name, *REDENSE_SOLVERS, *SCHEDULES]
    for path in Path(mp.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert not [name for name in names if f'"{name}"' in text], path.name


def test_each_method_reports_what_its_pruning_pass_holds():
    from sdsprune.methods import OWL, DSnoT, Magnitude, Wanda

    assert Magnitude().plan_terms().statistics == "none"
    assert Wanda().plan_terms().statistics == "sumsq"
    assert DSnoT(initial="sparsegpt").plan_terms().statistics == "gram"
    assert SparseGPT().plan_terms().factors_hessian
    sds = SDS(base=Wanda(), solver="fista", schedule="staged", data_mode="kd")
    terms = sds.plan_terms()
    assert (terms.statistics, terms.factors_hessian, terms.redense) == ("gram", False, "iterative")
    assert terms.staged and terms.dense_statistics and terms.block_epochs == 0
    assert OWL(inner=sds).plan_terms() == terms  # OWL's statistics pass comes first, alone
