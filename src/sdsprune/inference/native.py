"""Building this package's C++ CPU kernels (AVX-512 or AVX2), once, on first use.

Each kernel (:mod:`~sdsprune.inference.nm24`, :mod:`~sdsprune.inference.bitmask`) is one
C++ source compiled with ``torch.utils.cpp_extension.load_inline`` for the code path of
torch's CPU capability, so ``ATEN_CPU_CAPABILITY=avx2`` also selects the AVX2 path on an
AVX-512 machine (how the tests exercise it). Anything that prevents a build (no compiler,
neither AVX-512 nor AVX2, a compiler error) is returned as a reason string, never raised:
the layers then stay dense and the backend report says why.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import nn

log = logging.getLogger(__name__)

# Compiler flags per torch CPU capability; each source picks its code path from them.
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mpopcnt"],
    "AVX2": ["-mavx2", "-mfma", "-mpopcnt"],
}


VALUE_DTYPES = (torch.float32, torch.bfloat16)  # what the kernels store and read


def dtype_problem(kernel: str, linear: nn.Linear) -> str | None:
    """Why a layer's weight is not one the compiled kernels read (None when it is)."""
    weight = linear.weight
    if weight.device.type != "cpu" or weight.dtype not in VALUE_DTYPES:
        return f"{kernel} is a CPU kernel for float32 and bfloat16 weights"
    return None


def build_problem(ext: ModuleType | str) -> str | None:
    """The reason a build failed (None when it succeeded)."""
    return ext if isinstance(ext, str) else None


def cpu_capability() -> str:
    """torch's view of the CPU's vector instructions ("AVX512", "AVX2", "DEFAULT", ...)."""
    return torch.backends.cpu.get_cpu_capability()


def has_compiler() -> bool:
    return shutil.which("c++") is not None or shutil.which("g++") is not None


def build(kernel: str, source: str, functions: Sequence[str]) -> ModuleType | str:
    """The compiled ``source`` for this CPU, or a string saying why it is unavailable."""
    capability = cpu_capability()
    flags = ISA_FLAGS.get(capability)
    if flags is None:
        return f"{kernel} needs AVX2 or AVX-512 (this CPU: {capability})"
    if not has_compiler():
        return f"{kernel} needs a C++ compiler to build its kernel"
    try:
        from torch.utils.cpp_extension import load_inline

        log.info("building the %s CPU kernel for %s (once, about a minute)", kernel, capability)
        return load_inline(
            f"sdsprune_{kernel}_{capability.lower()}",
            cpp_sources=source,
            functions=list(functions),
            extra_cflags=["-O3", *flags, "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:  # compiler errors come in many types
        return f"{kernel} kernel failed to build: {str(exc).splitlines()[0][:200]}"


class NativeLinear(nn.Module):
    """Base of the layers served by a compiled kernel: the layer's shape, its bias (shared,
    not copied) and the extension, which must have built (else the reason is raised)."""

    def __init__(self, linear: nn.Linear, ext: ModuleType | str) -> None:
        super().__init__()
        if isinstance(ext, str):
            raise RuntimeError(ext)
        self._ext = ext
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.bias = linear.bias
