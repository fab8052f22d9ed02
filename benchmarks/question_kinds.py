"""Accuracy of a model per question kind of the built-in benchmark (calib split), to see what it fails.

    python benchmarks/question_kinds.py [MODEL_DIR] [--n 96]

The benchmark's scores average kinds that a model learns at very different speeds (reading a word
or a 5-digit number; "is there a ..." or "is X left of Y"); this splits `textread`, `yesno` and
`choice` by kind. For `choice` it also says how often the answer names the right option's text (the
embedded model says the option before its letter) and how often the letter is that of the option
it named; for `yesno`, how many of the cells the answer gives the named objects ("the red circle is
at 1 3, ...") are right.
"""

from __future__ import annotations

import argparse
import collections
import re

import torch

from mquant.eval.metrics import parse_option_letter, parse_yes_no
from mquant.models.vlm import load_pretrained
from mquant.zoo import EMBEDDED_MODEL, benchmark
from mquant.zoo.render import CELL, EMPTY, SIZE

KINDS = {"yesno": (("exists", "Is there"), ("count", "exactly"), ("left/right", "left of")),
         "choice": (("count", "How many"), ("colour", "What color"), ("topmost", "closest to the top"))}


def kind(task: str, sample) -> str:
    if task == "textread":
        text = sample.answers[0]
        return "word" if text.isalpha() else "number, 5 digits" if len(text) == 5 else "number, 2-4 digits"
    return next(name for name, words in KINDS[task] if words in sample.text)


def named_option(prediction: str, options: list[str]) -> str | None:
    """The option whose text the answer says before its letter ("it is red circle, the answer is A")."""
    said = prediction.split(",")[0].strip().removeprefix("it is ").strip()
    return said if said in options else None


def stated_cells(prediction: str, cells: list[list[str]]) -> tuple[int, int]:
    """(cells the answer gives objects, how many of them are right), against the scene's cell labels
    (`meta["cells"]` of its image: one [colour, shape] per occupied cell, row by row)."""
    side = SIZE // CELL
    truth = {" ".join(labels): (str(k // side), str(k % side)) for k, labels in enumerate(cells) if labels != [EMPTY]}
    said = re.findall(r"the (\w+ \w+) is at (\d) (\d)", prediction)
    return len(said), sum(truth.get(name) == (r, k) for name, r, k in said)


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
            # Long enough for the whole training-form answer (the benchmark stops earlier).
            predictions = [p for k in range(0, len(samples), 16) for p in vlm.generate(samples[k : k + 16], 24)]
        for sample, prediction in zip(samples, predictions):
            row = rows[(task, kind(task, sample))]
            row["n"] += 1
            truth = sample.answers[0]
            if task == "textread":
                row["right"] += prediction.strip().lower() == truth.lower()
            elif task == "yesno":
                row["right"] += parse_yes_no(prediction) == truth
                stated, right = stated_cells(prediction, sample.meta["cells"][0])
                row["cells stated"] += stated
                row["cells right"] += right
            else:
                letter, options = parse_option_letter(prediction), sample.meta["options"]
                said = named_option(prediction, options)
                row["right"] += letter == truth
                row["named right"] += said == options[benchmark.LETTERS.index(truth)]
                row["letter of named"] += said is not None and letter == benchmark.LETTERS[options.index(said)]
    print(f"{'task':10} {'kind':20} {'n':>4} {'right':>6} {'names right option':>19} {'letter of named':>16}"
          f" {'object cells right':>19}")
    for (task, name), row in sorted(rows.items()):
        extra = (f"{row['named right'] / row['n']:19.2f} {row['letter of named'] / row['n']:16.2f}"
                 if task == "choice" else "")
        if row["cells stated"]:
            extra = f"{'':36} {row['cells right']:>9d} of {row['cells stated']:<6d}"
        print(f"{task:10} {name:20} {row['n']:4d} {row['right'] / row['n']:6.2f} {extra}")


if __name__ == "__main__":
    main()
