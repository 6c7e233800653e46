"""What is written next to every output: configuration, versions, timings, memory."""

from __future__ import annotations

import contextlib
import platform
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

_PACKAGES = (
    "sdsprune",
    "torch",
    "transformers",
    "safetensors",
    "accelerate",
    "datasets",
    "lm-eval",
)


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    versions["torch_threads"] = str(torch.get_num_threads())
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
        versions["gpu"] = torch.cuda.get_device_name()
    return versions


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation) in MiB, over the
    whole run: stage meters reset the kernel's and CUDA's peak counters, and fold what
    they had seen into ``_RUN_PEAKS`` first."""
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, _RUN_PEAKS["rss"])
    peak = {"peak_rss_mib": round(rss / 2**20, 1)}
    if torch.cuda.is_available():
        cuda = max(torch.cuda.max_memory_allocated(), _RUN_PEAKS["cuda"])
        peak["peak_cuda_mib"] = round(cuda / 2**20, 1)
    return peak


_RUN_PEAKS = {"rss": 0, "cuda": 0}  # bytes seen before a stage meter reset the counters
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _peak_rss() -> int | None:
    """The kernel's high-water mark of this process's resident memory (Linux), in bytes."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak_rss() -> bool:
    """Restart the high-water mark at the current resident size (Linux 4.0+: writing 5 to
    clear_refs touches nothing else); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class _StagePeaks:
    """Peak memory of each named stage (the max over its entries), nested stages included.

    The memory plan's estimates are per stage of a block (statistics pass, solve, re-fit);
    a whole-run peak does not say which one a wrong estimate belongs to. The kernel and
    CUDA keep one high-water mark each, so entering a stage folds the mark into every open
    stage (and the run's peak) and restarts it; leaving folds it into the open ones again.
    """

    def __init__(self) -> None:
        self.peaks: dict[str, dict[str, int]] = {}
        self.open: list[str] = []
        self.rss = _peak_rss() is not None  # until a reset fails (no /proc, no permission)

    @property
    def cuda(self) -> bool:
        return torch.cuda.is_available() and torch.cuda.is_initialized()

    def enter(self, name: str) -> None:
        self._fold()
        self.open.append(name)
        if self.rss:
            self.rss = _reset_peak_rss()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def leave(self) -> None:
        self._fold()
        self.open.pop()

    def _fold(self) -> None:
        seen = {}
        if self.rss:
            seen["rss"] = _peak_rss() or 0
        if self.cuda:
            seen["cuda"] = torch.cuda.max_memory_allocated()
        for kind, size in seen.items():
            _RUN_PEAKS[kind] = max(_RUN_PEAKS[kind], size)
            for name in self.open:
                stage = self.peaks.setdefault(name, {})
                stage[kind] = max(stage.get(kind, 0), size)

    def mib(self) -> dict[str, dict[str, float]]:
        return {
            name: {f"peak_{kind}_mib": round(size / 2**20, 1) for kind, size in sizes.items()}
            for name, sizes in self.peaks.items()
        }


@dataclass
class Timer:
    """Wall time and peak memory per named stage, accumulated across repeated entries."""

    stages: dict[str, float] = field(default_factory=dict)
    memory: _StagePeaks = field(default_factory=_StagePeaks, repr=False)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.memory.enter(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start
            self.memory.leave()

    def rounded(self) -> dict[str, float]:
        return {name: round(seconds, 3) for name, seconds in self.stages.items()}

    def stage_peaks(self) -> dict[str, dict[str, float]]:
        """Peak resident (and CUDA) memory of each stage in MiB, process-wide: the model
        and everything held before the stage count too."""
        return self.memory.mib()
