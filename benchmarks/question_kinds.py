"""Accuracy of a model per question kind of the built-in benchmark (calib split), to see what it fails.

    python benchmarks/question_kinds.py [MODEL_DIR] [--n 96]

The benchmark's scores average kinds that a model learns at very different speeds (reading a word
or a 5-digit number; "is there a ..." or "which shape is closest to the left"); this splits
`textread`, `yesno` and `choice` by kind. For `yes/no` it also says how often the reason the
embedded model gives before its yes or no ("red square, blue circle, so no") is the true one, and
how often the yes or no is right after a true reason: wrong seeing and wrong comparing apart.
"""

from __future__ import annotations

import argparse
import collections

import torch

from mquant.eval.metrics import parse_option, parse_yes_no
from mquant.models.vlm import load_pretrained
from mquant.zoo import EMBEDDED_MODEL, benchmark

KINDS = {"yesno": (("exists", "Is there"), ("count", "exactly"), ("closest to the top", "to the top"),
                   ("closest to the left", "to the left")),
         "choice": (("count", "How many"), ("colour", "What color"), ("topmost", "closest to the top"))}


def kind(task: str, sample) -> str:
    if task == "textread":
        text = sample.answers[0]
        return "word" if text.isalpha() else f"number, {len(text)} digits"
    return next(name for name, words in KINDS[task] if words in sample.text)


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
            predictions = [p for k in range(0, len(samples), 16) for p in vlm.generate(samples[k : k + 16], 24)]
        for sample, prediction in zip(samples, predictions):
            row = rows[(task, kind(task, sample))]
            row["n"] += 1
            truth = sample.answers[0]
            if task == "textread":
                row["right"] += prediction.strip().lower() == truth.lower()
            elif task == "yesno":
                row["right"] += parse_yes_no(prediction) == truth
                reason, _, word = prediction.strip().rpartition(", so ")
                true_reason = benchmark.training_form(sample).answers[0].rpartition(", so ")[0]
                row["reason right"] += reason == true_reason
                row["right after true reason"] += reason == true_reason and parse_yes_no(word) == truth
            else:
                row["right"] += parse_option(prediction, sample.meta["choices"]) == truth
    print(f"{'task':10} {'kind':20} {'n':>4} {'right':>6} {'reason right':>13} {'right given reason':>19}")
    for (task, name), row in sorted(rows.items()):
        extra = ""
        if task == "yesno":
            given = row["right after true reason"] / row["reason right"] if row["reason right"] else float("nan")
            extra = f"{row['reason right'] / row['n']:13.2f} {given:19.2f}"
        print(f"{task:10} {name:20} {row['n']:4d} {row['right'] / row['n']:6.2f} {extra}")


if __name__ == "__main__":
    main()
