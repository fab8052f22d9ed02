"""Rotate a residual stream by an orthogonal Q (ALGORITHMS.md §3.1, §3.3): h -> hQ.

Exact when the stream is read only through weightless RMSNorms (fold the gains first) or linears,
and written only by linears and the embedding: readers take W ← WQ, writers W ← QᵀW and b ← Qᵀb,
the embedding E ← EQ. Which linears read and write the stream comes from the family's declarative
layouts. Fusions run in float64.
"""

from __future__ import annotations

import torch
from torch import nn

from mquant.models.spec import ModelFamily
from mquant.transforms.fuse_norms import is_rms_norm
from mquant.transforms.hadamard import dense_hadamard, hadamard_spec


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """Q = diag(s)·H/sqrt(n) with seeded random signs s (float64, orthogonal)."""
    spec = hadamard_spec(n)
    if spec.padded:
        raise ValueError(f"width {n} has no Hadamard construction; a residual stream cannot be padded")
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1
    H = torch.tensor(dense_hadamard(spec), dtype=torch.float64) / n**0.5
    return signs[:, None] * H


@torch.no_grad()
def rotate_reader(linear: nn.Module, Q: torch.Tensor) -> None:
    """y = x W^T reads x; with x -> xQ the weight becomes W Q."""
    linear.weight.copy_((linear.weight.double() @ Q).to(linear.weight.dtype))


@torch.no_grad()
def rotate_writer(linear: nn.Module, Q: torch.Tensor) -> None:
    """y = x W^T + b is added to the stream; the stream is now yQ, so W ← QᵀW and b ← Qᵀb."""
    linear.weight.copy_((Q.T @ linear.weight.double()).to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_((linear.bias.double() @ Q).to(linear.bias.dtype))


@torch.no_grad()
def rotate_language_stream(model: nn.Module, family: ModelFamily, Q: torch.Tensor) -> None:
    """R1: the language model's residual stream, including the embedding, the projector output
    that is scattered into it, every decoder layer and the output head."""
    embed = model.get_input_embeddings()
    embed.weight.copy_((embed.weight.double() @ Q).to(embed.weight.dtype))
    for segment in family.part("projector").segments:
        for _, block in segment.blocks(model):
            for name in segment.layout.residual_writers:
                rotate_writer(block.get_submodule(name), Q)
    for segment in family.part("language").segments:
        for _, block in segment.blocks(model):
            for norm, readers in segment.layout.norm_readers:
                if not is_rms_norm(block.get_submodule(norm)) or not torch.all(block.get_submodule(norm).weight == 1):
                    raise ValueError(f"{norm} still has a gain: fold norm gains before rotating")
                for name in readers:
                    rotate_reader(block.get_submodule(name), Q)
            for name in segment.layout.residual_writers:
                rotate_writer(block.get_submodule(name), Q)
    rotate_reader(model.get_submodule(family.lm_head), Q)
