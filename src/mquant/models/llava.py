"""LLaVA (`LlavaForConditionalGeneration`: CLIP vision tower, MLP projector, Llama-style LM)."""

from __future__ import annotations

from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.models.clip import CLIPImageProcessorPil

from mquant.models.layouts import DECODER_LAYER, processor_from_dir
from mquant.models.spec import AttentionLayout, BlockLayout, ModelFamily, Part, Segment

CLIP_LAYER = BlockLayout(
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
            ("mlp.fc1",), ("mlp.fc2",)),
    norm_readers=(("layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                  ("layer_norm2", ("mlp.fc1",))),
    residual_writers=("self_attn.out_proj", "mlp.fc2"),
    attention=AttentionLayout(v="self_attn.v_proj", o="self_attn.out_proj"),
    online_hadamard=("mlp.fc2",),
)
# The patch embedding writes the pre-norm embedding, not the stream (which starts at pre_layrnorm).
CLIP_EMBEDDINGS = BlockLayout(groups=(("patch_embedding",),))
PROJECTOR = BlockLayout(groups=(("linear_1",), ("linear_2",)), residual_writers=("linear_2",))


class ClipImages:
    """Fixed-resolution CLIP preprocessing via the PIL image processor."""

    def load_processor(self, path: str) -> CLIPImageProcessorPil:
        return processor_from_dir(CLIPImageProcessorPil, path)

    def make_processor(self, image_size: int) -> CLIPImageProcessorPil:
        return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                     crop_size={"height": image_size, "width": image_size})

    def process(self, processor, images, config):
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        patch = config.vision_config.patch_size
        n = (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)
        if config.vision_feature_select_strategy == "full":  # the CLS token is kept as a feature
            n += 1
        return {"pixel_values": pixel_values}, [n] * len(images)


def _projector_reads_raw_stream(config) -> tuple[tuple[str, int], ...]:
    """LLaVA's projector reads CLIP hidden state(s) with no norm between (several, concatenated,
    when `vision_feature_layer` is a list)."""
    layers = config.vision_feature_layer
    return (("model.multi_modal_projector.linear_1", len(layers) if isinstance(layers, (list, tuple)) else 1),)


def _tiny_config(ids: dict[str, int]) -> LlavaConfig:
    return LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=40, intermediate_size=80,
                           num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14,
                           projection_dim=40),
        text_config=dict(model_type="llama", vocab_size=ids["vocab_size"], hidden_size=48,
                         intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]),
        image_token_id=ids["<image>"], projector_hidden_act="gelu", image_seq_length=4,
        tie_word_embeddings=False,
    )


CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

FAMILY = ModelFamily(
    name="llava",
    architectures=("LlavaForConditionalGeneration",),
    model_class=LlavaForConditionalGeneration,
    parts=(
        Part("vision", (Segment("model.vision_tower.embeddings", CLIP_EMBEDDINGS, repeated=False),
                        Segment("model.vision_tower.encoder.layers", CLIP_LAYER))),
        Part("projector", (Segment("model.multi_modal_projector", PROJECTOR, repeated=False),)),
        Part("language", (Segment("model.language_model.layers", DECODER_LAYER),)),
    ),
    images=ClipImages(),
    image_prompt="<image>",
    default_chat_template=CHAT_TEMPLATE,
    special_tokens=("<pad>", "<s>", "</s>", "<image>"),
    eos_token="</s>",
    pad_token="<pad>",
    vision_stream_start="model.vision_tower.pre_layrnorm",
    vision_raw_readers=_projector_reads_raw_stream,
    tiny_config=_tiny_config,
    tiny_image_size=28,
)
