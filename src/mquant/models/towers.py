"""Vision towers, each described once (paths relative to the tower module)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.bit import BitImageProcessorPil
from transformers.models.clip import CLIPImageProcessorPil
from transformers.models.siglip import SiglipImageProcessorPil

from mquant.models.layouts import processor_from_dir
from mquant.models.pieces import VisionTower, config_value
from mquant.models.spec import AttentionLayout, BlockLayout, Segment


@dataclass(frozen=True)
class TowerProcessor:
    """A tower's fixed-resolution PIL image processor: its class (to load a saved one) and the
    arguments that make one for square images of `image_size` pixels."""

    cls: type
    size: str  # "shortest_edge" (resize, then centre crop) or "square" (resize to image_size²)
    extra: tuple[tuple[str, Any], ...] = ()

    def load(self, path: str):
        return processor_from_dir(self.cls, path)

    def make(self, image_size: int):
        s = image_size
        sizes = ({"size": {"shortest_edge": s}, "crop_size": {"height": s, "width": s}}
                 if self.size == "shortest_edge" else {"size": {"height": s, "width": s}})
        return self.cls(**sizes, **dict(self.extra))


# CLIP / SigLIP encoder layer: q/k/v share layer_norm1, fc1 reads layer_norm2.
CLIP_LAYER = BlockLayout(
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
            ("mlp.fc1",), ("mlp.fc2",)),
    norm_readers=(("layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                  ("layer_norm2", ("mlp.fc1",))),
    residual_writers=("self_attn.out_proj", "mlp.fc2"),
    attention=AttentionLayout(v="self_attn.v_proj", o="self_attn.out_proj"),
    online_hadamard=("mlp.fc2",),
)
TINY_VIT = dict(hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                patch_size=14)

CLIP = VisionTower(
    name="clip",
    model_types=("clip_vision_model",),
    # The patch embedding writes the pre-norm embedding, not the stream (which starts at pre_layrnorm).
    segments=(Segment("embeddings", BlockLayout(groups=(("patch_embedding",),)), repeated=False),
              Segment("encoder.layers", CLIP_LAYER)),
    processor=TowerProcessor(CLIPImageProcessorPil, "shortest_edge"),
    stream_start="pre_layrnorm",
    extra_tokens=lambda vc: 1,  # the class token
    tiny_config=dict(model_type="clip_vision_model", projection_dim=40, **TINY_VIT),
)

SIGLIP = VisionTower(
    name="siglip",
    model_types=("siglip_vision_model",),
    # No class token and no pre-norm: the stream starts with the patch embedding plus the position
    # table. post_layernorm and the pooling head only feed the pooled output, which LLaVA ignores.
    segments=(Segment("embeddings", BlockLayout(groups=(("patch_embedding",),), residual_writers=("patch_embedding",),
                                                stream_embeddings=("position_embedding.weight",)), repeated=False),
              Segment("encoder.layers", CLIP_LAYER)),
    processor=TowerProcessor(SiglipImageProcessorPil, "square"),
    tiny_config=dict(model_type="siglip_vision_model", **TINY_VIT),
)

DINOV2_LAYER = BlockLayout(
    groups=(("attention.q_proj", "attention.k_proj", "attention.v_proj"), ("attention.o_proj",), ("mlp.fc1",),
            ("mlp.fc2",)),
    norm_readers=(("norm1", ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
                  ("norm2", ("mlp.fc1",))),
    residual_writers=("attention.o_proj", "mlp.fc2"),
    layer_scales=(("attention.o_proj", "layer_scale1.lambda1"), ("mlp.fc2", "layer_scale2.lambda1")),
    attention=AttentionLayout(v="attention.v_proj", o="attention.o_proj"),
    online_hadamard=("mlp.fc2",),
)


def _dinov2_variant(vc) -> str | None:
    return "a SwiGLU MLP (use_swiglu_ffn)" if config_value(vc, "use_swiglu_ffn", False) else None


def _dinov2(name: str, model_type: str, registers: bool) -> VisionTower:
    # The stream starts with the patch embedding, the class token (and register tokens) and the
    # interpolated position table (interpolation is linear per channel, so it commutes with a
    # rotation of the channels); the final `layernorm` feeds only the pooled output.
    tokens = ("cls_token", "mask_token", "position_embeddings") + (("register_tokens",) if registers else ())
    embeddings = BlockLayout(groups=(("patch_embeddings.projection",),),
                             residual_writers=("patch_embeddings.projection",), stream_embeddings=tokens)
    return VisionTower(
        name=name,
        model_types=(model_type,),
        segments=(Segment("embeddings", embeddings, repeated=False), Segment("encoder.layer", DINOV2_LAYER)),
        processor=TowerProcessor(BitImageProcessorPil, "shortest_edge",
                                      (("image_mean", IMAGENET_DEFAULT_MEAN), ("image_std", IMAGENET_DEFAULT_STD))),
        extra_tokens=lambda vc: 1 + (vc.num_register_tokens if registers else 0),
        unsupported=_dinov2_variant,
        # Position table for a 3x3 grid, images of 2x2 patches: the interpolation path runs.
        tiny_config=dict(model_type=model_type, hidden_size=40, mlp_ratio=2, num_hidden_layers=2,
                         num_attention_heads=2, image_size=42, patch_size=14, layerscale_value=0.5,
                         **({"num_register_tokens": 2} if registers else {})),
    )


DINOV2 = _dinov2("dinov2", "dinov2", registers=False)
DINOV2_REGISTERS = _dinov2("dinov2-registers", "dinov2_with_registers", registers=True)

# Qwen2-VL's ViT: a closed LayerNorm stream (the merger reads it through ln_q), 2-D RoPE, no
# absolute position table; the fused qkv holds V in its last third.
QWEN2_VL_VIT = VisionTower(
    name="qwen2-vl-vit",
    model_types=("qwen2_vl_vision",),
    segments=(Segment("patch_embed", BlockLayout(groups=(("proj",),), residual_writers=("proj",)), repeated=False),
              Segment("blocks", BlockLayout(
                  groups=(("attn.qkv",), ("attn.proj",), ("mlp.fc1",), ("mlp.fc2",)),
                  norm_readers=(("norm1", ("attn.qkv",)), ("norm2", ("mlp.fc1",))),
                  residual_writers=("attn.proj", "mlp.fc2"),
                  attention=AttentionLayout(v="attn.qkv", o="attn.proj", v_rows="last-third"),
                  online_hadamard=("mlp.fc2",),
              ))),
)

LLAVA_TOWERS = (CLIP, SIGLIP, DINOV2, DINOV2_REGISTERS)
