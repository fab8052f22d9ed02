"""The built-in benchmark: seeded generators of image+question -> short answer samples.

Tasks mirror what the MQuant paper reports, at the scale of a small model:

| task      | like           | the model must                                          | metric        |
|-----------|----------------|---------------------------------------------------------|---------------|
| digits    | MNIST-in-VQA   | read a real handwritten digit (scikit-learn's digits)   | exact match   |
| textread  | TextVQA/OCR    | read a word or number, sometimes over a real photo      | VQA accuracy  |
| docfields | DocVQA         | find a named field in a rendered form, read its value   | ANLS          |
| yesno     | MME            | answer yes/no on shapes, colours, counts, positions     | acc and acc+  |
| choice    | ScienceQA      | pick the lettered option about counts/colours/positions | option letter |
| compare   | multi-image    | compare circle counts across two interleaved images     | exact match   |

Splits `train`, `calib` and `test` come from disjoint seed streams (and, for digits, disjoint pools
of the real images); `tests/test_benchmark.py` checks the disjointness by content fingerprints.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from mquant.samples import IMAGE_MARKER, Sample
from mquant.zoo.render import (
    CELL, COLORS, EMPTY, SHAPES, SIZE, draw_shape, draw_text, empty_cells, font, label_text_cells, photo_canvas,
    place_boxes, plain_canvas,
)

SPLITS = ("train", "calib", "test")
WORDS = (
    "apple", "river", "stone", "cloud", "green", "house", "music", "paper", "light", "table",
    "water", "bread", "chair", "dream", "earth", "flame", "glass", "heart", "honey", "juice",
    "lemon", "metal", "night", "ocean", "piano", "queen", "robot", "sugar", "tiger", "voice",
    "zebra", "cat", "dog", "sun", "map", "key", "box", "cup", "pen", "bus", "car", "sky",
    "tree", "bird", "fish", "moon", "star", "rain", "snow", "wind", "gold", "iron", "milk",
    "rice", "salt", "tea", "red", "blue", "pink", "gray", "open", "stop", "exit", "sale",
)
FIELDS = ("name", "city", "date", "total", "code", "item")
NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "henry", "ivy", "jack", "kate", "leo")
CITIES = ("paris", "rome", "oslo", "lima", "cairo", "delhi", "tokyo", "quito", "bern", "dakar")
LETTERS = "ABCD"


def _field_value(rng: random.Random, field: str) -> str:
    if field == "name":
        return rng.choice(NAMES)
    if field == "city":
        return rng.choice(CITIES)
    if field == "date":
        return f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}"
    if field == "total":
        return str(rng.randint(10, 999))
    if field == "code":
        return "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(2)) + str(rng.randint(10, 99))
    return rng.choice(WORDS)


# -- digits -----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _digit_pools() -> dict[str, list[int]]:
    """Real handwritten digits (scikit-learn, 1797 images) split into disjoint pools."""
    from sklearn.datasets import load_digits

    n = len(load_digits().target)
    order = list(range(n))
    random.Random("digits-pools").shuffle(order)
    return {"train": order[:1200], "calib": order[1200:1300], "test": order[1300:]}


@functools.lru_cache(maxsize=None)
def _digit_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def gen_digits(rng: random.Random, split: str, i: int) -> list[Sample]:
    images, targets = _digit_data()
    index = rng.choice(_digit_pools()[split])
    ink = (images[index] / 16.0)[..., None]  # 0 = paper, 1 = ink
    side = rng.randint(48, 56)  # about 2 x 2 visual tokens, near the centre
    canvas = plain_canvas(rng, light=True)
    paper = np.asarray(canvas, dtype=np.float32)[0, 0]
    pen = np.array([rng.randint(0, 110) for _ in range(3)], dtype=np.float32)
    tile = Image.fromarray((paper * (1 - ink) + pen * ink).astype(np.uint8)).resize((side, side), Image.Resampling.BILINEAR)
    corner = (SIZE - side) // 2
    canvas.paste(tile, (corner + rng.randint(-4, 4), corner + rng.randint(-4, 4)))
    cells = empty_cells()
    for cell in (5, 6, 9, 10):  # the tile covers the four central cells
        cells[cell].append(str(int(targets[index])))
    question = f"{IMAGE_MARKER}\nWhich digit is written in the image?"
    return [Sample(f"digits:{split}:{i}", [canvas], question, [str(int(targets[index]))],
                   {"pool_index": index, "caption": f"the digit {int(targets[index])}", "cells": [_fill(cells)]})]


# -- textread ---------------------------------------------------------------------------------------
def _number(rng: random.Random, digits: int) -> str:
    """A number of exactly `digits` digits (lengths drawn evenly, so short numbers are as common as long)."""
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def gen_textread(rng: random.Random, split: str, i: int) -> list[Sample]:
    text = rng.choice(WORDS) if rng.random() < 0.6 else _number(rng, rng.randint(2, 4))
    on_photo = rng.random() < 0.4
    canvas = photo_canvas(rng) if on_photo else plain_canvas(rng)
    cells = empty_cells()
    draw_text(canvas, rng, text, rng.choice((15, 17)), outline=on_photo, cells=cells)
    question = f"{IMAGE_MARKER}\nWhat is written in the image?"
    return [Sample(f"textread:{split}:{i}", [canvas], question, [text] * 10,
                   {"on_photo": on_photo, "caption": text, "cells": [_fill(cells)]})]


# -- docfields --------------------------------------------------------------------------------------
def gen_docfields(rng: random.Random, split: str, i: int) -> list[Sample]:
    fields = rng.sample(FIELDS, 4)
    values = [_field_value(rng, f) for f in fields]
    canvas = Image.new("RGB", (SIZE, SIZE), tuple(rng.randint(225, 255) for _ in range(3)))
    draw = ImageDraw.Draw(canvas)
    f = font(13)
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    top, row_h, split_x = 0, 28, 50  # one table row per row of visual tokens
    draw.rectangle((1, top + 1, SIZE - 2, top + 4 * row_h - 2), outline=ink)
    cells = empty_cells()
    for r, (name, value) in enumerate(zip(fields, values)):
        y = top + r * row_h
        if r:
            draw.line((2, y, SIZE - 3, y), fill=ink)
        draw.text((5, y + 8), name.capitalize(), font=f, fill=ink)
        draw.text((split_x + 4, y + 8), value, font=f, fill=ink)
        label_text_cells(cells, name, 5, r, f)
        label_text_cells(cells, value, split_x + 4, r, f)
    draw.line((split_x, top + 1, split_x, top + 4 * row_h - 2), fill=ink)
    k = rng.randrange(4)
    question = f"{IMAGE_MARKER}\nWhat is the {fields[k]} in the form?"
    return [Sample(f"docfields:{split}:{i}", [canvas], question, [values[k]],
                   {"field": fields[k], "caption": "; ".join(f"{n} {v}" for n, v in zip(fields, values)),
                    "cells": [_fill(cells)]})]


# -- scenes of shapes (yesno, choice, compare) ------------------------------------------------------
def _scene(rng: random.Random, n: int, distinct: bool = True):
    """`n` shapes with (colour, shape) pairs distinct when asked, drawn on a plain light canvas."""
    boxes = place_boxes(rng, [rng.randint(16, 24) for _ in range(n)])
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], n) if distinct else \
        [(rng.choice(list(COLORS)), rng.choice(SHAPES)) for _ in range(n)]
    canvas = plain_canvas(rng, light=True)
    draw = ImageDraw.Draw(canvas)
    objects = []
    for box, (color, shape) in zip(boxes, pairs):
        draw_shape(draw, shape, box, COLORS[color])
        objects.append({"color": color, "shape": shape, "x": (box[0] + box[2]) / 2, "y": (box[1] + box[3]) / 2})
    return canvas, objects


def _row(o: dict) -> int:
    return int(o["y"]) // CELL


def _column(o: dict) -> int:
    return int(o["x"]) // CELL


def _reading_order(objects: list[dict]) -> list[dict]:
    """Row by row of the visual-token grid, left to right (the order captions list shapes in)."""
    return sorted(objects, key=lambda o: (_row(o), _column(o), o["color"], o["shape"]))


def _fill(cells: list[list[str]]) -> list[list[str]]:
    return [labels or [EMPTY] for labels in cells]


def scene_cells(objects: list[dict]) -> list[list[str]]:
    """Per visual-token cell: the colour and shape of the object centred in it, or `empty`."""
    cells = empty_cells()
    for o in objects:
        cells[_row(o) * (SIZE // CELL) + _column(o)] += [o["color"], o["shape"]]
    return _fill(cells)


def scene_caption(objects: list[dict]) -> str:
    """Every object in reading order with its cell (row, column) on the visual-token grid."""
    parts = [f"{o['color']} {o['shape']} at {_row(o)} {_column(o)}" for o in _reading_order(objects)]
    return f"{len(objects)} shapes: " + ", ".join(parts)


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _absent(rng: random.Random, objects: list[dict]) -> tuple[str, str]:
    present = {(o["color"], o["shape"]) for o in objects}
    return rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present])


def gen_yesno(rng: random.Random, split: str, i: int) -> list[Sample]:
    """One image, two questions: one whose answer is yes and one whose answer is no.

    Kinds: whether a colour-and-shape pair is there (the absent pair may share its colour or its shape
    with shapes that are there), the number of shapes, and the colour or the shape of the one closest
    to the top (the wrong colour or shape is that of another shape where there is one, so that only
    the position decides).

    Training answers (`training_form`) say what the model saw, then yes or no: "there are 3 shapes,
    so no", "the shape closest to the top is the red circle, so yes", "red square, blue circle, so
    no" (the comparison after "so" is also drilled on text alone: `train.comparison_drills`).
    `benchmarks/question_kinds.py` tells the seeing and the yes or no apart (README, "Status")."""
    canvas, objects = _scene(rng, rng.randint(2, 4))
    kind = rng.choice(("exist", "count", "position"))
    if kind == "exist":
        o = rng.choice(objects)
        c, s = _absent(rng, objects)
        yes, no = f"Is there {_a(o['color'])} {o['shape']}?", f"Is there {_a(c)} {s}?"
        seen = ", ".join(f"{x['color']} {x['shape']}" for x in _reading_order(objects))
        answers = f"{seen}, so yes", f"{seen}, so no"
    elif kind == "count":
        n = len(objects)
        wrong = rng.choice([k for k in range(1, 6) if k != n])
        yes, no = f"Are there exactly {n} shapes?", f"Are there exactly {wrong} shapes?"
        answers = f"there are {n} shapes, so yes", f"there are {n} shapes, so no"
    else:
        ordered = sorted(objects, key=_row)
        if _row(ordered[0]) == _row(ordered[1]):  # decided inside one row of cells: draw another
            return gen_yesno(rng, split, i)
        top = ordered[0]
        attribute = rng.choice(("color", "shape"))
        others = [o[attribute] for o in ordered[1:] if o[attribute] != top[attribute]]
        pool = COLORS if attribute == "color" else SHAPES
        wrong = rng.choice(others) if others else rng.choice([v for v in pool if v != top[attribute]])
        ask = "Is the shape closest to the top "
        yes, no = ((f"{ask}{v}?" if attribute == "color" else f"{ask}{_a(v)}?") for v in (top[attribute], wrong))
        seen = f"the shape closest to the top is the {top['color']} {top['shape']}"
        answers = f"{seen}, so yes", f"{seen}, so no"
    suffix = " Answer yes or no."
    meta = {"image": i, "caption": scene_caption(objects), "cells": [scene_cells(objects)]}
    return [
        Sample(f"yesno:{split}:{i}:yes", [canvas], f"{IMAGE_MARKER}\n{yes}{suffix}", ["yes"],
               {**meta, "training_answer": answers[0]}),
        Sample(f"yesno:{split}:{i}:no", [canvas], f"{IMAGE_MARKER}\n{no}{suffix}", ["no"],
               {**meta, "training_answer": answers[1]}),
    ]


def gen_choice(rng: random.Random, split: str, i: int) -> list[Sample]:
    kind = rng.choice(("count", "color", "top"))
    if kind == "count":
        shape = rng.choice(SHAPES)
        n = rng.randint(1, 5)
        canvas, objects = _scene(rng, n, distinct=False)
        # Recolour nothing: count only shapes of the asked kind.
        n_asked = sum(o["shape"] == shape for o in objects)
        question = f"How many {shape}s are in the image?"
        correct = str(n_asked)
        options = [correct] + rng.sample([str(k) for k in range(0, 7) if str(k) != correct], 3)
    elif kind == "color":
        canvas, objects = _scene(rng, rng.randint(1, 3))
        o = rng.choice(objects)
        question = f"What color is the {o['shape']}?"
        same_shape = {x["color"] for x in objects if x["shape"] == o["shape"]}
        if len(same_shape) > 1:
            return gen_choice(rng, split, i)
        correct = o["color"]
        options = [correct] + rng.sample([c for c in COLORS if c != correct], 3)
    else:
        canvas, objects = _scene(rng, 3)
        objects.sort(key=lambda o: o["y"])
        if _row(objects[1]) == _row(objects[0]):  # decided inside one row of cells: draw another
            return gen_choice(rng, split, i)
        question = "Which shape is closest to the top?"
        names = [f"{o['color']} {o['shape']}" for o in objects]
        correct = names[0]
        others = names[1:] + [f"{c} {s}" for c, s in [_absent(rng, objects)]]
        options = [correct] + others
    rng.shuffle(options)
    letter = LETTERS[options.index(correct)]
    return [Sample(f"choice:{split}:{i}", [canvas], f"{IMAGE_MARKER}\n{_with_options(question, options)}", [letter],
                   {"choices": dict(zip(LETTERS, options)), "caption": scene_caption(objects),
                    "cells": [scene_cells(objects)], "training_answer": correct})]


def _with_options(question: str, options: list[str]) -> str:
    """`question` followed by its lettered options and VLMEvalKit's default multiple-choice instruction."""
    lines = "\n".join(f"{LETTERS[k]}. {opt}" for k, opt in enumerate(options))
    return f"{question}\nOptions:\n{lines}\nPlease select the correct answer from the options above."


