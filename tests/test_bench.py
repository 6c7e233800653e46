"""Inference benchmark: report structure, honest verdicts, CLI (tiny models, no wall times)."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from test_export import pruned_dir
from torch._dynamo import register_backend

from sdsprune.bench import BenchSettings, default_backends, render_notes, render_table, run_bench
from sdsprune.bench.report import _verdict
from sdsprune.errors import SdspruneError
from sdsprune.export import export_checkpoint
from sdsprune.inference.decode import new_cache

TINY = BenchSettings(
    repeats=3,
    warmup=0,
    prompt_tokens=6,
    decode_tokens=2,
    batch_sizes=(1, 2),
    decode_modes=("eager",),
)
COMPILED: list[int] = []  # graphs compiled by the counting backend, one entry each


@register_backend(name="sdsprune_counting")
def counting_backend(graph, _example_inputs):
    """torch.compile's eager backend that counts graphs (inductor takes a minute a model)."""
    COMPILED.append(1)
    return graph.forward


STATIC = dataclasses.replace(
    TINY, decode_modes=("eager", "static"), compile_backend="sdsprune_counting"
)


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
    assert report["backends"]["csr"]["same_greedy_tokens_as_dense"] is True
    assert report["backends"]["csr"]["max_abs_decode_logit_diff_vs_dense"] < 1e-3
    assert report["backends"]["dense"]["max_abs_decode_logit_diff_vs_dense"] == 0.0
    dense_mib, csr_mib = (report["backends"][b]["linear_weights_mib"] for b in ("dense", "csr"))
    assert csr_mib > 0 and 0 < dense_mib <= report["backends"]["dense"]["weights_mib"]
    ceiling = report["ceiling"]
    assert set(ceiling["linear_share"]) == {1, 2} and set(ceiling["speedup"]) == {"csr"}
    for batch, share in ceiling["linear_share"].items():  # Amdahl from this run's numbers
        ratio = dense_mib / csr_mib
        expected = 1 / ((1 - share) + share / ratio)
        assert ceiling["speedup"]["csr"][batch] == pytest.approx(expected, abs=2e-3)
    assert not any(r["backend"] == "linears skipped" for r in report["results"])
    assert report["memory"]["peak_rss_mib"] > 0
    json.dumps(report)  # serialisable
    assert render_table(report).row_count == len(report["results"])


@pytest.mark.parametrize(("arch", "mode"), [("llama", "fused"), ("opt", "eager")])
def test_auto_decode_times_what_load_gives_a_user(tmp_path, arch, mode):
    """The default decode mode is load's: fused where the fused step serves the model (and
    auto then packs every pruned layer for it, as load does), else eager."""
    from sdsprune.inference.bitmask import extension

    if mode == "fused" and isinstance(extension(), str):
        pytest.skip(extension())
    folder = pruned_dir(tmp_path, "unstructured", arch)
    report = run_bench(
        folder, backends=["auto"], settings=dataclasses.replace(TINY, decode_modes=("auto",))
    )
    assert report["settings"]["decode_modes"] == [mode]
    assert {row["mode"] for row in report["results"] if row["workload"] == "decode"} == {mode}
    if mode == "fused":
        assert set(report["backends"]["auto"]["kernels"]) == {"bitmask"}
        assert report["ceiling"] is None  # the Amdahl ceiling needs eager decoding
    mib = report["streaming"]["decode_weights_mib"]
    assert report["streaming"]["bytes_ratio"]["auto"] == pytest.approx(
        mib["dense"] / mib["auto"], abs=2e-3
    )


