"""The CUDA-only branches of the memory readings, run here with ``torch.cuda`` substituted:
no GPU has been lent to this project, and these readings are what its first GPU run checks
the memory plan against."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import types
from pathlib import Path

import pytest
import torch

from sdsprune import runinfo
from sdsprune.engine.distributed import distributed_from_env
from sdsprune.runinfo import Timer

MIB = 2**20
ROOT = Path(__file__).resolve().parents[1]


class FakeCuda:
    """Two CUDA devices' peak-allocation counters and a current device, in place of a GPU."""

    def __init__(self, monkeypatch):
        self.current = 0
        self.peaks = {0: 0, 1: 0}
        self.resident = {0: 0, 1: 0}  # what memory_allocated reads: set by a test
        for name in ("is_available", "is_initialized"):
            monkeypatch.setattr(torch.cuda, name, lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(self.peaks))
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", self.max_memory_allocated)
        monkeypatch.setattr(
            torch.cuda, "memory_allocated", lambda device=None: self.resident[self._index(device)]
        )
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self.reset)
        monkeypatch.setattr(torch.cuda, "device", self.made_current)
        # the folded peaks are process state: this test's go to a copy, dropped after it
        monkeypatch.setattr(runinfo, "_CUDA_PEAK", copy.deepcopy(runinfo._CUDA_PEAK))

    def _index(self, device) -> int:
        if device is None:
            return self.current
        if isinstance(device, int):
            return device
        index = torch.device(device).index
        return self.current if index is None else index

    def max_memory_allocated(self, device=None) -> int:
        return self.peaks[self._index(device)]

    def reset(self, device=None) -> None:
        self.peaks[self._index(device)] = 0

    def allocate(self, device: int, size: int) -> None:
        self.peaks[device] = max(self.peaks[device], size)

    @contextlib.contextmanager
    def made_current(self, device):
        before, self.current = self.current, self._index(device)
        try:
            yield
        finally:
            self.current = before


def test_a_run_on_cuda_1_reports_the_peaks_of_cuda_1(monkeypatch):
    """``--device cuda:1`` in one process: the stage meter and the report read device 1,
    not the current device 0 (which holds nothing)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cuda = FakeCuda(monkeypatch)
    timer = Timer()
    with distributed_from_env(torch.device("cuda", 1)):
        with timer.stage("solve"):
            cuda.allocate(1, 700 * MIB)
        with timer.stage("refine"):
            cuda.allocate(1, 300 * MIB)
        report = runinfo.peak_memory()
    assert cuda.current == 0  # restored after the run
    stages = timer.stage_peaks()
    assert stages["solve"]["peak_cuda_mib"] == 700
    assert stages["refine"]["peak_cuda_mib"] == 300
    assert report["peak_cuda_mib"] == 700
    assert stages["solve"]["entry_cuda_mib"] == 0
    assert runinfo.peak_memory(torch.device("cuda", 0))["peak_cuda_mib"] == 0
    assert "peak_cuda_mib" not in runinfo.peak_memory(torch.device("cpu"))


def test_each_stage_records_what_was_allocated_when_it_began(monkeypatch):
    """A stage's peak includes what earlier stages left resident: the reading at entry says
    how much, so a plan for the stage alone can be checked (the largest over its entries)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cuda = FakeCuda(monkeypatch)
    timer = Timer()
    with distributed_from_env(torch.device("cuda", 0)):
        for resident in (120, 90):
            cuda.resident[0] = resident * MIB
            with timer.stage("solve"):
                cuda.allocate(0, (resident + 200) * MIB)
    stages = timer.stage_peaks()
    assert stages["solve"]["entry_cuda_mib"] == 120
    assert stages["solve"]["peak_cuda_mib"] == 320


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_prune_report() -> dict:
    """What a prune's report holds about time and memory (values in MiB and seconds)."""
    return {
        "evaluation": [{"perplexity": 20.5}],
        "plan": {"device_peak": 900 * MIB},
        "timings": {"load": 1.5, "capture": 0.5, "solve": 3.0, "refine": 2.0, "prune_total": 6.0},
        "memory": {
            "peak_cuda_mib": 4000.0,  # process-wide: an earlier prune in the same process
            "stages": {
                "load": {"peak_rss_mib": 500.0, "peak_cuda_mib": 0.0},
                "capture": {"peak_rss_mib": 500.0, "peak_cuda_mib": 250.0},
                "solve": {"peak_rss_mib": 500.0, "peak_cuda_mib": 800.0, "entry_cuda_mib": 150.0},
                "refine": {"peak_rss_mib": 500.0, "peak_cuda_mib": 400.0},
            },
        },
    }


