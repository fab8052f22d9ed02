"""Did training wash out what makes the real-weights model real? Residual statistics before and after.

    python benchmarks/real_residuals.py [--trained FILE] [--n 16] [--out docs/real-model/residuals.json]

Builds the real-weights model twice, with the seeded untrained projector and with the trained
parameters (projector + merged decoder adapters, `python -m mquant.zoo.real.train`), runs both on
the same calib-split prompts (one per task in turn) and prints, per decoder layer, the residual
stream's max |h| / median |h| (the massive activations: SmolLM2 has them on token 0, one channel,
from layer 3 on), where the max sits, and the visual over text max |h|.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mquant.eval.diagnostics import residual_statistics
from mquant.fileio import write_json_atomic
from mquant.models.vlm import load_pretrained
from mquant.zoo import benchmark
from mquant.zoo.real.build import REAL_TASKS, TRAINED, default_dir, real_model


def measure(model_dir: Path, samples) -> list[dict]:
    vlm = load_pretrained(model_dir)
    return residual_statistics(vlm, [vlm.encode([s]) for s in samples])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trained", type=Path, default=TRAINED)
    p.add_argument("--n", type=int, default=16, help="calib-split prompts (default 16)")
    p.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = p.parse_args()
    samples = benchmark.mixed("calib", args.n, tasks=REAL_TASKS)
    untrained = measure(real_model(default_dir().with_name(default_dir().name + "-untrained"), trained=None), samples)
    trained_dir = default_dir() if args.trained == TRAINED else default_dir().with_name(default_dir().name + "-candidate")
    trained = measure(real_model(trained_dir, trained=args.trained), samples)
    print("| layer | max/median untrained | trained | max at (token, channel) untrained | trained "
          "| visual/text max untrained | trained |")
    print("|---|---|---|---|---|---|---|")
    for a, b in zip(untrained, trained):
        print(f"| {a['block'].rsplit('.', 1)[-1]} | {a['max_over_median']:.0f} | {b['max_over_median']:.0f} "
              f"| {tuple(a['argmax'])} | {tuple(b['argmax'])} | {a['visual_over_text']:.3g} | {b['visual_over_text']:.3g} |")
    if args.out:
        write_json_atomic(args.out, {"prompts": [s.id for s in samples], "untrained": untrained, "trained": trained})


if __name__ == "__main__":
    main()
