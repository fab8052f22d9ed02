"""The embedded model's architecture: a small Qwen2-VL with non-power-of-two widths.

Widths are chosen so that later rotation work meets the Hadamard sizes real models have:
language hidden 192 = 12·16, MLP 448 = 28·16 (Qwen2-VL-7B's hidden is 28·128), vision width
96 = 12·8, vision MLP 384 = 12·32, vision head 24 = 12·2, language head 32.
"""

from __future__ import annotations

from transformers import Qwen2VLConfig

from mquant.models.qwen2_vl import FAMILY
from mquant.models.tokenizer import build_tokenizer, token_ids

# Benchmark images are 112 x 112 (16 visual tokens); other images are resized to 56²..224² pixels.
MIN_SIDE, MAX_SIDE = 56, 224


def embedded_config(ids: dict[str, int]) -> Qwen2VLConfig:
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=ids["vocab_size"], hidden_size=192, intermediate_size=448, num_hidden_layers=4,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=4, embed_dim=96, hidden_size=192, num_heads=4, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_components():
    """(config, tokenizer, image processor) of the embedded model, built offline."""
    tokenizer = build_tokenizer(FAMILY)
    processor = FAMILY.images.make_processor(MIN_SIDE, MAX_SIDE)
    return embedded_config(token_ids(tokenizer)), tokenizer, processor
