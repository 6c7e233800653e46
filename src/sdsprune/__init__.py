"""sdsprune: one-shot pruning of causal LMs and the Sparse-Dense-Sparse (SDS) method."""

import os

# OpenMP threads that spin while waiting wreck throughput on a busy machine: measured on
# 2 shared cores, a 576x576 eigendecomposition took 47 s spinning and 0.55 s passive, and
# 50 matmuls 11.8 s vs 4.2 s. Must be set before torch loads; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from sdsprune.api import evaluate_model
from sdsprune.compare import compare
from sdsprune.data import Corpus, load_corpus, sample_calibration
from sdsprune.errors import SdspruneError
from sdsprune.evaluate import PerplexityResult, perplexity
from sdsprune.evaluate.zeroshot import evaluate_tasks
from sdsprune.export import export_checkpoint
from sdsprune.inference import load
from sdsprune.methods import (
    ADMM,
    OWL,
    SDS,
    DSnoT,
    Magnitude,
    PrunerZero,
    SparseGPT,
    Wanda,
    format_method,
    parse_method,
)
from sdsprune.models import LoadedModel, decoder_blocks, load_model
from sdsprune.options import Calibration, RunOptions
from sdsprune.owl import OWLConfig
from sdsprune.prune import PruneResult, prune
from sdsprune.pruners import SparsityPattern
from sdsprune.sds import SDSConfig

__version__ = "0.1.0"

__all__ = [
    "ADMM",
    "OWL",
    "SDS",
    "Calibration",
    "Corpus",
    "DSnoT",
    "LoadedModel",
    "Magnitude",
    "OWLConfig",
    "PerplexityResult",
    "PruneResult",
    "PrunerZero",
    "RunOptions",
    "SDSConfig",
    "SdspruneError",
    "SparseGPT",
    "SparsityPattern",
    "Wanda",
    "compare",
    "decoder_blocks",
    "evaluate_model",
    "evaluate_tasks",
    "export_checkpoint",
    "format_method",
    "load",
    "load_corpus",
    "load_model",
    "parse_method",
    "perplexity",
    "prune",
    "sample_calibration",
]
