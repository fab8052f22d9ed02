"""Declarative description of a multimodal architecture family.

A family says *where* things are (module paths, linear names, which norm feeds which linears, which
linears write the residual stream) and *how* inputs are built; it contains no algorithm. The generic
engine in `mquant.pipeline` reads these descriptions, so every family goes through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Protocol

import torch
from torch import nn

PartName = Literal["vision", "projector", "language"]


def join_path(prefix: str, path: str) -> str:
    return ".".join(p for p in (prefix, path) if p)


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
    # Layer-scale (x + λ ⊙ f(x), DINOv2/InternViT): (writer, the parameter λ that scales its output).
    # Folded into the writer (W ← diag(λ)W, b ← λ ⊙ b, λ ← 1) before the stream is transformed.
    layer_scales: tuple[tuple[str, str], ...] = ()
    # Parameters added into the stream as they are (class/register tokens, position tables, stored
    # [..., width]): the stream transforms treat them like writers (p ← pQ, p ← p - mean(p)).
    # A declared parameter that the checkpoint does not have (e.g. an unused mask token) is skipped.
    stream_embeddings: tuple[str, ...] = ()

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

    def under(self, prefix: str) -> "Segment":
        """The same segment seen from a module `prefix` levels up (descriptions compose)."""
        return Segment(join_path(prefix, self.path), self.layout, self.repeated)

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
class ChatFormat:
    """How a family writes prompts: its chat template (for tokenizers without one), special tokens,
    and the text the template writes once per image — it contains exactly one image placeholder
    token, which the input builder repeats once per visual token."""

    image_prompt: str
    default_chat_template: str
    special_tokens: tuple[str, ...]
    eos_token: str
    pad_token: str


@dataclass(frozen=True)
class ModelFamily:
    name: str
    architectures: tuple[str, ...]
    model_class: type
    parts: tuple[Part, ...]
    images: ImageInputs
    chat: ChatFormat
    # Extra model inputs computed from the token ids (e.g. Qwen2-VL's mm_token_type_ids).
    extra_text_inputs: Callable[[torch.Tensor, Any], dict[str, torch.Tensor]] = field(
        default=lambda input_ids, config: {}
    )
    # True when the vision stream is written only by the declared residual writers and read only
    # through the declared norms, so LN2RN can bake the mean out of it. A stream is open when a norm
    # starts it (CLIP's pre_layrnorm) or a linear reads it raw (LLaVA's projector reads a hidden
    # state with no norm between): then it keeps its mean (ALGORITHMS.md §5.3-5.4).
    vision_stream_closed: bool = False
    # The norm whose output is the stream (an open stream's start), if any, and the linears that read
    # the stream raw, each with how many stream vectors it reads side by side (LLaVA may concatenate
    # several feature layers).
    vision_stream_start: str | None = None
    vision_raw_readers: tuple[tuple[str, int], ...] = ()
    # The language model (its prefill is reordered by AIFS), its final norm and output head (the
    # head reads the residual stream).
    language_model: str = "model.language_model"
    final_norm: str = "model.language_model.norm"
    lm_head: str = "lm_head"
    # What the family is made of ("dinov2 + llava-mlp + llama"), for messages and reports.
    pieces: str = ""

    def image_token_id(self, config: Any) -> int:
        return int(config.image_token_id)

    def blocks(self, model: nn.Module, parts: tuple[str, ...]) -> Iterator[tuple[BlockLayout, str, nn.Module]]:
        """(layout, name, block) of every block of `parts`, in model order."""
        for part in self.parts:
            if part.name in parts:
                for segment in part.segments:
                    for name, block in segment.blocks(model):
                        yield segment.layout, name, block

    def stream_embeddings(self, model: nn.Module, part: str) -> list[nn.Parameter]:
        """The parameters the part's segments add into its stream as they are (declared in
        `BlockLayout.stream_embeddings`; those the checkpoint does not have are skipped)."""
        found = []
        for layout, _, block in self.blocks(model, (part,)):
            for name in layout.stream_embeddings:
                owner, _, attr = name.rpartition(".")
                param = getattr(block.get_submodule(owner) if owner else block, attr, None)
                if param is not None:
                    found.append(param)
        return found

    def part(self, name: str) -> Part:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(name)
