"""mquant: full static quantization of multimodal LLMs (MQuant, Q-VLM and baselines)."""

__version__ = "0.1.0"

from mquant.api import load, quantize, save  # noqa: E402
from mquant.recipe import PRESETS, Recipe, load_recipe  # noqa: E402

__all__ = ["quantize", "load", "save", "Recipe", "PRESETS", "load_recipe", "__version__"]
