"""Model loading (aliases, folders, GGUF, hub ids) and decoder-block discovery."""

from sdsprune.models.aliases import ALIASES, DEFAULT_MODEL
from sdsprune.models.blocks import block_linears, decoder_blocks, model_linears
from sdsprune.models.loading import LoadedModel, load_model, resolve_model_folder

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "LoadedModel",
    "block_linears",
    "decoder_blocks",
    "load_model",
    "model_linears",
    "resolve_model_folder",
]
