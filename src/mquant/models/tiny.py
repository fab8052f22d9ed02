"""`mquant tiny`: a tiny randomly initialised model of a family, with an offline tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from mquant.fileio import atomic_directory
from mquant.models.registry import family_by_name
from mquant.models.spec import ModelFamily
from mquant.models.tokenizer import build_tokenizer, token_ids


def write_tiny(family_name: str, out: str | Path, seed: int = 0, tower: str | None = None,
               decoder: str | None = None) -> Path:
    """Write the tiny model of `family_name` (with the named vision tower and decoder, for families
    that compose several; the first of each by default) to `out`."""
    composition = family_by_name(family_name)
    vision, text = composition.by_name(tower, decoder)
    tokenizer = build_tokenizer(composition.chat)
    config = composition.tiny_config(token_ids(tokenizer), vision, text)
    family = composition.compose(vision, text, config)
    torch.manual_seed(seed)
    model = family.model_class(config).eval()
    _spread_gains(model, family, seed)
    processor = family.images.make_processor(composition.tiny_image_size)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out)


@torch.no_grad()
def _spread_gains(model: torch.nn.Module, family: ModelFamily, seed: int) -> None:
    """Randomise norm gains/biases (initialised to 1/0), layer scales (a constant) and all-zero stream
    embeddings, so that tests of folding, smoothing and rotation are not passed trivially."""
    g = torch.Generator().manual_seed(seed + 1)
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower() or "norm" in name.split(".")[-1]:
            if getattr(module, "weight", None) is not None and module.weight.dim() == 1:
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=g))
            if getattr(module, "bias", None) is not None and module.bias.dim() == 1:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
    for layout, _, block in family.blocks(model, ("vision", "projector", "language")):
        for _, scale in layout.layer_scales:
            lam = block.get_parameter(scale)
            lam.copy_(lam * (1 + 0.5 * torch.randn(lam.shape, generator=g)))
    # Stream embeddings initialised to zero (register tokens) would pass any rotation test.
    for param in family.stream_embeddings(model, "vision"):
        if not param.any():
            param.copy_(0.5 * torch.randn(param.shape, generator=g))
