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


def head_rotation(head_dim: int, seed: int | None) -> torch.Tensor:
    """The per-head rotation H_h: exact Walsh-Hadamard/Paley when `seed` is None, else random-sign."""
    if seed is not None:
        return random_hadamard(head_dim, seed)
    spec = hadamard_spec(head_dim)
    if spec.padded:
        raise ValueError(f"head dimension {head_dim} has no Hadamard construction")
    return torch.tensor(dense_hadamard(spec), dtype=torch.float64) / head_dim**0.5


@torch.no_grad()
def rotate_heads(block: nn.Module, layout, n_heads: int, n_kv_heads: int, H: torch.Tensor) -> None:
    """R2 (ALGORITHMS.md §3.6): every KV head's values become v·H_h and the output projection
    undoes it per query head. Softmax-weighted sums commute with H_h, so attention is unchanged;
    with GQA every head uses the same H_h."""
    d = H.shape[0]
    v = block.get_submodule(layout.v)
    rows = v.weight.shape[0]
    start = rows - n_kv_heads * d if layout.v_rows == "last-third" else 0
    w = v.weight.double()
    for g in range(n_kv_heads):
        sl = slice(start + g * d, start + (g + 1) * d)
        w[sl] = H.T @ w[sl]
        if v.bias is not None:
            v.bias[sl] = (v.bias[sl].double() @ H).to(v.bias.dtype)
    v.weight.copy_(w.to(v.weight.dtype))
    o = block.get_submodule(layout.o)
    wo = o.weight.double().reshape(o.weight.shape[0], n_heads, d) @ H
    o.weight.copy_(wo.reshape(o.weight.shape).to(o.weight.dtype))


def rotate_language_heads(model: nn.Module, family: ModelFamily, seed: int | None = None) -> None:
    config = model.config.text_config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    H = head_rotation(head_dim, seed)
    for segment in family.part("language").segments:
        for _, block in segment.blocks(model):
            rotate_heads(block, segment.layout.attention, config.num_attention_heads,
                         config.num_key_value_heads, H)
