"""Accuracy of a model per question kind of the built-in benchmark (calib split), to see what it fails.

    python benchmarks/question_kinds.py [MODEL_DIR] [--n 96]

The benchmark's scores average kinds that a model learns at very different speeds (reading a word
or a 4-digit number; "is there a ..." or "is the shape closest to the top red"); this splits
`textread`, `yesno` and `choice` by kind. For `yesno` it also says how often what the embedded
model says it saw beside its yes or no ("there are 3 shapes, so no", "red square, blue circle, so no")
is true, and how often the yes or no is right when it is: wrong seeing and wrong comparing apart.
"""

from __future__ import annotations

import argparse
import collections

import torch

from mquant.eval.metrics import parse_option, parse_yes_no
from mquant.eval.runner import BATCH
from mquant.models.vlm import load_pretrained
from mquant.zoo import EMBEDDED_MODEL, benchmark

KINDS = {"yesno": (("exists", "Is there"), ("count", "exactly"), ("topmost", "closest to the top")),
         "choice": (("count", "How many"), ("colour", "What color"), ("topmost", "closest to the top"))}


def kind(task: str, sample) -> str:
    if task == "textread":
        text = sample.answers[0]
        return "word" if text.isalpha() else f"number, {len(text)} digits"
    return next(name for name, words in KINDS[task] if words in sample.text)


def _seen(answer: str) -> str:
    """What a yes/no training-form answer says it saw: the part before ", so yes/no"."""
    return answer.strip().rpartition(", so ")[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=str(EMBEDDED_MODEL))
    p.add_argument("--n", type=int, default=96, help="questions per task (default 96)")
    args = p.parse_args()
    vlm = load_pretrained(args.model)
    rows = collections.defaultdict(lambda: collections.Counter())
    for task in ("textread", "yesno", "choice"):
        samples = benchmark.generate(task, "calib", args.n)
        with torch.no_grad():
            # Long enough for the whole training-form answer.
            predictions = [p for k in range(0, len(samples), BATCH) for p in vlm.generate(samples[k : k + BATCH], 24)]
        for sample, prediction in zip(samples, predictions):
            row = rows[(task, kind(task, sample))]
            row["n"] += 1
            truth = sample.answers[0]
            if task == "textread":
                row["right"] += prediction.strip().lower() == truth.lower()
            elif task == "yesno":
                row["right"] += parse_yes_no(prediction) == truth
                seen = _seen(prediction) == _seen(benchmark.training_form(sample).answers[0])
                row["seen right"] += seen
                row["right, seen right"] += seen and parse_yes_no(prediction) == truth
            else:
                row["right"] += parse_option(prediction, sample.meta["choices"]) == truth
    print(f"{'task':10} {'kind':20} {'n':>4} {'right':>6} {'seen right':>11} {'right when seen right':>22}")
    for (task, name), row in sorted(rows.items()):
        extra = ""
        if task == "yesno":
            given = row["right, seen right"] / row["seen right"] if row["seen right"] else float("nan")
            extra = f"{row['seen right'] / row['n']:11.2f} {given:22.2f}"
        print(f"{task:10} {name:20} {row['n']:4d} {row['right'] / row['n']:6.2f} {extra}")


if __name__ == "__main__":
    main()
