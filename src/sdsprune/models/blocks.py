"""Find the decoder blocks of a causal LM and the linear layers inside them."""

from __future__ import annotations

from torch import nn

from sdsprune.errors import SdspruneError


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """Return the ModuleList of decoder blocks.

    Architectures name it differently (``model.layers``, ``model.decoder.layers``,
    ``transformer.h``), so we search: the longest ModuleList whose entries all hold
    ``nn.Linear`` layers, preferring one with ``num_hidden_layers`` entries.
    """
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        module
        for module in model.modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and all(any(isinstance(m, nn.Linear) for m in block.modules()) for block in module)
    ]
    if not candidates:
        raise SdspruneError("could not find decoder blocks holding nn.Linear layers in this model")
    candidates.sort(key=lambda m: (len(m) == expected, len(m)), reverse=True)
    return candidates[0]


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """All ``nn.Linear`` layers of a block, by their name inside the block, in module order."""
    return {name: mod for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}


def model_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every prunable linear layer of the model, with block-qualified names ``i.name``."""
    return {
        f"{i}.{name}": layer
        for i, block in enumerate(decoder_blocks(model))
        for name, layer in block_linears(block).items()
    }
