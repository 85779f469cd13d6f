"""Judges score responses; the preferences stage labels pairs with one, the evaluate stage reports it as gold.

A judge is anything with ``score(prompts, responses) -> list[float]`` (higher is better). Register a new one
in :data:`JUDGES` and name it in the spec's ``judge.type``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol


class Judge(Protocol):
    name: str

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...


class VaderJudge:
    """VADER sentiment (compound score in [-1, 1]) of the response: the demo's stand-in for human labellers."""

    name = "vader"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [float(self._analyzer.polarity_scores(r)["compound"]) for r in responses]


JUDGES: dict[str, Callable[[], Judge]] = {"vader": VaderJudge}


def make_judge(kind: str) -> Judge:
    return JUDGES[kind]()
