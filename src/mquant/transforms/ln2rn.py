"""LN2RN (ALGORITHMS.md §5): turn a LayerNorm vision encoder into an RMSNorm one, exactly.

LayerNorm subtracts the per-token mean, which does not commute with a rotation. If every writer of
the residual stream produces zero-mean outputs ("baking the mean out": W ← C·W, b ← C·b with
C = I - 11ᵀ/d), the stream is zero-mean and LN(x) = γ ⊙ x/rms(x) + β. Folding γ and β into the
readers (b ← b + Wβ, W ← W·diag(γ)) then leaves a weightless RMSNorm, which rotations commute with.
A token-merging reader (Qwen2-VL's merger) is folded chunk by chunk.
"""

from __future__ import annotations

import torch
from torch import nn

from mquant.models.spec import ModelFamily


class WeightlessRMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps): a LayerNorm on a zero-mean stream, with γ and β folded away."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


@torch.no_grad()
def bake_mean(writer: nn.Module) -> None:
    """Make the writer's output zero-mean over output channels (works for linears and convs)."""
    w = writer.weight.double()
    w = w - w.mean(dim=0, keepdim=True)
    writer.weight.copy_(w.to(writer.weight.dtype))
    if writer.bias is not None:
        writer.bias.copy_((writer.bias.double() - writer.bias.double().mean()).to(writer.bias.dtype))


@torch.no_grad()
def fold_layer_norm(norm: nn.LayerNorm, readers: list[nn.Module], chunks: int = 1) -> WeightlessRMSNorm:
    """Fold γ, β into the readers (each reading `chunks` normalized tokens side by side); returns
    the weightless RMSNorm that replaces the LayerNorm."""
    if not isinstance(norm, nn.LayerNorm):
        raise ValueError(f"expected a LayerNorm, got {type(norm).__name__}")
    d = norm.normalized_shape[0]
    gamma = norm.weight.double() if norm.weight is not None else torch.ones(d, dtype=torch.float64)
    beta = norm.bias.double() if norm.bias is not None else torch.zeros(d, dtype=torch.float64)
    for linear in readers:
        w = linear.weight.double()  # [out, chunks * d]
        shift = w @ beta.repeat(chunks)
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=linear.weight.dtype), requires_grad=False)
        linear.bias.copy_((linear.bias.double() + shift).to(linear.bias.dtype))
        linear.weight.copy_((w * gamma.repeat(chunks)).to(linear.weight.dtype))
    return WeightlessRMSNorm(norm.eps)


def ln2rn_vision(model: nn.Module, family: ModelFamily) -> int:
    """Apply LN2RN to the vision encoder and the norm-led projector. Returns the number of norms
    replaced. The family must declare its vision stream closed (see `ModelFamily`)."""
    if not family.vision_stream_closed:
        raise NotImplementedError(f"LN2RN for the {family.name} vision tower is not implemented yet "
                                  "(its stream has a stream-start norm or a raw reader)")
    for segment in family.part("vision").segments:
        for _, block in segment.blocks(model):
            for name in segment.layout.residual_writers:
                bake_mean(block.get_submodule(name))
    replaced = 0
    for part in ("vision", "projector"):
        for segment in family.part(part).segments:
            for _, block in segment.blocks(model):
                for norm_name, readers in segment.layout.norm_readers:
                    rms = fold_layer_norm(block.get_submodule(norm_name),
                                          [block.get_submodule(r) for r in readers], segment.layout.norm_chunks)
                    block.set_submodule(norm_name, rms)
                    replaced += 1
    return replaced
