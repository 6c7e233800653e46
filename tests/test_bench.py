"""Inference benchmark: report structure, honest verdicts, CLI (tiny models, no wall times)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from test_export import pruned_dir

from sdsprune.bench import BenchSettings, _verdict, default_backends, render_table, run_bench
from sdsprune.errors import SdspruneError
from sdsprune.export import export_checkpoint

TINY = BenchSettings(repeats=3, warmup=0, prompt_tokens=6, decode_tokens=2, batch_sizes=(1, 2))


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI entry point in-process (a subprocess would spend seconds on imports)."""
    from sdsprune import cli

    argv = sys.argv
    sys.argv = ["sdsprune", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def sparse_dir(tmp_path):
    out = tmp_path / "sparse"
    export_checkpoint(pruned_dir(tmp_path, "2:4"), out, format="sparse")
    return out


def test_report_has_every_backend_workload_and_batch(sparse_dir):
    report = run_bench(sparse_dir, backends=["csr", "bsr"], settings=TINY)
    assert list(report["backends"]) == ["dense", "csr"]  # dense always, first
    assert "bsr" in report["skipped"] and "blocks" in report["skipped"]["bsr"]
    assert report["checkpoint"] == {
        "format": "sparse",
        "prunable_sparsity": 0.5,
        "patterns": {"2:4": 14},
    }
    rows = {(r["backend"], r["workload"], r["batch"]): r for r in report["results"]}
    assert len(rows) == 2 * 2 * 2
    for (backend, workload, _), row in rows.items():
        assert len(row["samples"]) == TINY.repeats
        assert row["unit"] == ("tokens/s" if workload == "prefill" else "ms/token")
        median = row["seconds"]["median"]
        dense_median = rows[("dense", workload, row["batch"])]["seconds"]["median"]
        assert row["speedup_vs_dense"] == pytest.approx(dense_median / median, rel=1e-2, abs=1e-3)
        assert row["verdict"] == "baseline" if backend == "dense" else row["verdict"] != "baseline"
    assert report["backends"]["csr"]["kernels"] == {"csr": 14}
    assert report["backends"]["csr"]["max_abs_logit_diff_vs_dense"] < 1e-3
    assert report["memory"]["peak_rss_mib"] > 0
    json.dumps(report)  # serialisable
    assert render_table(report).row_count == len(report["results"])


def test_verdicts_need_separated_samples():
    dense = [1.0, 1.1, 1.2, 1.0, 1.05]
    assert _verdict([0.5, 0.55, 0.6, 0.5, 0.52], dense) == "faster"
    assert _verdict([2.0, 2.1, 2.2, 2.0, 2.05], dense) == "slower"
    assert _verdict([0.5, 0.55, 0.6, 0.5, 1.01], dense) == "no clear difference"
    assert _verdict([0.9, 1.3, 1.0, 1.1, 0.95], dense) == "no clear difference"
    assert _verdict([0.1, 0.1, 0.1], [1.0, 1.0, 1.0]) == "too few repeats"


def test_default_backends_on_cpu():
    assert default_backends(torch.device("cpu")) == ["dense", "csr", "bsr", "nm24", "auto"]


def test_bad_settings_are_user_errors(sparse_dir, tmp_path):
    with pytest.raises(SdspruneError, match="batch sizes"):
        run_bench(sparse_dir, settings=BenchSettings(batch_sizes=(0,)))
    with pytest.raises(SdspruneError, match=r"config\.json"):
        run_bench(tmp_path, settings=TINY)
    with pytest.raises(SdspruneError, match="unknown backend"):
        run_bench(sparse_dir, backends=["gpu-magic"], settings=TINY)


def test_cli_export_and_bench(tmp_path, capsys):
    source = pruned_dir(tmp_path, "unstructured")
    out = tmp_path / "sparse"
    code, stdout, _ = run_cli(
        capsys, "export", str(source), "--out", str(out), "--dtype", "float16", "--json"
    )
    assert code == 0
    assert json.loads(stdout)["pruned_ratio"] == pytest.approx(0.5625, abs=0.002)
    code, _, stderr = run_cli(capsys, "export", str(source), "--out", str(out))
    assert code == 2 and "--overwrite" in stderr
    code, _, stderr = run_cli(
        capsys, "export", str(source), "--out", str(tmp_path / "x"), "--format", "zip"
    )
    assert code == 2 and "unknown export format" in stderr and "Traceback" not in stderr
    json_file = tmp_path / "bench.json"
    args = ["--backends", "dense,csr", "--repeats", "1", "--warmup", "0", "--prompt-tokens", "4"]
    args += ["--decode-tokens", "2", "--batch-sizes", "1", "--out", str(json_file)]
    code, stdout, _ = run_cli(capsys, "bench", str(out), *args)
    assert code == 0
    assert "csr" in stdout and "vs dense" in stdout
    report = json.loads(json_file.read_text())
    assert report["dtype"] == "float32"
    assert {r["backend"] for r in report["results"]} == {"dense", "csr"}


def test_layer_speedups_summarise_autos_timings():
    from sdsprune.bench import _layer_speedups
    from sdsprune.inference import BackendReport, LayerChoice

    layers = [
        LayerChoice("0.q", "dense", 0.5, timings_us={"dense": {1: 10.0}, "csr": {1: 20.0}}),
        LayerChoice("0.k", "csr", 0.5, timings_us={"dense": {1: 10.0}, "csr": {1: 5.0}}),
        LayerChoice("0.v", "dense", 0.5, timings_us={"dense": {1: 10.0}, "csr": {1: 40.0}}),
    ]
    report = BackendReport("auto", "cpu", layers)
    assert _layer_speedups(report) == {"csr": {1: 0.5}}
