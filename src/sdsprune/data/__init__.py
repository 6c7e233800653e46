"""Corpora (bundled Wikipedia excerpt, hub corpora, local files), calibration, assets."""

from sdsprune.data.corpora import (
    DEFAULT_CALIB,
    DEFAULT_CALIB_SEED,
    DEFAULT_CALIB_SEQLEN,
    DEFAULT_NSAMPLES,
    Corpus,
    load_corpus,
    sample_calibration,
    tokenize,
)

__all__ = [
    "DEFAULT_CALIB",
    "DEFAULT_CALIB_SEED",
    "DEFAULT_CALIB_SEQLEN",
    "DEFAULT_NSAMPLES",
    "Corpus",
    "load_corpus",
    "sample_calibration",
    "tokenize",
]
