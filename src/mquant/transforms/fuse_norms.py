"""Fold RMSNorm gains into the linears that read the norm's output (ALGORITHMS.md §3.2), and
layer scales into the linears whose output they scale (§5.2).

RMSN_γ(h) = γ ⊙ h / rms(h), so every reader W behind the norm can absorb the gain: W ← W·diag(γ),
γ ← 1. The function is unchanged, and the norm becomes weightless — the precondition for rotating
the residual stream. A layer scale (x + λ ⊙ f(x), DINOv2) likewise goes into f's last linear:
W ← diag(λ)·W, b ← λ ⊙ b, λ ← 1, so that the linear alone writes the stream. Fusions run in
float64 and are cast back.
"""

from __future__ import annotations

import torch
from torch import nn

from mquant.models.spec import ModelFamily


def is_rms_norm(module: nn.Module) -> bool:
    return "rmsnorm" in type(module).__name__.lower() and getattr(module, "bias", None) is None


@torch.no_grad()
def untie_lm_head(model: nn.Module, family: ModelFamily) -> bool:
    """Give the output head its own weight if it shares the embedding's (folding or rotating the
    head must not change the embedding). Returns whether it was tied."""
    head = model.get_submodule(family.lm_head)
    embed = model.get_input_embeddings()
    if head.weight is not embed.weight and head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "text_config"):
        model.config.text_config.tie_word_embeddings = False
    return True


@torch.no_grad()
def fold_gain(norm: nn.Module, readers: list[nn.Module]) -> None:
    if not is_rms_norm(norm):
        raise ValueError(f"{type(norm).__name__} is not an RMSNorm: LayerNorms need LN2RN first")
    gamma = norm.weight.double()
    for linear in readers:
        linear.weight.copy_((linear.weight.double() * gamma).to(linear.weight.dtype))
    norm.weight.fill_(1.0)


def fold_norm_gains(model: nn.Module, family: ModelFamily, parts: tuple[str, ...] = ("language",)) -> int:
    """Fold every declared (norm -> readers) gain in `parts`, and, for the language model, the final
    norm into the output head. Returns the number of norms folded."""
    folded = 0
    for layout, _, block in family.blocks(model, parts):
        for norm, readers in layout.norm_readers:
            fold_gain(block.get_submodule(norm), [block.get_submodule(r) for r in readers])
            folded += 1
    if "language" in parts:
        untie_lm_head(model, family)
        fold_gain(model.get_submodule(family.final_norm), [model.get_submodule(family.lm_head)])
        folded += 1
    return folded


@torch.no_grad()
def fold_layer_scales(model: nn.Module, family: ModelFamily, parts: tuple[str, ...] = ("vision",)) -> int:
    """Fold every declared (writer, λ) layer scale in `parts`; returns how many were folded."""
    folded = 0
    for layout, _, block in family.blocks(model, parts):
        for writer_name, scale_name in layout.layer_scales:
            lam = block.get_parameter(scale_name)
            writer = block.get_submodule(writer_name)
            scale = lam.double().reshape(-1, *([1] * (writer.weight.dim() - 1)))
            writer.weight.copy_((writer.weight.double() * scale).to(writer.weight.dtype))
            if writer.bias is not None:
                writer.bias.copy_((writer.bias.double() * lam.double()).to(writer.bias.dtype))
            lam.fill_(1.0)
            folded += 1
    return folded
