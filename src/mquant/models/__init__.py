"""Declarative model families and loading."""

# Names only (no imports of transformers), for the command line's help; registry.py checks them.
FAMILY_NAMES = ("qwen2_vl", "llava")
