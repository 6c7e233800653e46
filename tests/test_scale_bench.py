"""benchmarks/scale.py: a rerun keeps what an earlier run measured and runs only the rest."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import benchmark_module


def fake_row(config: str, dtype: str, seconds: float) -> dict:
    stages = dict.fromkeys(("capture", "stats_pass", "solve", "output_pass"), 1.0)
    return {
        "config": config,
        "dtype": dtype,
        "blocks": 2,
        "tokens": 8 * 2048,
        "seconds": seconds,
        "per_block_seconds": stages,
        "peak_above_baseline_mib": 10.0,
        "planned_peak_mib": 12.0,
        "batch": 4,
        "threads": 2,
    }


def fake_launch(monkeypatch, scale) -> list[tuple[str, str]]:
    launched = []

    def fake_run(command, **kwargs):
        config, dtype = command[-2:]
        launched.append((config, dtype))
        row = fake_row(config, dtype, seconds=5.0)
        return subprocess.CompletedProcess(command, 0, stdout=json.dumps(row) + "\n", stderr="")

    monkeypatch.setattr(scale.subprocess, "run", fake_run)
    return launched


def test_rerun_measures_only_the_missing_configurations(monkeypatch, tmp_path: Path):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    scale = benchmark_module("scale")
    earlier = fake_row("sparsegpt", "float32", seconds=111.0)
    earlier["extrapolated"] = scale.extrapolate(earlier)
    (tmp_path / "scale.json").write_text(json.dumps([earlier]))
    launched = fake_launch(monkeypatch, scale)
    assert (
        scale.main(
            [
                "--configs",
                "sparsegpt,sds-sd",
                "--dtypes",
                "float32,bfloat16",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )

    assert launched == [("sds-sd", "float32"), ("sparsegpt", "bfloat16"), ("sds-sd", "bfloat16")]
    rows = json.loads((tmp_path / "scale.json").read_text())
    assert [scale.row_key(r)[:2] for r in rows] == [("sparsegpt", "float32"), *launched]
    assert rows[0]["seconds"] == 111.0  # the earlier measurement is kept, not redone
    assert "8b_minutes" in rows[1]["extrapolated"]
    times, memory = (tmp_path / "scale.md").read_text().split("\n\n")
    assert times.count("\n") == 1 + len(rows) and memory.count("\n") == 2 + len(rows)


def test_extrapolation_grows_the_refit_with_its_windows_only(monkeypatch):
    """The re-fit sees at most ``block_windows`` (16) windows: 8 -> 128 windows doubles it,
    while the passes grow 16x."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    scale = benchmark_module("scale")
    row = fake_row("sds-sd", "float32", seconds=1.0)
    row["per_block_seconds"] = {**dict.fromkeys(scale.STAGES, 0.0), "refine": 60.0}
    assert scale.extrapolate(row)["8b_minutes"] == 32 * 2 * 60.0 / 60
    row["per_block_seconds"] = {**dict.fromkeys(scale.STAGES, 0.0), "stats_pass": 60.0}
    assert scale.extrapolate(row)["8b_minutes"] == 32 * 16 * 60.0 / 60


def test_bf16_runs_by_default_only_where_the_cpu_computes_it_natively(monkeypatch, tmp_path):
    """An AVX2-only CPU emulates bf16 about 100x slower than fp32: such a row would measure
    the emulation for days, so it is skipped unless asked for by name."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    scale = benchmark_module("scale")
    launched = fake_launch(monkeypatch, scale)
    for slowdown, out in ((100.0, tmp_path / "slow"), (1.5, tmp_path / "native")):
        monkeypatch.setattr(scale, "bf16_slowdown", lambda s=slowdown: s)
        assert scale.main(["--configs", "sparsegpt", "--out", str(out)]) == 0
        check = json.loads((out / "bf16-check.json").read_text())
        assert check["bf16_over_fp32_matmul"] == slowdown
    slow, native = [("sparsegpt", "float32")], [("sparsegpt", "bfloat16"), ("sparsegpt", "float32")]
    assert launched == slow + native
    launched.clear()
    monkeypatch.setattr(scale, "bf16_slowdown", lambda: 100.0)
    scale.main(["--configs", "sparsegpt", "--dtypes", "bfloat16", "--out", str(tmp_path / "x")])
    assert launched == [("sparsegpt", "bfloat16")]  # asked for by name: run anyway
