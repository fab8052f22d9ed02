"""Task definitions: a generator of test samples plus the metric that scores answers."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from PIL import Image, ImageDraw

from mquant.eval.metrics import exact_match
from mquant.samples import IMAGE_MARKER, Sample


@dataclass(frozen=True)
class Task:
    name: str
    metric: str
    score: Callable[[str, list[str]], float]
    make_samples: Callable[[int], list[Sample]]  # limit -> samples, deterministic
    max_new_tokens: int = 8


_COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}


def _color_samples(limit: int) -> list[Sample]:
    """Name the colour of one square on a grey background (a smoke test of the harness)."""
    rng = random.Random("eval-colors")
    samples = []
    for i in range(limit):
        color = rng.choice(list(_COLORS))
        img = Image.new("RGB", (56, 56), (128, 128, 128))
        x, y = rng.randrange(4, 30), rng.randrange(4, 30)
        ImageDraw.Draw(img).rectangle((x, y, x + 20, y + 20), fill=_COLORS[color])
        samples.append(Sample(f"colors:{i}", [img], f"{IMAGE_MARKER}\nWhat color is the square?", [color]))
    return samples


COLORS_TASK = Task("colors", "exact_match", exact_match, _color_samples, max_new_tokens=6)
