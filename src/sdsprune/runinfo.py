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
    """Peak resident memory of this process (and peak CUDA allocation) in MiB."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"peak_rss_mib": round(rss_kib / 1024, 1)}
    if torch.cuda.is_available():
        peak["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


@dataclass
class Timer:
    """Wall time per named stage, accumulated across repeated entries."""

    stages: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start

    def rounded(self) -> dict[str, float]:
        return {name: round(seconds, 3) for name, seconds in self.stages.items()}