def test_verdicts_need_a_rank_test_at_the_level_of_four_separated_samples():
    dense = [1.0, 1.1, 1.2, 1.02, 1.05]
    assert _verdict([0.5, 0.55, 0.6, 0.5, 0.52], dense) == "faster"
    assert _verdict([2.0, 2.1, 2.2, 2.0, 2.05], dense) == "slower"
    assert (
        _verdict([0.5, 0.55, 0.6, 0.5, 1.01], dense) == "faster"
    )  # one pair out of order: p = 4/252
    assert _verdict([0.5, 0.55, 1.3, 0.5, 1.01], dense) == "no clear difference"
    assert _verdict([0.9, 1.3, 1.0, 1.1, 0.95], dense) == "no clear difference"
    assert _verdict([0.1, 0.1, 0.1], [1.0, 1.0, 1.0]) == "too few repeats"
    # at 4 repeats the level is exactly complete separation, the rule it replaces
    assert _verdict([0.5, 0.6, 0.7, 0.8], [0.9, 1.0, 1.1, 1.2]) == "faster"
    assert _verdict([0.5, 0.6, 0.7, 0.95], [0.9, 1.0, 1.1, 1.2]) == "no clear difference"
    # 15 repeats, a 1.4x speedup with one slow sample above dense's fastest: clear
    fast = [0.05 + 0.001 * i for i in range(14)] + [0.08]
    assert _verdict(fast, [0.071 + 0.001 * i for i in range(15)]) == "faster"


def test_default_backends_on_cpu():
    assert default_backends(torch.device("cpu")) == [
        "dense",
        "csr",
        "bsr",
        "nm24",
        "bitmask",
        "auto",
    ]


def test_bad_settings_are_user_errors(sparse_dir, tmp_path):
    with pytest.raises(SdspruneError, match="batch sizes"):
        run_bench(sparse_dir, settings=BenchSettings(batch_sizes=(0,)))
    with pytest.raises(SdspruneError, match=r"config\.json"):
        run_bench(tmp_path, settings=TINY)
    with pytest.raises(SdspruneError, match="unknown backend"):
        run_bench(sparse_dir, backends=["gpu-magic"], settings=TINY)
    with pytest.raises(SdspruneError, match="decode modes must be among auto, eager, static"):
        run_bench(sparse_dir, settings=dataclasses.replace(TINY, decode_modes=("jit",)))


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
    from sdsprune.bench.run import _layer_speedups
    from sdsprune.inference import BackendReport, LayerChoice

    layers = [
        LayerChoice("0.q", "dense", 0.5, timings_us={"dense": {1: 10.0}, "csr": {1: 20.0}}),
        LayerChoice("0.k", "csr", 0.5, timings_us={"dense": {1: 10.0}, "csr": {1: 5.0}}),
        LayerChoice("0.v", "dense", 0.5, timings_us={"dense": {1: 10.0}, "csr": {1: 40.0}}),
    ]
    report = BackendReport("auto", "cpu", layers)
    assert _layer_speedups(report) == {"csr": {1: 0.5}}


def test_static_decode_is_compared_within_its_mode(sparse_dir):
    """Each backend against dense in the same decode mode, and static against eager of the
    same backend (for dense: the overhead cut alone). One graph per backend and batch size:
    the output check and the timed runs reuse them."""
    COMPILED.clear()
    report = run_bench(sparse_dir, backends=["csr", "auto"], settings=STATIC)
    static = report["static_decode"]
    assert static["compiled"] and static["fallback"] is None and static["skipped"] == {}
    assert set(static["compile_seconds"]) == {"dense", "csr", "auto"}
    assert len(COMPILED) == 3 * len(STATIC.batch_sizes)
    rows = {(r["backend"], r["workload"], r["mode"], r["batch"]): r for r in report["results"]}
    assert len(rows) == 3 * 3 * len(STATIC.batch_sizes)  # prefill, eager and static decode
    for batch in STATIC.batch_sizes:
        assert ("dense", "prefill", "static", batch) not in rows  # prefill stays eager
        for backend in ("dense", "csr", "auto"):
            static_row = rows[(backend, "decode", "static", batch)]
            dense_static = rows[("dense", "decode", "static", batch)]["seconds"]["median"]
            eager = rows[(backend, "decode", "eager", batch)]["seconds"]["median"]
            median = static_row["seconds"]["median"]
            assert static_row["speedup_vs_dense"] == pytest.approx(
                dense_static / median, rel=1e-2, abs=1e-3
            )
            assert static_row["speedup_vs_eager"] == pytest.approx(
                eager / median, rel=1e-2, abs=1e-3
            )
            assert "speedup_vs_eager" not in rows[(backend, "decode", "eager", batch)]
    for name in ("dense", "csr", "auto"):
        check = report["backends"][name]["static_vs_eager"]
        assert check["same_greedy_tokens"] and check["max_abs_logit_diff"] < 1e-4
    json.dumps(report)
    assert render_table(report).row_count == len(report["results"])
    notes = "\n".join(render_notes(report))
    assert "dense static vs eager decode (the overhead cut alone)" in notes


