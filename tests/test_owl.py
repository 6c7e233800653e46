"""OWL: per-block sparsity from outlier ratios, with the model's total kept."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import byte_tokenizer, cpu_run, every_method, tiny_model

from sdsprune import SdspruneError
from sdsprune.methods import OWL, Wanda, parse_method
from sdsprune.models import LoadedModel, decoder_blocks, model_linears
from sdsprune.owl import OWLConfig, allocate
from sdsprune.prune import prune


def windows(count=8, length=24, seed=0):
    return torch.randint(0, 256, (count, length), generator=torch.Generator().manual_seed(seed))


def run_owl(model, method="magnitude", sparsity="0.7", **owl_settings):
    """``method`` (a method string) under OWL with ``owl_settings`` (default: the paper's)."""
    return prune(
        LoadedModel(model, byte_tokenizer(), "tiny", None),
        OWL(inner=parse_method(method), **owl_settings),
        sparsity=sparsity,
        calibration=windows(),
        run=cpu_run(),
    )


def with_outliers(block: int, arch: str = "llama"):
    """A tiny model whose ``block`` has 10% of its query and key weights made 10x larger
    (outliers there barely change the block's output, so later blocks keep theirs)."""
    model = tiny_model(arch)
    generator = torch.Generator().manual_seed(block)
    with torch.no_grad():
        for name, layer in model_linears(model).items():
            if name in (f"{block}.self_attn.q_proj", f"{block}.self_attn.k_proj"):
                chosen = torch.rand(layer.weight.shape, generator=generator) < 0.1
                layer.weight[chosen] *= 10
    return model


def total_sparsity(model) -> tuple[float, float]:
    """(zeros / weights over every pruned layer, the largest rounding one row can cause)."""
    layers = model_linears(model).values()
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers)
    params = sum(layer.weight.numel() for layer in layers)
    return zeros / params, max(1 / layer.in_features for layer in layers)


@pytest.mark.parametrize(
    ("ratios", "sizes"),
    [([0.01, 0.05, 0.02, 0.03], [10, 10, 10, 10]), ([0.2, 0.1, 0.4], [5, 30, 11])],
)
def test_allocation_keeps_the_weighted_total_and_follows_outliers(ratios, sizes):
    blocks = allocate(ratios, sizes, 0.7, 0.08)
    total = sum(s * n for s, n in zip(blocks, sizes, strict=True)) / sum(sizes)
    assert total == pytest.approx(0.7, abs=1e-12)
    by_ratio = [s for _, s in sorted(zip(ratios, blocks, strict=True))]
    assert by_ratio == sorted(by_ratio, reverse=True)  # more outliers, lower sparsity
    assert max(blocks) - min(blocks) == pytest.approx(2 * 0.08)


def test_allocation_is_uniform_without_spread_and_refuses_impossible_lambdas():
    assert allocate([0.1, 0.1, 0.1], [1, 2, 3], 0.6, 0.08) == [0.6, 0.6, 0.6]
    with pytest.raises(SdspruneError, match="smaller lambda"):
        allocate([0.0, 1.0], [1, 1], 0.9, 0.2)


@pytest.mark.parametrize("block", [0, 1])
def test_block_with_more_outliers_is_pruned_less(block):
    """Causal, not coincidental: moving the injected outliers moves the lower sparsity."""
    model = with_outliers(block)
    result = run_owl(model)
    report = result.report["owl"]
    ratios = [b["outlier_ratio"] for b in report["blocks"]]
    sparsities = [b["sparsity"] for b in report["blocks"]]
    assert ratios[block] == max(ratios)
    assert sparsities[block] == min(sparsities) and sparsities[block] < 0.7
    # the achieved sparsity of each block is the allocated one (magnitude: per layer)
    for index, decoder_block in enumerate(decoder_blocks(model)):
        for layer in (m for m in decoder_block.modules() if isinstance(m, torch.nn.Linear)):
            assert (layer.weight == 0).float().mean().item() == pytest.approx(
                sparsities[index], abs=1 / layer.weight.numel()
            )


