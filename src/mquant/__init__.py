"""mquant: full static quantization of multimodal LLMs (MQuant, Q-VLM and baselines).

The public API is imported lazily so that `mquant --help` does not load torch and transformers.
"""

__version__ = "0.1.0"

__all__ = ["quantize", "load", "save", "Recipe", "PRESETS", "load_recipe", "__version__"]

_LAZY = {"quantize": "mquant.api", "load": "mquant.api", "save": "mquant.api",
         "Recipe": "mquant.recipe", "PRESETS": "mquant.recipe", "load_recipe": "mquant.recipe"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mquant' has no attribute {name!r}")
