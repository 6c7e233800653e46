"""Text corpora for calibration and evaluation, with the field's reference protocols."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdsprune.data.news import news_split
from sdsprune.data.wiki import wiki_split
from sdsprune.errors import SdspruneError

HUB_CORPORA = ("wikitext2", "ptb", "c4")
SPLITS = ("calib", "valid", "eval")
BUNDLED_CORPORA = ("wiki", "news")
# What prune, compare and their commands calibrate on unless told otherwise: SparseGPT's and
# Wanda's 128 windows of 2048 tokens, sampled with seed 0 from the bundled Wikipedia excerpt.
DEFAULT_CALIB = "wiki"
DEFAULT_NSAMPLES = 128
DEFAULT_CALIB_SEQLEN = 2048
DEFAULT_CALIB_SEED = 0


@dataclass
class Corpus:
    """Documents plus the rules the reference code applies to them.

    ``joiner`` is how documents become one evaluation stream; ``sample_by_document`` selects
    C4-style calibration (draw a long enough document, then a window inside it) instead of
    windows of the joined stream; ``eval_chunk_cap`` reproduces C4's 256-chunk evaluation.
    """

    name: str
    split: str
    documents: list[str]
    joiner: str = "\n\n"
    sample_by_document: bool = False
    eval_chunk_cap: int | None = None
    _text: str | None = field(default=None, repr=False)

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.joiner.join(self.documents)
        return self._text


def load_corpus(spec: str, split: str = "eval") -> Corpus:
    """Load ``wiki``, ``news``, ``wikitext2``, ``ptb``, ``c4`` or a local ``.txt``/``.jsonl`` file.

    ``split`` is ``calib`` (training/calibration text), ``valid`` (held-out text for choosing
    settings) or ``eval`` (held-out text for reporting); a local file is used whole for any.
    A spec ``name:split`` (``wiki:valid``, ``news:valid``, ``wikitext2:valid``) names a split
    itself, whatever ``split`` asks, so any command that evaluates on a corpus can evaluate
    on the validation split; the corpus then carries that name in every report.
    """
    name, split = split_spec(spec, split)
    if split not in SPLITS:
        raise SdspruneError(f"unknown split '{split}' (use {', '.join(SPLITS)})")
    if name == "wiki":
        corpus = Corpus(spec, split, wiki_split(split))
    elif name == "news":
        corpus = Corpus(spec, split, news_split(split))
    elif name in HUB_CORPORA:
        corpus = _hub_corpus(name, split)
        corpus.name = spec
    else:
        corpus = _file_corpus(Path(spec).expanduser(), split)
    if not corpus.text.strip():
        raise SdspruneError(f"corpus '{spec}' ({split}) is empty")
    return corpus


def split_spec(spec: str, split: str) -> tuple[str, str]:
    """(corpus name, split) of a spec: ``wiki:valid`` -> (wiki, valid); a plain name (or a
    file path) keeps ``split``."""
    name, _, suffix = spec.rpartition(":")
    if name in (*BUNDLED_CORPORA, *HUB_CORPORA):
        return name, suffix
    return spec, split


def _file_corpus(path: Path, split: str) -> Corpus:
    if not path.exists():
        known = ", ".join(("wiki", "news", *HUB_CORPORA))
        raise SdspruneError(f"unknown corpus '{path}': not {known} and no such file")
    if path.suffix not in (".txt", ".jsonl"):
        raise SdspruneError(f"corpus file {path} must be .txt or .jsonl (with a 'text' field)")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SdspruneError(f"cannot read corpus file {path}: {exc}") from exc
    if path.suffix == ".txt":
        return Corpus(str(path), split, [raw])
    return Corpus(str(path), split, _jsonl_texts(path, raw))


def _jsonl_texts(path: Path, raw: str) -> list[str]:
    texts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SdspruneError(f"{path}:{number}: not a JSON object with a 'text' field") from exc
        if not isinstance(text, str):
            raise SdspruneError(
                f"{path}:{number}: 'text' is {type(text).__name__}, not a string of text"
            )
        texts.append(text)
    return texts


def _hub_corpus(name: str, split: str) -> Corpus:
    """The reference loaders of SparseGPT/Wanda, through ``datasets``."""
    try:
        from datasets import load_dataset

        from sdsprune.hub import go_offline_unless_reachable

        go_offline_unless_reachable()

        hub_split = {"calib": "train", "valid": "validation", "eval": "test"}[split]
        if name == "wikitext2":
            data = load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)
            return Corpus(name, split, list(data["text"]), joiner="\n\n")
        if name == "ptb":
            data = load_dataset("ptb_text_only", "penn_treebank", split=hub_split)
            return Corpus(name, split, list(data["sentence"]), joiner=" ")
        if split == "valid":
            raise SdspruneError(
                "c4's evaluation already reads its validation shard: choose settings on "
                "wiki:valid or news:valid"
            )
        shard = (
            {"train": "en/c4-train.00000-of-01024.json.gz"}
            if split == "calib"
            else {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        )
        data = load_dataset("allenai/c4", data_files=shard, split=next(iter(shard)))
        if split == "calib":
            return Corpus(name, split, list(data["text"]), joiner=" ", sample_by_document=True)
        return Corpus(name, split, list(data[:1100]["text"]), joiner=" ", eval_chunk_cap=256)
    except SdspruneError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SdspruneError(
            f"could not load corpus '{name}' through datasets (needs the Hugging Face hub or a "
            f"datasets cache; offline?): {first}"
        ) from exc


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as one 1-D tensor, the way the reference code tokenizes."""
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]


def sample_calibration(
    corpus: Corpus, tokenizer, nsamples: int, seqlen: int, seed: int = DEFAULT_CALIB_SEED
) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens, seeded like the reference loaders."""
    if nsamples < 1 or seqlen < 2:
        raise SdspruneError("calibration needs nsamples >= 1 and seqlen >= 2")
    rng = random.Random(seed)
    if corpus.sample_by_document:
        return torch.stack(
            [_document_window(corpus, tokenizer, seqlen, rng) for _ in range(nsamples)]
        )
    ids = tokenize(tokenizer, corpus.text)
    if ids.numel() < nsamples * seqlen:
        raise SdspruneError(
            f"calibration corpus '{corpus.name}' has {ids.numel()} tokens, fewer than "
            f"nsamples x seqlen = {nsamples} x {seqlen} = {nsamples * seqlen}"
        )
    if ids.numel() <= seqlen:  # a window starts before the last seqlen + 1 tokens
        raise SdspruneError(
            f"calibration corpus '{corpus.name}' has {ids.numel()} tokens; it needs more "
            f"than one window of {seqlen}"
        )
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[i : i + seqlen] for i in starts])


def _document_window(corpus: Corpus, tokenizer, seqlen: int, rng: random.Random) -> torch.Tensor:
    for _attempt in range(100_000):
        doc = corpus.documents[rng.randint(0, len(corpus.documents) - 1)]
        ids = tokenize(tokenizer, doc)
        if ids.numel() > seqlen:
            start = rng.randint(0, ids.numel() - seqlen - 1)
            return ids[start : start + seqlen]
    raise SdspruneError(f"no document in '{corpus.name}' is longer than {seqlen} tokens")
