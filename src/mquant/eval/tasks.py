"""Evaluation tasks: a deterministic test-sample generator plus the metric that scores answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from mquant.eval import metrics
from mquant.samples import Sample


def _mean_score(score: Callable[[str, list[str]], float]):
    def aggregate(predictions: list[str], samples: list[Sample]) -> dict:
        values = [score(p, s.answers) for p, s in zip(predictions, samples)]
        return {"score": sum(values) / len(values)}

    return aggregate


def _option_aggregate(predictions: list[str], samples: list[Sample]) -> dict:
    """Option accuracy with each sample's `meta["choices"]` (letter -> text), so an answer that gives
    the option's text instead of its letter is read as VLMEvalKit reads it."""
    values = [metrics.option_accuracy(p, s.answers, s.meta.get("choices")) for p, s in zip(predictions, samples)]
    return {"score": sum(values) / len(values)}


def _mme_aggregate(predictions: list[str], samples: list[Sample]) -> dict:
    """MME-style: score = (acc + acc+) / 2, the 0-1 version of MME's acc + acc+ (max 200)."""
    s = metrics.mme_scores(predictions, [x.answers[0] for x in samples], [x.meta["image"] for x in samples])
    return {"score": (s["acc"] + s["acc_plus"]) / 2, **s}


@dataclass(frozen=True)
class Task:
    name: str
    metric: str
    make_samples: Callable[[int], list[Sample]]  # limit -> the first `limit` test samples
    aggregate: Callable[[list[str], list[Sample]], dict]  # -> {"score": float, ...extras}
    max_new_tokens: int = 8
    default_limit: int = 200
    description: str = field(default="", compare=False)


METRICS = {
    "exact_match": _mean_score(metrics.exact_match),
    "vqa_accuracy": _mean_score(metrics.vqa_accuracy),
    "anls": _mean_score(metrics.anls),
    "option_accuracy": _option_aggregate,
    "ocrbench": _mean_score(metrics.ocrbench_match),
    "mme": _mme_aggregate,
}
