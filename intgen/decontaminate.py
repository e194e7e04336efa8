"""Decontamination: drop training problems that share an n-gram with an evaluation set.

Text is normalised first (lower case; LaTeX spacing commands and math delimiters removed), then cut into
words: runs of letters and digits, so punctuation, braces and whitespace only separate words. A problem is
contaminated when any `n` consecutive words (default 8) also occur in a problem of the evaluation sets; a
text shorter than `n` words is one n-gram of its own, so a short exact duplicate is still caught.

N-grams are kept as 64-bit hashes in one set (Python's string hash: an index is built and queried in one
process). MATH-500 and IMO-AnswerBench together are about 39,000 hashes, 2.4 MB, checked at about 25,000
training problems a second on one core (bench/decontaminate.py). At 8 words, stock phrases ("where m and n
are relatively prime positive integers") are shared by unrelated problems: the dropped ids are recorded, and
a larger `n` drops fewer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import polars as pl

DEFAULT_N = 8
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad\b|\\(?:displaystyle|left|right|big|Big)\b|~|\$|\\[()\[\]]")
_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    """The words of a text: its runs of letters and digits after normalising case and LaTeX spacing. Punctuation
    and braces are not words: counted as words, LaTeX boilerplate (`} + \\frac { 1 } {`) makes 8-grams that
    unrelated problems share."""
    return _WORD.findall(_SPACING.sub(" ", text.casefold()))


def ngram_hashes(text: str, n: int = DEFAULT_N) -> set[int]:
    tokens = words(text)
    grams = [tokens] if len(tokens) < n else (tokens[i : i + n] for i in range(len(tokens) - n + 1))
    return {hash(" ".join(gram)) for gram in grams if gram}


@dataclass
class NgramIndex:
    """The n-grams of evaluation problems, as hashes."""

    n: int = DEFAULT_N
    hashes: set[int] = field(default_factory=set)

    def add(self, texts: Iterable[str]) -> None:
        for text in texts:
            self.hashes |= ngram_hashes(text, self.n)

    def contaminated(self, text: str) -> bool:
        return not self.hashes.isdisjoint(ngram_hashes(text, self.n))


def drop_contaminated(problems: pl.DataFrame, index: NgramIndex) -> tuple[pl.DataFrame, list[str]]:
    """The problems that share no n-gram with the index, and the ids of those dropped."""
    hit = pl.Series([index.contaminated(text) for text in problems["problem"]], dtype=pl.Boolean)
    return problems.filter(~hit), problems.filter(hit)["problem_id"].to_list()
