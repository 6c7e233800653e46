"""Llama-3-8B's block shapes, for the benchmarks and tests that need a model that size.

The benchmarks import it as a sibling module, tests/test_memory.py by path.
"""

from __future__ import annotations

# hidden 4096, MLP 14336, grouped-query attention: 32 query heads, 8 key/value heads of 128
LLAMA_3_8B_SHAPES = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}


def llama_3_8b_config(**settings):
    """A Llama config with Llama-3-8B's block shapes; ``settings`` gives what each use
    chooses for itself (blocks, vocabulary, context length)."""
    from transformers import AutoConfig

    return AutoConfig.for_model("llama", **LLAMA_3_8B_SHAPES, **settings)
