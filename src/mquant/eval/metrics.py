"""Answer metrics, each a function (prediction, reference answers) -> score in [0, 1]."""

from __future__ import annotations

import re


def normalize(text: str) -> str:
    """Lower-case, trim, collapse whitespace and drop a trailing period."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


def exact_match(prediction: str, answers: list[str]) -> float:
    p = normalize(prediction)
    return float(any(p == normalize(a) for a in answers))
