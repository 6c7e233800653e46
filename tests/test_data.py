import json

import pytest
import torch

from sdsprune import SdspruneError, load_corpus, sample_calibration
from sdsprune.data.wiki import clean_article

SPLIT_NAMES = ("calib", "valid", "eval")


@pytest.mark.parametrize("name", ["wiki", "news"])
def test_the_three_splits_share_no_text(name):
    splits = {split: load_corpus(name, split) for split in SPLIT_NAMES}
    for first, second in (("calib", "valid"), ("calib", "eval"), ("valid", "eval")):
        assert not set(splits[first].documents) & set(splits[second].documents), (first, second)
    assert all(len(splits[split].text.split()) > 10_000 for split in SPLIT_NAMES)
    assert load_corpus(name, "eval").text == splits["eval"].text  # deterministic


def test_wiki_validation_takes_the_end_of_the_even_articles_not_what_eval_scores():
    """The evaluation protocols score the start of ``eval``; ``valid`` is carved from its end,
    so those numbers are the ones they were before ``valid`` existed."""
    from sdsprune.data.wiki import VALID_ARTICLES, split_articles

    articles = [f"article {i}" for i in range(102)]
    parts = split_articles(articles)
    assert parts["calib"] == articles[1::2]
    assert parts["eval"] + parts["valid"] == articles[0::2]
    assert len(parts["valid"]) == VALID_ARTICLES
    calib, valid, evaluation = (load_corpus("wiki", split) for split in SPLIT_NAMES)
    assert (len(calib.documents), len(valid.documents), len(evaluation.documents)) == (51, 17, 34)
    assert 130_000 < len(evaluation.text.split()) < 180_000


def test_a_spec_can_name_its_split():
    valid = load_corpus("wiki:valid")  # what eval and compare ask for: "eval" by default
    assert valid.name == "wiki:valid" and valid.split == "valid"
    assert valid.text == load_corpus("wiki", "valid").text
    assert load_corpus("news:valid", "calib").documents == load_corpus("news", "valid").documents
    with pytest.raises(SdspruneError, match="unknown split 'test'"):
        load_corpus("wiki:test")
    with pytest.raises(SdspruneError, match="wiki:valid or news:valid"):
        load_corpus("c4:valid")


def test_news_splits_alternate_the_articles_of_the_lee_corpus():
    calib, valid, evaluation = (load_corpus("news", split) for split in SPLIT_NAMES)
    assert len(evaluation.documents) == 150
    assert len(valid.documents) + len(calib.documents) == 148  # 2 repeat eval articles
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
