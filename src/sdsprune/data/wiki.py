"""The bundled ``wiki`` corpus: 102 real Wikipedia articles from the gensim wheel.

Defined once (protocol.md) so that perplexities stay comparable across changes: odd
kept articles form the ``calib`` split, even ones the ``eval`` split, except the last
``VALID_ARTICLES`` even ones, which form the ``valid`` split (where defaults are chosen);
the three are disjoint by article. The evaluation protocols read the first 20-40 chunks of
1024 tokens of ``eval``, which lie in its first four articles, so ``valid`` takes none of
the text they score.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sdsprune.data.assets import PinnedFile, WheelMember, assets_dir

WIKI_DUMP = PinnedFile(
    name="enwiki-shortened.xml.bz2",
    parts=(
        WheelMember(
            "gensim==4.4.0",
            "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        ),
    ),
    sha256="a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
)

WIKI_SPLITS = ("calib", "valid", "eval")
VALID_ARTICLES = 17  # of the 51 even articles: about 100K SmolLM2 tokens
_APOSTROPHES = re.compile(r"'{2,}")
_SKIPPED_LINE_STARTS = ("|", "!", "{", "}")


def wiki_split(split: str) -> list[str]:
    """Articles of one split, cleaned; the cleaned text is cached next to the dump."""
    from sdsprune.data.assets import fetch_pinned_file

    cached = assets_dir() / f"wiki.{split}.txt"
    if not cached.exists():
        for name, part in split_articles(clean_articles(fetch_pinned_file(WIKI_DUMP))).items():
            tmp = cached.with_name(f".wiki.{name}.tmp")
            tmp.write_text("\f".join(part), encoding="utf-8")
            os.replace(tmp, cached.with_name(f"wiki.{name}.txt"))
    return cached.read_text(encoding="utf-8").split("\f")


def split_articles(articles: list[str]) -> dict[str, list[str]]:
    """calib: odd articles; eval: even ones but the last VALID_ARTICLES; valid: those."""
    even = articles[0::2]
    return {
        "calib": articles[1::2],
        "valid": even[-VALID_ARTICLES:],
        "eval": even[:-VALID_ARTICLES],
    }


def clean_articles(dump: Path) -> list[str]:
    """Apply the protocol's cleaning to every main-namespace page of the dump."""
    import bz2

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(dump, "rb") as handle:
        for _title, text, _pageid in extract_pages(handle, filter_namespaces=("0",)):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            article = clean_article(filter_wiki(text))
            if len(article.split()) > 200:
                articles.append(article)
    return articles


def clean_article(text: str) -> str:
    text = _APOSTROPHES.sub("", text)
    lines = (line.strip() for line in text.splitlines())
    kept = [ln for ln in lines if len(ln.split()) >= 5 and not ln.startswith(_SKIPPED_LINE_STARTS)]
    return "\n".join(kept)
