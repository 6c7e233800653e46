"""The bundled ``news`` corpus: 300 ABC news articles (the Lee corpus) from the gensim wheel.

Quality claims must hold on text unlike the Wikipedia calibration data; this is short
Australian news prose from 2001, a different register, and it ships in the same pinned
gensim wheel as ``wiki``. One article per line; odd articles form the ``calib`` split, even
ones the ``eval`` split (about 37K SmolLM2 tokens each), as for ``wiki``. The corpus itself
repeats a few articles (2 land in both splits): it is meant for evaluation, with calibration
on another corpus, so the splits are kept as the file orders them.
"""

from __future__ import annotations

from sdsprune.data.assets import PinnedFile, WheelMember, fetch_pinned_file

NEWS_FILE = PinnedFile(
    name="lee_background.cor",
    parts=(WheelMember("gensim==4.4.0", "gensim/test/test_data/lee_background.cor"),),
    sha256="5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
)


def news_split(split: str) -> list[str]:
    """Articles of one split (odd -> calib, even -> eval, counted from 0)."""
    lines = fetch_pinned_file(NEWS_FILE).read_text(encoding="utf-8").splitlines()
    articles = [line.strip() for line in lines if line.strip()]
    return articles[1 if split == "calib" else 0 :: 2]
