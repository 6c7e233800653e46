import json

import pytest
import torch

from sdsprune import SdspruneError, load_corpus, sample_calibration
from sdsprune.data.wiki import clean_article


def test_wiki_splits_are_disjoint_and_deterministic():
    calib = load_corpus("wiki", "calib")
    evaluation = load_corpus("wiki", "eval")
    assert len(calib.documents) == 51 and len(evaluation.documents) == 51
    assert not set(calib.documents) & set(evaluation.documents)
    assert 200_000 < len(evaluation.text.split()) < 260_000
    assert load_corpus("wiki", "eval").text == evaluation.text


def test_news_splits_alternate_the_articles_of_the_lee_corpus():
    calib = load_corpus("news", "calib")
    evaluation = load_corpus("news", "eval")
    assert len(calib.documents) == 150 and len(evaluation.documents) == 150
    assert len(set(calib.documents) & set(evaluation.documents)) == 2  # the corpus repeats some
    assert evaluation.documents[0].startswith("Hundreds of people have been forced to vacate")
    assert 25_000 < len(evaluation.text.split()) < 35_000


def test_clean_article_rules():
    text = "'''Bold''' words are here and more\n| a table row with many words\nshort line\n"
    assert clean_article(text) == "Bold words are here and more"


def test_local_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world")
    assert load_corpus(str(txt)).text == "hello world"
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in ("one", "two")) + "\n")
    assert load_corpus(str(jsonl)).documents == ["one", "two"]


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("   \n", ".txt", "is empty"),
        ('{"nope": 1}\n', ".jsonl", "'text' field"),
        ("x", ".csv", ".txt or .jsonl"),
    ],
)
def test_bad_local_files(tmp_path, content, suffix, message):
    path = tmp_path / f"corpus{suffix}"
    path.write_text(content)
    with pytest.raises(SdspruneError, match=message):
        load_corpus(str(path))


def test_unknown_corpus():
    with pytest.raises(SdspruneError, match="unknown corpus"):
        load_corpus("no-such-corpus")


def test_calibration_windows_are_seeded(tokenizer, tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    corpus = load_corpus(str(path), "calib")
    first = sample_calibration(corpus, tokenizer, nsamples=8, seqlen=32, seed=0)
    again = sample_calibration(corpus, tokenizer, nsamples=8, seqlen=32, seed=0)
    other = sample_calibration(corpus, tokenizer, nsamples=8, seqlen=32, seed=1)
    assert first.shape == (8, 32) and first.dtype == torch.long
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_calibration_needs_enough_text(tokenizer, tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("tiny text " * 10)
    corpus = load_corpus(str(path), "calib")
    with pytest.raises(SdspruneError, match="fewer than"):
        sample_calibration(corpus, tokenizer, nsamples=16, seqlen=64)
