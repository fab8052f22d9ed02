"""`mquant tiny`: a tiny randomly initialised model of a family, with an offline tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from mquant.fileio import atomic_directory
from mquant.models.registry import family_by_name
from mquant.models.tokenizer import build_tokenizer, token_ids


def write_tiny(family_name: str, out: str | Path, seed: int = 0) -> Path:
    family = family_by_name(family_name)
    tokenizer = build_tokenizer(family)
    config = family.tiny_config(token_ids(tokenizer))
    torch.manual_seed(seed)
    model = family.model_class(config).eval()
    _spread_norms(model, seed)
    processor = family.images.make_processor(family.tiny_image_size)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out)


@torch.no_grad()
def _spread_norms(model: torch.nn.Module, seed: int) -> None:
    """Randomise norm gains/biases (initialised to 1/0), so that tests of norm folding and
    smoothing are not trivially passed by identity gains."""
    g = torch.Generator().manual_seed(seed + 1)
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower() or "norm" in name.split(".")[-1]:
            if getattr(module, "weight", None) is not None and module.weight.dim() == 1:
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=g))
            if getattr(module, "bias", None) is not None and module.bias.dim() == 1:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
