"""The embedded model and the offline benchmark it is trained and evaluated on."""

from pathlib import Path

EMBEDDED_MODEL = Path(__file__).parent / "model"  # written by `python -m mquant.zoo.train`
