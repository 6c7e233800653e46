"""What is written next to every output: configuration, versions, timings, memory."""

from __future__ import annotations

import contextlib
import platform
import resource
import sys
import threading
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


def peak_memory(device: torch.device | str | None = None) -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation) in MiB, over the
    process's life: the stage meters reset CUDA's peak counter and fold what it had seen into
    ``_CUDA_PEAK`` first.

    ``device``: the CUDA device to read; None reads the current one, which a run makes its
    compute device (``distributed_from_env``: with ``--device cuda:1`` device 0 holds
    nothing); a CPU device reads no CUDA peak at all.
    """
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"peak_rss_mib": round(rss_kib / 1024, 1)}
    cuda_device = _cuda_device(device) if torch.cuda.is_available() else None
    if cuda_device is not None:
        cuda = max(torch.cuda.max_memory_allocated(cuda_device), _CUDA_PEAK.get(cuda_device, 0))
        peak["peak_cuda_mib"] = round(cuda / 2**20, 1)
    return peak


_CUDA_PEAK: dict[int, int] = {}  # per device: bytes its counter saw before a meter reset it
_STATUS = Path("/proc/self/status")
SAMPLE_SECONDS = 0.005


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux; None elsewhere)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cuda_active() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _cuda_device(device: torch.device | str | None) -> int | None:
    """The index of the CUDA device a reading is of: ``device``'s, the current device's when
    ``device`` is None or names no index; None for a non-CUDA device. Call it only where CUDA
    is available (it asks for the current device)."""
    if device is not None and torch.device(device).type != "cuda":
        return None
    index = None if device is None else torch.device(device).index
    return torch.cuda.current_device() if index is None else index


class _StagePeaks:
    """Peak memory of each named stage (the max over its entries), nested stages included.

    The memory plan's estimates are per stage of a block (statistics pass, solve, re-fit);
    a whole-run peak does not say which one a wrong estimate belongs to. Resident memory is
    sampled every ``SAMPLE_SECONDS`` by a thread while a stage is open (the kernel's
    high-water mark could be reset per stage instead, but that is process state the caller's
    ``getrusage`` and ``/usr/bin/time`` read); allocations this size take longer than that
    to fill. CUDA's peak counter (of the current device: a run makes its compute device the
    current one, see ``distributed_from_env``) is reset on entry, the usual way, its value
    folded first.
    """

    def __init__(self) -> None:
        self.peaks: dict[str, dict[str, int]] = {}
        self.open: list[str] = []
        self.lock = threading.Lock()
        self.stop: threading.Event | None = None
        self.sampler: threading.Thread | None = None

    def enter(self, name: str) -> None:
        self._fold_cuda()
        with self.lock:
            self.open.append(name)
        sampled = self._sample()
        cuda_device = self._cuda_device()
        if cuda_device is not None:
            torch.cuda.reset_peak_memory_stats(cuda_device)
            # what is already allocated as the stage begins: its peak less this is what the
            # stage itself added, the figure a memory plan for it is checked against
            self._record("entry_cuda", torch.cuda.memory_allocated(cuda_device), [name])
        if self.sampler is None and sampled:
            self.stop = threading.Event()
            self.sampler = threading.Thread(target=self._run, daemon=True, name="stage-memory")
            self.sampler.start()

    def leave(self) -> None:
        self._sample()
        self._fold_cuda()
        with self.lock:
            self.open.pop()
            last = not self.open
        if last and self.sampler is not None:
            self.stop.set()
            self.sampler.join()
            self.sampler = None

    def _run(self) -> None:
        while not self.stop.wait(SAMPLE_SECONDS):
            self._sample()

    def _sample(self) -> bool:
        """Record the resident memory now; False where it cannot be read."""
        size = resident_bytes()
        if size is not None:
            self._record("rss", size)
        return size is not None

    def _cuda_device(self) -> int | None:
        """The CUDA device this meter reads (the current one), None when CUDA has not started
        (asking would start it)."""
        return _cuda_device(None) if _cuda_active() else None

    def _fold_cuda(self) -> None:
        cuda_device = self._cuda_device()
        if cuda_device is not None:
            size = torch.cuda.max_memory_allocated(cuda_device)
            _CUDA_PEAK[cuda_device] = max(_CUDA_PEAK.get(cuda_device, 0), size)
            self._record("cuda", size)

    def _record(self, kind: str, size: int, stages: list[str] | None = None) -> None:
        """The largest ``size`` of ``kind`` seen in ``stages`` (default: every open one)."""
        with self.lock:
            for name in self.open if stages is None else stages:
                stage = self.peaks.setdefault(name, {})
                stage[kind] = max(stage.get(kind, 0), size)

    def mib(self) -> dict[str, dict[str, float]]:
        with self.lock:
            return {
                name: {_mib_key(kind): round(size / 2**20, 1) for kind, size in sizes.items()}
                for name, sizes in self.peaks.items()
            }


def _mib_key(kind: str) -> str:
    """The report's key of a stage reading: ``entry_cuda_mib``, else ``peak_<kind>_mib``."""
    return f"{kind}_mib" if kind.startswith("entry_") else f"peak_{kind}_mib"


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
