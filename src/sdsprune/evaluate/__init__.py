"""Evaluation: perplexity with the reference protocol."""

from sdsprune.evaluate.perplexity import PerplexityResult, perplexity, perplexity_of_chunks

__all__ = ["PerplexityResult", "perplexity", "perplexity_of_chunks"]