def gen_compare(rng: random.Random, split: str, i: int) -> list[Sample]:
    """Two images interleaved with text: which has more circles?"""
    a = rng.randint(1, 5)
    b = rng.choice([k for k in range(1, 6) if k != a])
    images, cells = [], []
    for n in (a, b):
        boxes = place_boxes(rng, [rng.randint(14, 22) for _ in range(n)])
        canvas = plain_canvas(rng, light=True)
        draw = ImageDraw.Draw(canvas)
        color = rng.choice(list(COLORS))
        for box in boxes:
            draw_shape(draw, "circle", box, COLORS[color])
        images.append(canvas)
        cells.append(scene_cells([{"color": color, "shape": "circle", "x": (x0 + x1) / 2, "y": (y0 + y1) / 2}
                                  for x0, y0, x1, y1 in boxes]))
    text = (f"Image 1: {IMAGE_MARKER}\nImage 2: {IMAGE_MARKER}\n"
            "Which image has more circles? Answer first or second.")
    caption = f"first: {a} circles; second: {b} circles"
    return [Sample(f"compare:{split}:{i}", images, text, ["first" if a > b else "second"],
                   {"counts": [a, b], "caption": caption, "cells": cells})]


GENERATORS: dict[str, Callable[[random.Random, str, int], list[Sample]]] = {
    "digits": gen_digits, "textread": gen_textread, "docfields": gen_docfields,
    "yesno": gen_yesno, "choice": gen_choice, "compare": gen_compare,
}
TEST_SIZE = {"digits": 200, "textread": 200, "docfields": 200, "yesno": 200, "choice": 200, "compare": 200}


