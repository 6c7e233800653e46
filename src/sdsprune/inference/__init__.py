"""Sparse inference: load any checkpoint and run its pruned layers with sparse kernels."""

from sdsprune.inference.backends import (
    BACKENDS,
    BackendReport,
    LayerChoice,
    apply_backend,
    available_kernels,
    backend_report,
    weight_bytes,
)
from sdsprune.inference.loader import load

__all__ = [
    "BACKENDS",
    "BackendReport",
    "LayerChoice",
    "apply_backend",
    "available_kernels",
    "backend_report",
    "load",
    "weight_bytes",
]
