"""Drawing helpers for the benchmark: canvases (plain or real photos), text, shapes."""

from __future__ import annotations

import functools
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 112  # every benchmark image is SIZE x SIZE: 4 x 4 visual tokens of 28 x 28 pixels
CELL = 28  # one visual token covers one CELL x CELL square; layouts align content to these cells

COLORS = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215),
    "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle")


@functools.lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font: identical on every machine with the same Pillow."""
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=None)
def _photos() -> tuple[np.ndarray, ...]:
    """Real photographs bundled with scikit-image (no download)."""
    import skimage.data as data

    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
                 "camera", "coins", "moon"):
        img = getattr(data, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        photos.append(img[..., :3])
    return tuple(photos)


def photo_canvas(rng: random.Random, size: int = SIZE) -> Image.Image:
    """A random crop of a real photo, resized to `size`."""
    photo = rng.choice(_photos())
    h, w = photo.shape[:2]
    side = rng.randint(min(h, w) // 3, min(h, w))
    y, x = rng.randint(0, h - side), rng.randint(0, w - side)
    return Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.Resampling.BILINEAR)


def plain_canvas(rng: random.Random, size: int = SIZE, light: bool | None = None) -> Image.Image:
    light = rng.random() < 0.7 if light is None else light
    lo, hi = (185, 255) if light else (0, 70)
    return Image.new("RGB", (size, size), tuple(rng.randint(lo, hi) for _ in range(3)))


def contrasting(rng: random.Random, background: Image.Image, box: tuple[int, int, int, int]):
    """A text colour and outline colour that stand out against the region `box` of `background`."""
    region = np.asarray(background.crop(box), dtype=np.float32)
    luminance = float(region.mean()) if region.size else 128.0
    if luminance > 128:
        return tuple(rng.randint(0, 90) for _ in range(3)), (255, 255, 255)
    return tuple(rng.randint(170, 255) for _ in range(3)), (0, 0, 0)


EMPTY = "empty"  # the cell label of a visual-token cell with nothing in it


def empty_cells(per_side: int = SIZE // CELL) -> list[list[str]]:
    return [[] for _ in range(per_side * per_side)]


def label_text_cells(cells: list[list[str]], text: str, origin_x: float, row: int, f, per_side: int = SIZE // CELL) -> None:
    """Add `text`, drawn with its origin at `origin_x` on grid row `row`, to the cell labels: a word
    labels every cell it covers; any other string labels each cell with the characters centred in it, in
    order."""
    for i, ch in enumerate(text):
        centre = origin_x + (f.getlength(text[:i]) + f.getlength(text[: i + 1])) / 2
        col = min(per_side - 1, max(0, int(centre // CELL)))
        if not text.isalpha():  # every character, repeats included: "11" is two ones
            cells[row * per_side + col].append(ch)
        elif text not in cells[row * per_side + col]:
            cells[row * per_side + col].append(text)


def draw_text(img: Image.Image, rng: random.Random, text: str, size: int, outline: bool,
              cells: list[list[str]] | None = None) -> None:
    """Draw `text` from the start of a random visual-token cell (any row; a column where it fits),
    vertically centred in the row, and record it in `cells`, the per-cell labels, when given.

    Positions vary over the cell grid but not within a cell: a small vision tower sees each glyph at
    the same offset inside its 14-pixel patches, as it does in the forms of `docfields`. With
    arbitrary sub-patch offsets the embedded model's tower needed far more images to learn to read
    (measured: 30 % of text cells named after 48,000 images) than the training budget allows.
    """
    f = font(size)
    left, top, right, bottom = f.getbbox(text)
    _, cap_top, _, cap_bottom = f.getbbox("Hg")
    columns = [c for c in range(img.width // CELL) if c * CELL + 4 + right <= img.width - 2]
    col, row = rng.choice(columns), rng.randrange(img.height // CELL)
    x = col * CELL + 4
    y = row * CELL + (CELL - cap_top - cap_bottom) // 2
    fill, stroke = contrasting(rng, img, (x + left, y + top, x + right, y + bottom))
    ImageDraw.Draw(img).text((x, y), text, font=f, fill=fill, stroke_width=1 if outline else 0, stroke_fill=stroke)
    if cells is not None:
        label_text_cells(cells, text, x, row, f, img.width // CELL)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)


def place_boxes(rng: random.Random, sizes: list[int], area: int = SIZE) -> list[tuple]:
    """Square boxes of the given sizes, each inside its own random cell of the visual-token grid
    (jittered within the cell), so no two shapes overlap."""
    per_side = area // CELL
    cells = rng.sample(range(per_side * per_side), len(sizes))
    boxes = []
    for cell, s in zip(cells, sizes):
        cx, cy = (cell % per_side) * CELL, (cell // per_side) * CELL
        x, y = cx + rng.randint(1, CELL - s - 1), cy + rng.randint(1, CELL - s - 1)
        boxes.append((x, y, x + s, y + s))
    return boxes
