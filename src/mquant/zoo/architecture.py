"""The embedded model's architecture: a small Qwen2-VL with non-power-of-two widths.

Widths are chosen so that later rotation work meets the Hadamard sizes real models have:
language hidden 192 = 12·16, MLP 448 = 28·16 (Qwen2-VL-7B's hidden is 28·128), vision width
96 = 12·8, vision MLP 384 = 12·32, vision head 24 = 12·2, language head 32.
"""

from __future__ import annotations

from transformers import Qwen2VLConfig

from mquant.models.qwen2_vl import FAMILY, small_config
from mquant.models.tokenizer import build_tokenizer, token_ids

# Benchmark images are 112 x 112 (16 visual tokens); other images are resized to 56²..224² pixels.
MIN_SIDE, MAX_SIDE = 56, 224


def embedded_config(ids: dict[str, int]) -> Qwen2VLConfig:
    return small_config(ids, hidden=192, intermediate=448, layers=4, heads=6, kv_heads=2, mrope_section=[4, 6, 6],
                        vision=dict(depth=4, embed_dim=96, num_heads=4, mlp_ratio=4))


def build_components():
    """(config, tokenizer, image processor) of the embedded model, built offline."""
    tokenizer = build_tokenizer(FAMILY)
    processor = FAMILY.images.make_processor(MIN_SIDE, MAX_SIDE)
    return embedded_config(token_ids(tokenizer)), tokenizer, processor
