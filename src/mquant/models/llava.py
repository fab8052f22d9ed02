"""LLaVA (`LlavaForConditionalGeneration`): any described vision tower + the LLaVA MLP + any
described decoder, chosen from the checkpoint's `vision_config` / `text_config`."""

from __future__ import annotations

from transformers import LlavaConfig, LlavaForConditionalGeneration

from mquant.models.connectors import LLAVA_MLP
from mquant.models.decoders import LLAVA_DECODERS
from mquant.models.pieces import Composition, Decoder, VisionTower
from mquant.models.spec import ChatFormat
from mquant.models.towers import LLAVA_TOWERS


class LlavaImages:
    """The tower's fixed-resolution preprocessing; one placeholder per feature LLaVA keeps: every
    patch plus the tower's extra tokens (class, registers), less the first token under the
    "default" feature strategy (which crops the class token)."""

    def __init__(self, tower: VisionTower) -> None:
        self.tower = tower

    def load_processor(self, path: str):
        return self.tower.processor.load(path)

    def make_processor(self, image_size: int):
        return self.tower.processor.make(image_size)

    def process(self, processor, images, config):
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        vc = config.vision_config
        n = (pixel_values.shape[-2] // vc.patch_size) * (pixel_values.shape[-1] // vc.patch_size)
        n += self.tower.extra_tokens(vc)
        if config.vision_feature_select_strategy == "default":
            n -= 1
        return {"pixel_values": pixel_values}, [n] * len(images)


def _tiny_config(ids: dict[str, int], tower: VisionTower, decoder: Decoder) -> LlavaConfig:
    text = dict(decoder.tiny_config(ids), bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    return LlavaConfig(vision_config=dict(tower.tiny_config), text_config=text, image_token_id=ids["<image>"],
                       projector_hidden_act="gelu", image_seq_length=4, tie_word_embeddings=False)


CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

COMPOSITION = Composition(
    name="llava",
    architectures=("LlavaForConditionalGeneration",),
    model_class=LlavaForConditionalGeneration,
    towers=LLAVA_TOWERS,
    connector=LLAVA_MLP,
    decoders=LLAVA_DECODERS,
    tower_path="model.vision_tower",
    connector_path="model.multi_modal_projector",
    images=LlavaImages,
    chat=ChatFormat(image_prompt="<image>", default_chat_template=CHAT_TEMPLATE,
                    special_tokens=("<pad>", "<s>", "</s>", "<image>"), eos_token="</s>", pad_token="<pad>"),
    tiny_config=_tiny_config,
    tiny_image_size=28,
)
