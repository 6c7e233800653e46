import json

from test_cli import run_cli
from transformers import AutoModelForCausalLM

from sdsprune.models import model_linears


def prune_args(model_dir, corpus, out, *extra):
    return [
        "prune",
        str(model_dir),
        "--method",
        "sparsegpt",
        "--sparsity",
        "2:4",
        "--calib",
        str(corpus),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--out",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]


def test_prune_writes_a_loadable_checkpoint_and_a_full_report(tiny_model_dir, tmp_path):
    corpus = tmp_path / "calib.txt"
    corpus.write_text("Calibration text for the tiny model, repeated. " * 40)
    out = tmp_path / "pruned"
    result = run_cli(
        *prune_args(tiny_model_dir, corpus, out, "--eval", str(corpus), "--max-chunks", "2")
    )
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, layer in model_linears(model).items():
        assert ((layer.weight == 0).view(layer.weight.shape[0], -1, 4).sum(-1) == 2).all(), name
    report = json.loads((out / "sdsprune_report.json").read_text())
    assert report["config"]["method"] == "sparsegpt" and report["config"]["sparsity"] == "2:4"
    assert {"torch", "transformers", "python"} <= set(report["versions"])
    assert {"capture", "prune", "prune_total"} <= set(report["timings"])
    assert report["memory"]["peak_rss_mib"] > 0
    layer = report["layers"]["0.self_attn.q_proj"]
    assert layer["sparsity"] == 0.5 and 0 < layer["rel_error"] < 1
    assert report["evaluation"][0]["chunks"] == 2
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_existing_output_is_refused_unless_overwrite(tiny_model_dir, tmp_path):
    corpus = tmp_path / "calib.txt"
    corpus.write_text("Calibration text for the tiny model, repeated. " * 40)
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    refused = run_cli(*prune_args(tiny_model_dir, corpus, out))
    assert refused.returncode == 2 and "already exists" in refused.stderr
    assert (out / "keep.txt").exists()
    replaced = run_cli(*prune_args(tiny_model_dir, corpus, out, "--overwrite"))
    assert replaced.returncode == 0, replaced.stderr
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_prune_hands_its_options_on_as_one_object():
    """prune() takes the method's config, the sparsity and two option objects (calibration,
    run), at most six parameters, and hands them on, checked and parsed, as one object."""
    import dataclasses
    import inspect

    from sdsprune.prune import PruneOptions, _prune, prune

    parameters = list(inspect.signature(prune).parameters)
    # keywords: the deprecated flat keywords of earlier releases (see sdsprune.keywords)
    assert parameters == ["model", "method", "sparsity", "calibration", "run", "keywords"]
    fields = [field.name for field in dataclasses.fields(PruneOptions)]
    assert fields == ["method", "pattern", "calibration", "run", "compute"]
    assert list(inspect.signature(_prune).parameters) == ["model", "options", "dist", "timer"]