def test_a_backend_that_cannot_compile_is_skipped_in_static_mode(sparse_dir, monkeypatch):
    """Timed uncompiled against compiled dense, its ratio would mix the overhead cut into
    the sparse speedup: skipped, with dynamo's reason, while its eager rows stay."""
    from sdsprune.inference import kernels

    def untraceable(*_args):
        torch._dynamo.graph_break()

    monkeypatch.setattr(kernels, "compressed_mm", untraceable)
    report = run_bench(sparse_dir, backends=["csr"], settings=STATIC)
    static = report["static_decode"]
    assert static["compiled"] and list(static["compile_seconds"]) == ["dense"]
    assert static["skipped"]["csr"].startswith("Unsupported: ")
    assert {(r["backend"], r["mode"]) for r in report["results"]} == {
        ("dense", "eager"),
        ("dense", "static"),
        ("csr", "eager"),
    }
    assert "static_vs_eager" not in report["backends"]["csr"]
    assert "static decode skipped for csr: Unsupported" in "\n".join(render_notes(report))


def test_a_failing_compiler_falls_back_to_the_uncompiled_static_cache(
    sparse_dir, tmp_path, capsys, monkeypatch
):
    def no_compiler(*_args, **_kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    report = run_bench(sparse_dir, backends=["csr"], settings=STATIC)
    static = report["static_decode"]
    assert not static["compiled"] and static["compile_seconds"] == {}
    assert static["fallback"] == "RuntimeError: InvalidCxxCompiler: No working C++ compiler found"
    # uncompiled, csr runs the static cache too: like for like with uncompiled dense
    assert {(r["backend"], r["mode"]) for r in report["results"]} == {
        (backend, mode) for backend in ("dense", "csr") for mode in ("eager", "static")
    }
    assert report["backends"]["csr"]["static_vs_eager"]["same_greedy_tokens"]
    args = ["--backends", "dense", "--repeats", "1", "--warmup", "0", "--prompt-tokens", "4"]
    args += ["--decode-tokens", "2", "--batch-sizes", "1", "--decode", "eager,static"]
    code, stdout, stderr = run_cli(capsys, "bench", str(sparse_dir), *args)
    assert code == 0 and "Traceback" not in stdout + stderr
    assert "torch.compile failed (RuntimeError: InvalidCxxCompiler" in stdout
    assert "decode static" in stdout and "vs eager" in stdout
    code, _, stderr = run_cli(capsys, "bench", str(sparse_dir), "--decode", "eager,jit")
    assert code == 2 and "decode modes must be among" in stderr


def test_static_decode_that_dense_cannot_run_is_skipped_for_all(sparse_dir, monkeypatch):
    """Without a dense baseline no static ratio means anything: eager results only."""
    from sdsprune.bench import run as bench_run

    def no_static_cache(model, mode, max_tokens):
        if mode == "static":
            raise ValueError("this architecture has no static cache")
        return new_cache(model, mode, max_tokens)

    monkeypatch.setattr(bench_run, "new_cache", no_static_cache)
    report = run_bench(sparse_dir, backends=["csr"], settings=STATIC)
    static = report["static_decode"]
    assert static["skipped"] == dict.fromkeys(
        ["dense", "csr"], "dense failed: ValueError: this architecture has no static cache"
    )
    assert not static["compiled"] and static["fallback"] is None  # not the compiler's fault
    assert {r["mode"] for r in report["results"]} == {"eager"}
    assert "static decode skipped for dense: dense failed: ValueError" in "\n".join(
        render_notes(report)
    )


class FakeLlamaCpp:
    """A llama.cpp runner that answers at once: the peer rows' plumbing, not llama.cpp."""

    def __init__(self, tokens: list[int] | None = None) -> None:
        self.tokens, self.closed = tokens, False

    def prefill_seconds(self, ids: list[int]) -> float:
        return 0.004 * len(ids)

    def decode_seconds(self, ids: list[int], steps: int) -> float:
        return 0.02

    def greedy_tokens(self, ids: list[int], steps: int) -> list[int]:
        return self.tokens or [0] * steps

    def close(self) -> None:
        self.closed = True


def test_llamacpp_rows_sit_beside_the_backends_at_batch_one(sparse_dir, monkeypatch):
    from sdsprune.bench import peers as bench_peers
    from sdsprune.bench import run as bench_run

    runner = FakeLlamaCpp()

    def start(folder, precisions, workdir, context, say):
        assert workdir.is_dir() and context == TINY.prompt_tokens + TINY.decode_tokens
        peers = [bench_peers.PeerContender(bench_peers.peer_name(p), runner) for p in precisions]
        loads = {
            p.name: {"kernels": {"llama.cpp": "f32"}, "load_seconds": 0.1, "gguf_mib": 1.0}
            for p in peers
        }
        return peers, loads, {}

    monkeypatch.setattr(bench_run, "start_peers", start)
    settings = dataclasses.replace(TINY, llamacpp=("f32",))
    report = run_bench(sparse_dir, backends=["dense", "auto"], settings=settings)
    assert runner.closed
    peer_rows = [row for row in report["results"] if row["backend"] == "llama.cpp f32"]
    assert {(row["workload"], row["batch"]) for row in peer_rows} == {("prefill", 1), ("decode", 1)}
    decode = {
        row["backend"]: row
        for row in report["results"]
        if row["workload"] == "decode" and row["batch"] == 1
    }
    for row in decode.values():
        assert row["peer"] == "llama.cpp f32"
        assert row["speedup_vs_peer"] == pytest.approx(0.02 / row["seconds"]["median"], rel=1e-2)
    assert all("speedup_vs_peer" not in row for row in report["results"] if row["batch"] == 2)
    assert report["peers"]["llama.cpp f32"]["same_greedy_tokens_as_dense"] in (True, False)
    streaming = report["streaming"]
    assert set(streaming["decode_weights_mib"]) == {"dense", "auto", "llama.cpp f32"}
    assert streaming["bandwidth_gib_s"] > 0
    from rich.console import Console

    console = Console(width=250, record=True)
    console.print(render_table(report))
    assert "vs llama.cpp f32" in console.export_text()
    notes = "\n".join(render_notes(report))
    assert "llama.cpp f32: GGUF 1.0 MiB" in notes and "decode step reads" in notes


def test_llamacpp_rows_are_skipped_with_the_reason_when_it_is_missing(sparse_dir, monkeypatch):
    from sdsprune.bench import peers as bench_peers

    monkeypatch.setattr(
        bench_peers, "llamacpp_problem", lambda: "llama-cpp-python is not installed"
    )
    settings = dataclasses.replace(TINY, llamacpp=("f32", "q8_0"), repeats=1)
    report = run_bench(sparse_dir, backends=["dense"], settings=settings)
    assert report["skipped"] == {
        "llama.cpp f32": "llama-cpp-python is not installed",
        "llama.cpp q8_0": "llama-cpp-python is not installed",
    }
    assert report["peers"] == {}


def test_an_unknown_llamacpp_precision_is_refused_before_loading(sparse_dir):
    with pytest.raises(SdspruneError, match=r"llama\.cpp precisions must be among f32, bf16, q8_0"):
        run_bench(sparse_dir, settings=dataclasses.replace(TINY, llamacpp=("q4",)))


def test_cli_bench_passes_llamacpp_precisions_and_refuses_unknown_ones(sparse_dir, capsys):
    code, _, err = run_cli(capsys, "bench", str(sparse_dir), "--llamacpp", "f32,q4")
    assert code == 2 and "llama.cpp precisions must be among f32, bf16, q8_0" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1
