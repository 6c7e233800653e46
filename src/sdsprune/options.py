"""The settings of a :func:`sdsprune.prune` call that are not the method's: which
calibration windows it prunes with, and how and where it runs.

Each group is one typed object, so a call names what it changes and nothing else, and the
defaults live here once (the method's own settings are in :mod:`sdsprune.methods`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdsprune.data import DEFAULT_CALIB, DEFAULT_CALIB_SEED, DEFAULT_CALIB_SEQLEN, DEFAULT_NSAMPLES

OFFLOAD_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class Calibration:
    """Where the calibration windows come from: ``nsamples`` windows of ``seqlen`` tokens
    sampled from ``corpus`` with ``seed``, or ``windows`` (windows x seqlen token ids) given
    as they are, so that several methods can be compared on exactly the same windows."""

    corpus: str = DEFAULT_CALIB
    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int = DEFAULT_CALIB_SEQLEN
    seed: int = DEFAULT_CALIB_SEED
    windows: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, value: Calibration | torch.Tensor | None) -> Calibration:
        """A calibration as given; a tensor is its windows, None the default sampling."""
        if value is None:
            return cls()
        return cls(windows=value) if isinstance(value, torch.Tensor) else value


@dataclass(frozen=True)
class RunOptions:
    """How and where a run happens, and what it writes.

    ``device`` and ``dtype``: ``auto`` is the GPU when there is one, and float32 on CPU,
    bfloat16 on GPU. ``out`` saves the pruned checkpoint and its report (``overwrite``
    replaces an existing folder). ``evaluate`` names corpora whose perplexity is measured
    afterwards, in chunks of ``eval_seqlen`` tokens (default: the calibration's) and at most
    ``max_chunks`` of them. ``low_memory`` keeps only one block's weights in memory (needs
    ``out``); ``state_dir`` saves the state after every block and ``resume`` continues from
    it. ``measure_errors=False`` leaves Wanda's and magnitude's per-layer output errors out of
    the report (they cost ~20% of those methods' time; methods with a Gram matrix get them
    almost free). ``offload_activations`` (``auto``, ``on``, ``off``) keeps the calibration
    activations in CPU memory and moves one batch at a time to the device; ``auto`` does so
    when the memory plan says the device would not hold them.
    """

    device: str = "auto"
    dtype: str = "auto"
    out: str | Path | None = None
    overwrite: bool = False
    evaluate: tuple[str, ...] = ()
    eval_seqlen: int | None = None
    max_chunks: int | None = None
    progress: bool = True
    low_memory: bool = False
    state_dir: str | Path | None = None
    resume: bool = False
    measure_errors: bool = True
    offload_activations: str = "auto"
