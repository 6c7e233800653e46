"""sdsprune: one-shot pruning of causal LMs and the Sparse-Dense-Sparse (SDS) method."""

from sdsprune.api import evaluate_model
from sdsprune.compare import compare
from sdsprune.data import Corpus, load_corpus, sample_calibration
from sdsprune.errors import SdspruneError
from sdsprune.evaluate import PerplexityResult, perplexity
from sdsprune.evaluate.zeroshot import evaluate_tasks
from sdsprune.export import export_checkpoint
from sdsprune.inference import load
from sdsprune.models import LoadedModel, decoder_blocks, load_model

__version__ = "0.1.0"

__all__ = [
    "Corpus",
    "LoadedModel",
    "PerplexityResult",
    "SdspruneError",
    "compare",
    "decoder_blocks",
    "evaluate_model",
    "evaluate_tasks",
    "export_checkpoint",
    "load",
    "load_corpus",
    "load_model",
    "perplexity",
    "sample_calibration",
]
