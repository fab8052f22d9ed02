"""Vision towers, connectors and decoders, each described once, and how a family composes them.

Most VLMs are "a vision tower + a connector + a decoder" (LLaVA: CLIP, SigLIP or DINOv2 + an MLP +
a Llama, Qwen2 or Mistral decoder). A piece is described relative to its own root module; a
`Composition` names where each piece sits in the full model, which pieces it accepts (looked up
from the checkpoint's config) and what is truly the family's own (chat template, special tokens,
how images become placeholder tokens). `Composition.resolve(config)` yields the `ModelFamily` the
engine reads, with every path absolute. A piece mquant has no description for is a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mquant.errors import MquantError
from mquant.models.spec import BlockLayout, ChatFormat, ImageInputs, ModelFamily, Part, Segment, join_path


def config_value(config: Any, key: str, default: Any = None) -> Any:
    """`config.key` for a `PretrainedConfig` or a config.json dict (nested configs stay dicts)."""
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


@dataclass(frozen=True)
class VisionTower:
    """A vision encoder, paths relative to the tower module.

    `stream_start` is a norm whose output is the residual stream (CLIP's pre_layrnorm); without one
    the stream starts with the embeddings segment's writers and stream embeddings. `extra_tokens`
    counts the tokens the tower puts beside the patches (class and register tokens).
    `unsupported` names a configuration variant the description does not cover (or returns None).
    """

    name: str
    model_types: tuple[str, ...]
    segments: tuple[Segment, ...]
    processor: Any = None  # the tower's own image processor (`towers.TowerProcessor`), if it has one
    stream_start: str | None = None
    extra_tokens: Callable[[Any], int] = field(default=lambda vision_config: 0)
    unsupported: Callable[[Any], str | None] = field(default=lambda vision_config: None)
    tiny_config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Connector:
    """What maps visual features into the decoder's stream, paths relative to its module.
    `raw_readers(config)` lists the linears that read the vision stream with no norm between,
    each with how many stream vectors it reads side by side."""

    name: str
    segments: tuple[Segment, ...]
    raw_readers: Callable[[Any], tuple[tuple[str, int], ...]] = field(default=lambda config: ())


@dataclass(frozen=True)
class Decoder:
    """A decoder-only language model, paths relative to its base model (`model.language_model`)."""

    name: str
    model_types: tuple[str, ...]
    layer: BlockLayout
    layers: str = "layers"
    norm: str = "norm"
    tiny_config: Callable[[dict[str, int]], dict] = field(default=lambda ids: {})


@dataclass(frozen=True)
class Composition:
    """A family: where its tower, connector and decoder sit, which of each it accepts, and its own
    input conventions. `images(tower)` gives the family's `ImageInputs` for a tower."""

    name: str
    architectures: tuple[str, ...]
    model_class: type
    towers: tuple[VisionTower, ...]
    connector: Connector
    decoders: tuple[Decoder, ...]
    tower_path: str
    connector_path: str
    images: Callable[[VisionTower], ImageInputs]
    chat: ChatFormat
    extra_text_inputs: Callable[[torch.Tensor, Any], dict[str, torch.Tensor]] = field(
        default=lambda input_ids, config: {}
    )
    decoder_path: str = "model.language_model"
    lm_head: str = "lm_head"
    # tiny_config(ids, tower, decoder) -> a config of the family with tiny widths.
    tiny_config: Callable[[dict[str, int], VisionTower, Decoder], Any] | None = None
    tiny_image_size: int = 56

    def tower(self, config: Any) -> VisionTower:
        vision = config_value(config, "vision_config")
        kind = config_value(vision, "model_type") if vision is not None else None
        tower = self._pick(self.towers, kind, "vision tower")
        reason = tower.unsupported(vision)
        if reason:
            raise MquantError(f"{self.name}: the {tower.name} vision tower with {reason} is not described in mquant")
        return tower

    def decoder(self, config: Any) -> Decoder:
        text = config_value(config, "text_config")
        return self._pick(self.decoders, config_value(text, "model_type") if text is not None else None, "decoder")

    def _pick(self, pieces, kind, what: str):
        for piece in pieces:
            if kind in piece.model_types:
                return piece
        if kind is None and len(pieces) == 1:  # a config without sub-configs: the family's only piece
            return pieces[0]
        known = ", ".join(t for p in pieces for t in p.model_types)
        raise MquantError(f"{self.name}: {what} '{kind}' is not described in mquant (known: {known})")

    def by_name(self, tower: str | None = None, decoder: str | None = None) -> tuple[VisionTower, Decoder]:
        """The tower and decoder called `tower` / `decoder` (the first of each by default)."""
        def find(pieces, name, what):
            for p in pieces:
                if name in (None, p.name):
                    return p
            raise MquantError(f"{self.name}: no {what} '{name}' (choose from {', '.join(p.name for p in pieces)})")

        return find(self.towers, tower, "vision tower"), find(self.decoders, decoder, "decoder")

    def resolve(self, config: Any) -> ModelFamily:
        """The family of a checkpoint with this `config`, every path absolute."""
        return self.compose(self.tower(config), self.decoder(config), config)

    def compose(self, tower: VisionTower, decoder: Decoder, config: Any) -> ModelFamily:
        raw_readers = tuple((join_path(self.connector_path, name), chunks)
                            for name, chunks in self.connector.raw_readers(config))
        language = Segment(decoder.layers, decoder.layer).under(self.decoder_path)
        return ModelFamily(
            name=self.name,
            architectures=self.architectures,
            model_class=self.model_class,
            parts=(
                Part("vision", tuple(s.under(self.tower_path) for s in tower.segments)),
                Part("projector", tuple(s.under(self.connector_path) for s in self.connector.segments)),
                Part("language", (language,)),
            ),
            images=self.images(tower),
            chat=self.chat,
            extra_text_inputs=self.extra_text_inputs,
            vision_stream_closed=tower.stream_start is None and not raw_readers,
            vision_stream_start=join_path(self.tower_path, tower.stream_start) if tower.stream_start else None,
            vision_raw_readers=raw_readers,
            language_model=self.decoder_path,
            final_norm=join_path(self.decoder_path, decoder.norm),
            lm_head=self.lm_head,
            pieces=f"{tower.name} + {self.connector.name} + {decoder.name}",
        )
