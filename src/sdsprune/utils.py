"""Small helpers shared across the package: devices, dtypes, the cache folder."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from sdsprune.errors import SdspruneError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn 'auto'/'cpu'/'cuda[:i]' into a device, failing clearly if CUDA is absent."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SdspruneError(f"device '{device}' requested but CUDA is not available here")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise SdspruneError(f"unknown device '{device}' (use cpu, cuda or auto)") from exc


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """float32 on CPU by default (half precision matmuls are slow there), bfloat16 on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise SdspruneError(f"unknown dtype '{dtype}' (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def cache_dir() -> Path:
    """Where fetched assets and converted checkpoints live (``SDSPRUNE_CACHE`` overrides)."""
    root = os.environ.get("SDSPRUNE_CACHE") or Path.home() / ".cache" / "sdsprune"
    return Path(root)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run a block on ``count`` intra-op threads (None: leave them) and restore the caller's
    count, because float reductions, and so results bit for bit, depend on it."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def single_threaded() -> contextlib.AbstractContextManager[None]:
    """Run a loop of many small tensor ops on one thread.

    Measured here: SparseGPT's column loop on a 1536 x 576 layer takes 0.11 s on one
    thread and 1-5 s on two threads of a busy 2-core machine (OpenMP synchronisation per
    tiny op dominates). Big matmuls elsewhere keep all threads.
    """
    return torch_threads(1)


def cache_keyword(model) -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache``; accept both."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(out) -> object:
    """The attention cache a forward pass returned, under either name."""
    return out.get("cache", None) or out.get("past_key_values", None)
