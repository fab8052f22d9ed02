"""Calibration data: a JSONL folder of images + prompts, or a built-in synthetic source.

A JSONL line is `{"image": "rel/path.png" | ["a.png", "b.png"], "text": "...", "answer": "..."}`;
image paths are relative to the JSONL file. With an answer, calibration teacher-forces it, so the
language model also sees answer-like text rows (ALGORITHMS.md §7.3).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from mquant.errors import MquantError
from mquant.samples import IMAGE_MARKER, Sample


@dataclass
class CalibrationSet:
    source: str
    samples: list[Sample]

    def fingerprints(self) -> list[str]:
        return [s.fingerprint() for s in self.samples]


def load_calibration(spec: str, num_samples: int, seed: int = 42) -> CalibrationSet:
    """`synthetic` or a path to a .jsonl file / a folder holding exactly one .jsonl file."""
    if num_samples < 1:
        raise MquantError(f"--num-calib must be at least 1, got {num_samples}")
    if spec == "synthetic":
        return CalibrationSet(f"synthetic(seed={seed})", synthetic_samples(num_samples, seed))
    from mquant.eval.registry import calibration_source  # built-in benchmark splits, if any

    builtin = calibration_source(spec, num_samples, seed)
    if builtin is not None:
        return builtin
    return CalibrationSet(str(spec), jsonl_samples(Path(spec), num_samples))


def jsonl_samples(path: Path, limit: int) -> list[Sample]:
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if len(files) != 1:
            raise MquantError(f"--calib {path}: expected exactly one .jsonl file in the folder, found {len(files)}")
        path = files[0]
    if not path.is_file():
        raise MquantError(f"--calib {path}: no such file or folder (and not a built-in source)")
    samples = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MquantError(f"{where}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "text" not in row:
            raise MquantError(f"{where}: each line needs a 'text' field")
        names = row.get("image", [])
        names = [names] if isinstance(names, str) else names
        images = []
        for name in names:
            img_path = path.parent / name
            try:
                with Image.open(img_path) as im:
                    images.append(im.convert("RGB"))
            except (OSError, ValueError) as exc:
                raise MquantError(f"{where}: cannot read image {img_path} ({exc})") from None
        answers = [row["answer"]] if isinstance(row.get("answer"), str) else list(row.get("answer") or [])
        samples.append(Sample(f"{path.stem}:{lineno}", images, row["text"], answers))
        if len(samples) == limit:
            break
    if not samples:
        raise MquantError(f"{path}: no calibration samples")
    return samples


COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
          "purple": (140, 60, 180), "orange": (240, 140, 30), "black": (20, 20, 20), "white": (245, 245, 245)}


def synthetic_samples(n: int, seed: int) -> list[Sample]:
    """Random scenes of shapes with questions about them; a generic source for tiny models."""
    rng = random.Random(f"calib-synthetic-{seed}")
    samples = []
    for i in range(n):
        size = rng.choice([48, 56, 64, 80])
        img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        count = rng.randint(1, 4)
        color = rng.choice(list(COLORS))
        for _ in range(count):
            x, y, r = rng.randrange(size), rng.randrange(size), rng.randint(3, size // 4)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=COLORS[color])
        question = rng.choice([f"How many {color} circles are there?", "What color are the circles?"])
        answer = str(count) if question.startswith("How") else color
        images = [img]
        text = f"{IMAGE_MARKER}\n{question}"
        if i % 4 == 3:  # some two-image prompts, so visual tokens do not always form one block
            images.append(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
            text = f"Look at {IMAGE_MARKER} and {IMAGE_MARKER}. {question}"
        samples.append(Sample(f"synthetic:{seed}:{i}", images, text, [answer]))
    return samples