@pytest.mark.parametrize("method", every_method("sparsegpt", "wanda"))
def test_owl_keeps_the_total_sparsity_for_every_method(method):
    model = with_outliers(0, arch="opt")
    result = run_owl(model, method=method)
    achieved, rounding = total_sparsity(model)
    assert achieved == pytest.approx(0.7, abs=rounding)
    assert result.report["summary"]["sparsity"] == pytest.approx(achieved)
    sparsities = [b["sparsity"] for b in result.report["owl"]["blocks"]]
    assert sparsities[0] < sparsities[1]  # not uniform: OWL really applied
    assert result.report["config"]["owl"] == {"threshold": 5.0, "lam": 0.08}


def test_owl_knobs_change_the_allocation():
    narrow = run_owl(with_outliers(0), lam=0.02).report["owl"]["blocks"]
    wide = run_owl(with_outliers(0), lam=0.1).report["owl"]["blocks"]
    assert wide[1]["sparsity"] - wide[0]["sparsity"] == pytest.approx(0.2)
    assert narrow[1]["sparsity"] - narrow[0]["sparsity"] == pytest.approx(0.04)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": "2:4"}, "needs unstructured sparsity"),
        ({"lam": 0.4, "sparsity": "0.8"}, "smaller lambda"),
    ],
)
def test_owl_refuses_what_it_cannot_do(kwargs, message):
    with pytest.raises(SdspruneError, match=message):
        run_owl(tiny_model("llama"), **kwargs)


def test_owl_config_checks_its_knobs():
    with pytest.raises(SdspruneError, match="M > 0"):
        OWLConfig(threshold=0)


def test_cli_prune_with_owl(tiny_model_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("some calibration text for the tiny model to read. " * 40)
    common = ["prune", str(tiny_model_dir), "--calib", str(corpus), "--nsamples", "2"]
    common += ["--seqlen", "32", "--device", "cpu", "--json", "--owl"]

    def cli(*extra):
        return subprocess.run(
            [sys.executable, "-m", "sdsprune", *common, *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )

    result = cli("--method", "admm", "--sparsity", "0.7", "--owl-lambda", "0.05")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["config"]["owl"] == {"threshold": 5.0, "lam": 0.05}
    assert len(report["owl"]["blocks"]) == 2
    refused = cli("--method", "wanda", "--sparsity", "2:4")
    assert refused.returncode == 2 and "needs unstructured sparsity" in refused.stderr


def test_owl_low_memory_run_equals_the_in_memory_one(tiny_model_dir, tmp_path):
    """The statistics pass reads each block from the checkpoint like the pruning pass."""
    from transformers import AutoModelForCausalLM

    owl = OWL(inner=Wanda(), threshold=2.0)
    common = dict(sparsity="0.7", calibration=windows())
    prune(str(tiny_model_dir), owl, run=cpu_run(out=tmp_path / "mem"), **common)
    prune(str(tiny_model_dir), owl, run=cpu_run(out=tmp_path / "low", low_memory=True), **common)
    reports = [
        json.loads((tmp_path / n / "sdsprune_report.json").read_text()) for n in ("mem", "low")
    ]
    assert reports[0]["owl"] == reports[1]["owl"]
    in_memory, low = (
        model_linears(AutoModelForCausalLM.from_pretrained(tmp_path / name))
        for name in ("mem", "low")
    )
    for name, layer in in_memory.items():
        assert torch.equal(layer.weight, low[name].weight), name
    with pytest.raises(SdspruneError, match="cannot resume a --low-memory run"):
        again = cpu_run(
            out=tmp_path / "again", low_memory=True, state_dir=tmp_path / "state", resume=True
        )
        prune(str(tiny_model_dir), owl, run=again, **common)
