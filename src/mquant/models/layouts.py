"""Block layouts shared by several families (a family file only names what differs)."""

from mquant.models.spec import AttentionLayout, BlockLayout

# Llama / Qwen2 style decoder layer: q/k/v share the attention input, gate/up the MLP input.
DECODER_LAYER = BlockLayout(
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    norm_readers=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    residual_writers=("self_attn.o_proj", "mlp.down_proj"),
    attention=AttentionLayout(v="self_attn.v_proj", o="self_attn.o_proj"),
    online_hadamard=("mlp.down_proj",),
)


def processor_from_dir(cls, path: str):
    """Instantiate an image-processor class from a `preprocessor_config.json` (the PIL variant,
    whatever class name the file records, so that torchvision is never needed)."""
    import json
    from pathlib import Path

    cfg = json.loads((Path(path) / "preprocessor_config.json").read_text())
    return cls(**{k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class")})
