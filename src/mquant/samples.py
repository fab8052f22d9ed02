"""One image(s)+text example, shared by calibration and evaluation."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from PIL import Image

IMAGE_MARKER = "<image>"  # where an image goes inside `Sample.text`; family-independent


@dataclass
class Sample:
    """`text` holds one IMAGE_MARKER per image, in order; without markers the images come first.
    `answers` are the reference answers (the first one is used for teacher forcing)."""

    id: str
    images: list[Image.Image]
    text: str
    answers: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def content(self) -> list[dict]:
        """Chat-message content: a list of {"type": "image"} and {"type": "text", "text": ...}."""
        pieces = self.text.split(IMAGE_MARKER)
        n_markers = len(pieces) - 1
        if n_markers == 0:
            items = [{"type": "image"} for _ in self.images]
            return items + ([{"type": "text", "text": self.text}] if self.text else [])
        if n_markers != len(self.images):
            raise ValueError(f"sample {self.id}: {n_markers} image markers but {len(self.images)} images")
        items: list[dict] = []
        for i, piece in enumerate(pieces):
            if piece:
                items.append({"type": "text", "text": piece})
            if i < n_markers:
                items.append({"type": "image"})
        return items

    def fingerprint(self) -> str:
        """Content hash of the images and the prompt: equal inputs give equal fingerprints, whatever
        the id. Used to prove calibration and evaluation data are disjoint."""
        h = hashlib.sha256()
        for img in self.images:
            rgb = img.convert("RGB")
            h.update(f"{rgb.size}".encode())
            h.update(rgb.tobytes())
        h.update(self.text.encode())
        return h.hexdigest()[:24]