def generate(task: str, split: str, n: int, seed: int = 0) -> list[Sample]:
    """The first `n` samples of a task's split (yes/no questions come in pairs: `n` counts questions).

    Deterministic: sample i depends only on (task, split, seed, i).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    out: list[Sample] = []
    i = 0
    while len(out) < n:
        out += draw(task, split, i, seed)
        i += 1
    return out[:n]


def draw(task: str, split: str, i: int, seed: int = 0) -> list[Sample]:
    """Item `i` of a task's split (two samples for yes/no pairs, otherwise one)."""
    return GENERATORS[task](random.Random(f"{task}/{split}/{seed}/{i}"), split, i)


def training_form(sample: Sample) -> Sample:
    """`sample` as the embedded model is trained on it; the benchmark's parsers read the same answer.

    Generators that want another training answer put it in `meta["training_answer"]`. A
    multiple-choice item is trained on the chosen option's text ("red circle"; the option parser
    finds its letter, as VLMEvalKit's does): the letter adds only a text lookup from an option to the
    letter before it, which the embedded model learned far more slowly than the seeing (README,
    "Status"). Yes/no items are trained on the word with what the model saw (`gen_yesno`). Every
    other sample is trained on its benchmark answer.
    """
    answer = sample.meta.get("training_answer")
    return sample if answer is None else dataclasses.replace(sample, answers=[answer])


def caption_sample(sample: Sample) -> Sample:
    """A training-only companion of `sample`: describe its image(s) in full (objects and cells, the
    text, the form's fields). Many answer tokens per image teach the model to see much faster than
    the benchmark's one-word answers alone; the benchmark never asks this."""
    markers = "".join(f"{IMAGE_MARKER}\n" for _ in sample.images)
    return Sample(f"{sample.id}:caption", sample.images, f"{markers}Describe the image.", [sample.meta["caption"]],
                  {"cells": sample.meta["cells"]})


def mixed(split: str, n: int, seed: int = 0, tasks: tuple[str, ...] | None = None) -> list[Sample]:
    """`n` samples cycling over `tasks` (default: every task; for calibration)."""
    tasks = tuple(tasks or GENERATORS)
    per_task = -(-n // len(tasks))
    pools = {t: generate(t, split, per_task, seed) for t in tasks}
    return [pools[t][k] for k in range(per_task) for t in tasks][:n]
