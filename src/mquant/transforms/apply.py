"""Apply the recipe's function-preserving transforms to a model, before quantization.

Order (ALGORITHMS.md, pipeline at a glance): LN2RN on the vision encoder, fold RMSNorm gains, rotate
the language (R1) and vision (R1ᵥ) streams, per-head V/O rotations (R2), online Hadamard (R4).
"""

from __future__ import annotations

import warnings

from mquant.models.vlm import VLM
from mquant.transforms.fuse_norms import fold_norm_gains
from mquant.transforms.ln2rn import ln2rn_vision
from mquant.transforms.online import apply_online_hadamard
from mquant.transforms.rotate import random_hadamard, rotate_language_heads, rotate_part_heads, rotate_stream


def apply_transforms(vlm: VLM, scheme) -> dict:
    """Apply `scheme` (a `TransformScheme`) in place; returns what was done, for the report."""
    model, family = vlm.model, vlm.family
    info: dict = {"ln2rn": False, "rotated_streams": [], "online_hadamard": [], "warnings": []}

    def skip(message: str) -> None:
        warnings.warn(message)
        info["warnings"].append(message)

    if scheme.ln2rn:
        if family.vision_stream_closed:
            ln2rn_vision(model, family)
            info["ln2rn"] = True
        else:
            skip(f"LN2RN is not implemented for the {family.name} vision tower; its LayerNorms are kept")
    if scheme.rotate:
        fold_norm_gains(model, family, ("language",))
        text = model.config.text_config
        rotate_stream(model, family, "language", random_hadamard(text.hidden_size, scheme.seed))
        rotate_language_heads(model, family, seed=None)  # exact Hadamard per head, as the reference
        info["rotated_streams"].append("language")
        vc = model.config.vision_config
        width = getattr(vc, "embed_dim", None) or vc.hidden_size
        heads = getattr(vc, "num_heads", None) or vc.num_attention_heads
        rotate_part_heads(model, family, "vision", heads, heads, width // heads, seed=scheme.seed + 2)
        if info["ln2rn"]:
            rotate_stream(model, family, "vision", random_hadamard(width, scheme.seed + 1))
            info["rotated_streams"].append("vision")
        else:
            skip("the vision stream is not rotated: it still has LayerNorms (LN2RN off or unavailable)")
    if scheme.online_hadamard:
        info["online_hadamard"] = apply_online_hadamard(model, family, ("vision", "language"))
    return info
