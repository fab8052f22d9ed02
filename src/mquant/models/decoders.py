"""Decoder-only language models, each described once (paths relative to the base model)."""

from __future__ import annotations

from mquant.models.layouts import DECODER_LAYER
from mquant.models.pieces import Decoder


def _tiny(model_type: str):
    def config(ids: dict[str, int]) -> dict:
        return dict(model_type=model_type, vocab_size=ids["vocab_size"], hidden_size=48, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return config


# Llama, Qwen2 and Mistral layers have the same module graph (Qwen2 adds q/k/v biases, Mistral a
# sliding window); what the engine needs from them is the same layout.
LLAMA = Decoder("llama", ("llama",), DECODER_LAYER, tiny_config=_tiny("llama"))
QWEN2 = Decoder("qwen2", ("qwen2",), DECODER_LAYER, tiny_config=_tiny("qwen2"))
MISTRAL = Decoder("mistral", ("mistral",), DECODER_LAYER, tiny_config=_tiny("mistral"))
# Qwen2-VL's own text model (M-RoPE); its config has no separate model type per piece.
QWEN2_VL_TEXT = Decoder("qwen2-vl-text", ("qwen2_vl_text",), DECODER_LAYER)

LLAVA_DECODERS = (LLAMA, QWEN2, MISTRAL)