def test_gpu_check_reports_the_runs_peak_and_each_stages_next_to_its_time(monkeypatch):
    """CUDA's counter read after the prune holds only the last stage (every stage resets it):
    the row must carry the largest stage peak, and each stage its own beside its time."""
    gpu_check = gpu_check_module()
    cuda = FakeCuda(monkeypatch)
    cuda.allocate(0, 400 * MIB)  # what the counter holds after the last stage (refine)
    model = types.SimpleNamespace(model=torch.nn.Linear(2, 2))
    result = types.SimpleNamespace(report=fake_prune_report(), model=model)
    monkeypatch.setattr("sdsprune.prune", lambda *args, **kwargs: result)
    args = gpu_check.parse_args([])
    row, _ = gpu_check.run_method(args, None, "sds", "cuda", "bfloat16")
    assert row["peak_gpu_mib"] == 800.0
    assert row["planned_peak_mib"] == 900.0
    assert row["stages"]["solve"] == {
        "seconds": 3.0,
        "peak_gpu_mib": 800.0,
        "at_entry_gpu_mib": 150.0,
        "planned_peak_mib": 900.0,
    }
    assert row["stages"]["capture"]["peak_gpu_mib"] == 250.0
    assert row["stages"]["prune_total"]["peak_gpu_mib"] is None  # a total, not a stage


def test_gpu_check_prints_every_stage_with_its_peak_and_the_plan(capsys):
    gpu_check = gpu_check_module()
    report = fake_prune_report()
    row = {"method": "sds", "device": "cuda", "dtype": "bfloat16"}
    row["stages"] = gpu_check.report_stages(report)
    gpu_check.print_stages([row])
    lines = capsys.readouterr().out.splitlines()
    solve = next(line for line in lines if line.strip().startswith("solve"))
    assert "3.00 s" in solve and "800.0 MiB" in solve and "plan 900.0 MiB" in solve
    assert "at entry 150.0" in solve


def test_a_run_on_a_cuda_device_the_machine_lacks_is_refused_in_one_line(monkeypatch):
    from sdsprune import SdspruneError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    FakeCuda(monkeypatch)
    run = distributed_from_env(torch.device("cuda", 2))
    with pytest.raises(SdspruneError, match=r"cuda:2 does not exist.*cuda:0 to cuda:1"), run:
        pass


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_run_on_an_index_free_device_keeps_the_current_device(monkeypatch, device):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cuda = FakeCuda(monkeypatch)
    cuda.current = 1
    with distributed_from_env(torch.device(device)):
        assert cuda.current == 1


def test_the_static_cache_takes_the_models_dtype_and_device_from_the_prefill():
    """transformers 5's ``StaticCache`` takes no device or dtype (it ignores both as keyword
    arguments): each layer allocates on its first update, from the key/value states, so the
    eager prefill puts it where the model is, in its dtype."""
    from conftest import tiny_model

    from sdsprune.inference.decode import new_cache, prefill

    model = tiny_model("llama").to(torch.bfloat16)
    cache = new_cache(model, "static", 32)
    prefill(model, torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0)), cache)
    for layer in cache.layers:
        assert layer.keys.dtype == layer.values.dtype == torch.bfloat16
        assert layer.keys.device == next(model.parameters()).device
        assert layer.keys.shape[2] == 32
