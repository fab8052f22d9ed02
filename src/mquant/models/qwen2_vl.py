"""Qwen2-VL (`Qwen2VLForConditionalGeneration`, transformers 5.x)."""

from __future__ import annotations

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

from mquant.models.connectors import QWEN2_VL_MERGER
from mquant.models.decoders import QWEN2_VL_TEXT
from mquant.models.layouts import processor_from_dir
from mquant.models.pieces import Composition
from mquant.models.spec import ChatFormat
from mquant.models.towers import QWEN2_VL_VIT


class Qwen2VLImages:
    """Qwen2-VL's dynamic-resolution patches via the PIL image processor (no torchvision needed)."""

    def load_processor(self, path: str) -> Qwen2VLImageProcessorPil:
        return processor_from_dir(Qwen2VLImageProcessorPil, path)

    def make_processor(self, image_size: int, max_size: int | None = None) -> Qwen2VLImageProcessorPil:
        """Images are resized (keeping aspect) to between image_size² and max_size² pixels."""
        max_size = max_size or image_size
        return Qwen2VLImageProcessorPil(size={"shortest_edge": image_size**2, "longest_edge": max_size**2})

    def process(self, processor, images, config):
        out = processor(images=images, return_tensors="pt")
        merge = processor.merge_size
        counts = [int(thw.prod()) // (merge * merge) for thw in out["image_grid_thw"]]
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}, counts


def _mm_token_type_ids(input_ids: torch.Tensor, config) -> dict[str, torch.Tensor]:
    # transformers 5.x needs the modality of every token to compute M-RoPE positions.
    return {"mm_token_type_ids": (input_ids == config.image_token_id).to(torch.int32)}


def small_config(ids: dict[str, int], *, hidden: int, intermediate: int, layers: int, heads: int,
                 kv_heads: int, mrope_section: list[int], vision: dict, tie_embeddings: bool = False) -> Qwen2VLConfig:
    """A small Qwen2-VL config for a tokenizer whose special-token ids are `ids`."""
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=ids["vocab_size"], hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=tie_embeddings,
        ),
        vision_config=dict(hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **vision),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_embeddings,
    )


def _tiny_config(ids: dict[str, int], tower=None, decoder=None) -> Qwen2VLConfig:
    # Widths deliberately not powers of two (48 = 3·16, 40 = 5·8), as in real models.
    return small_config(ids, hidden=48, intermediate=96, layers=2, heads=4, kv_heads=2, mrope_section=[2, 2, 2],
                        vision=dict(depth=2, embed_dim=40, num_heads=2, mlp_ratio=2))


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

COMPOSITION = Composition(
    name="qwen2_vl",
    architectures=("Qwen2VLForConditionalGeneration",),
    model_class=Qwen2VLForConditionalGeneration,
    towers=(QWEN2_VL_VIT,),
    connector=QWEN2_VL_MERGER,
    decoders=(QWEN2_VL_TEXT,),
    tower_path="model.visual",
    connector_path="model.visual.merger",
    images=lambda tower: Qwen2VLImages(),
    chat=ChatFormat(image_prompt="<|vision_start|><|image_pad|><|vision_end|>", default_chat_template=CHAT_TEMPLATE,
                    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                    "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
                    eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    extra_text_inputs=_mm_token_type_ids,
    tiny_config=_tiny_config,
    tiny_image_size=56,
)
# Every Qwen2-VL checkpoint has the same pieces, so the family does not depend on the config.
FAMILY = COMPOSITION.compose(QWEN2_VL_VIT, QWEN2_VL_TEXT, None)
