"""Corpora (bundled Wikipedia excerpt, hub corpora, local files), calibration, assets."""

from sdsprune.data.corpora import Corpus, load_corpus, sample_calibration, tokenize

__all__ = ["Corpus", "load_corpus", "sample_calibration", "tokenize"]
