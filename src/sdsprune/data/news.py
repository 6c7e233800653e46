"""The bundled ``news`` corpus: 300 ABC news articles (the Lee corpus) from the gensim wheel.

Quality claims must hold on text unlike the Wikipedia calibration data; this is short
Australian news prose from 2001, a different register, and it ships in the same pinned
gensim wheel as ``wiki``. One article per line; even articles form the ``eval`` split (about
37K SmolLM2 tokens), odd ones are shared between ``valid`` (articles 1, 5, 9, ...: where
defaults are chosen) and ``calib`` (3, 7, 11, ...), about 18K tokens each. The corpus itself
repeats a few articles; ``valid`` and ``calib`` leave out any article that is also in
``eval``, so the three splits share no text.
"""

from __future__ import annotations

from sdsprune.data.assets import PinnedFile, WheelMember, fetch_pinned_file

NEWS_FILE = PinnedFile(
    name="lee_background.cor",
    parts=(WheelMember("gensim==4.4.0", "gensim/test/test_data/lee_background.cor"),),
    sha256="5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
)


def news_split(split: str) -> list[str]:
    """Articles of one split (see the module docstring; counted from 0)."""
    lines = fetch_pinned_file(NEWS_FILE).read_text(encoding="utf-8").splitlines()
    articles = [line.strip() for line in lines if line.strip()]
    evaluated = articles[0::2]
    if split == "eval":
        return evaluated
    held_out = set(evaluated)
    first = 1 if split == "valid" else 3
    return [article for article in articles[first::4] if article not in held_out]
