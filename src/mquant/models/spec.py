"""Declarative description of a multimodal architecture family.

A family says *where* things are (module paths, linear names, which norm feeds which linears, which
linears write the residual stream) and *how* inputs are built; it contains no algorithm. The generic
engine in `mquant.pipeline` reads these descriptions, so every family goes through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

import torch
from torch import nn

PartName = Literal["vision", "projector", "language"]


@dataclass(frozen=True)
class AttentionLayout:
    """Where a block's value and output projections are (for the per-head rotation R2).

    `v` names the value projection; when it is a fused q/k/v linear, `v_rows` = "last-third" says
    V is the last third of its output rows. `o` names the output projection.
    """

    v: str
    o: str
    v_rows: Literal["all", "last-third"] = "all"


@dataclass(frozen=True)
class BlockLayout:
    """The quantizable linears of one block, relative to the block.

    `groups` lists linears in the order GPTQ visits them; the names inside one group read the same
    input tensor and therefore share one activation quantizer (q/k/v, gate/up).
    `norm_readers` pairs each norm with the linears that read its output (γ folding, smoothing).
    `residual_writers` are the linears that add into the residual stream (rotations).
    """

    groups: tuple[tuple[str, ...], ...]
    norm_readers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    residual_writers: tuple[str, ...] = ()
    attention: AttentionLayout | None = None
    # Linears whose input comes out of a nonlinearity: the targets of the online Hadamard R4.
    online_hadamard: tuple[str, ...] = ()
    # A reader behind a norm may see `norm_chunks` normalized tokens concatenated (a token-merging
    # projector such as Qwen2-VL's merger: 4 tokens of 1280 -> one row of 5120).
    norm_chunks: int = 1

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)


@dataclass(frozen=True)
class Segment:
    """A run of modules that pass hidden states from one to the next.

    `path` names an `nn.ModuleList` of identical blocks (`repeated=True`) or a single module.
    The inputs of its first module are captured once with a forward pre-hook; later blocks are fed
    by replaying the previous (already quantized) block.
    """

    path: str
    layout: BlockLayout
    repeated: bool = True

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        module = model.get_submodule(self.path)
        if not self.repeated:
            return [(self.path, module)]
        return [(f"{self.path}.{i}", block) for i, block in enumerate(module)]


@dataclass(frozen=True)
class Part:
    name: PartName
    segments: tuple[Segment, ...]


class ImageInputs(Protocol):
    """How a family turns PIL images into model tensors and how many placeholder tokens each takes."""

    def load_processor(self, path: str) -> Any: ...

    def make_processor(self, image_size: int) -> Any: ...

    def process(self, processor: Any, images: list, config: Any) -> tuple[dict[str, torch.Tensor], list[int]]: ...


@dataclass(frozen=True)
class ModelFamily:
    name: str
    architectures: tuple[str, ...]
    model_class: type
    parts: tuple[Part, ...]
    images: ImageInputs
    # Text the chat template writes once per image; it contains exactly one image placeholder token,
    # which the input builder repeats once per visual token.
    image_prompt: str
    default_chat_template: str
    special_tokens: tuple[str, ...]
    eos_token: str
    pad_token: str
    # Extra model inputs computed from the token ids (e.g. Qwen2-VL's mm_token_type_ids).
    extra_text_inputs: Callable[[torch.Tensor, Any], dict[str, torch.Tensor]] = field(
        default=lambda input_ids, config: {}
    )
    # True when the vision stream is written only by the declared residual writers and read only
    # through the declared norms, so LN2RN is exact as it stands. CLIP towers are not: a norm at the
    # start of the stream (pre_layrnorm) and a raw reader (LLaVA reads layer -2) need more surgery.
    vision_stream_closed: bool = False
    # An open LayerNorm stream (ALGORITHMS.md §5.3-5.4): the norm whose output is the stream, and the
    # linears that read the stream raw (no norm between), each with how many stream vectors it
    # reads side by side (from the config, e.g. LLaVA may concatenate several feature layers).
    vision_stream_start: str | None = None
    vision_raw_readers: Callable[[Any], tuple[tuple[str, int], ...]] = field(default=lambda config: ())
    # The language model (its prefill is reordered by AIFS), its final norm and output head (the
    # head reads the residual stream).
    language_model: str = "model.language_model"
    final_norm: str = "model.language_model.norm"
    lm_head: str = "lm_head"
    tiny_config: Callable[[dict[str, int]], Any] | None = None
    tiny_image_size: int = 56

    def image_token_id(self, config: Any) -> int:
        return int(config.image_token_id)

    def part(self, name: str) -> Part:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(name)
