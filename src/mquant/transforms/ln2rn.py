"""LN2RN (ALGORITHMS.md §5): turn a LayerNorm vision encoder into an RMSNorm one, exactly.

LayerNorm subtracts the per-token mean, which does not commute with a rotation. If every writer of
the residual stream produces zero-mean outputs ("baking the mean out": W ← C·W, b ← C·b with
C = I - 11ᵀ/d), the stream is zero-mean and LN(x) = γ ⊙ x/rms(x) + β. Folding γ and β into the
readers (b ← b + Wβ, W ← W·diag(γ)) then leaves a weightless RMSNorm, which rotations commute with.
A token-merging reader (Qwen2-VL's merger) is folded chunk by chunk.

That needs a *closed* stream: one whose writers can all be mean-baked and whose every reader sits
behind a norm. LLaVA's towers are open: CLIP's stream starts at a LayerNorm (`pre_layrnorm`, whose
gain and shift live in the stream), and with every tower the projector reads a hidden state raw,
so mean-baking would change what it reads (§5.3-5.4). There the stream keeps its mean: γ, β are
folded into the readers, each LayerNorm becomes a weightless centring norm, and a stream-start norm
becomes a weightless norm followed by an FP linear writer (diag γ, β); towers without one (SigLIP,
DINOv2) start their stream with the patch embedding and the additive embeddings (class token,
position table). Layer scales are folded into their writers first. Rotating such a stream by a Q
whose first column is 1/sqrt(d) puts sqrt(d)·mean in channel 0, where a centring norm becomes a
masked RMSNorm (drop channel 0, divide by the RMS over all d channels): exact, and
rotation-friendly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mquant.models.spec import ModelFamily
from mquant.transforms.fuse_norms import fold_layer_scales


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


class CenteringNorm(WeightlessRMSNorm):
    """(x - mean(x)) / std(x): a LayerNorm with γ and β folded away (open streams, before rotation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class MaskedRMSNorm(WeightlessRMSNorm):
    """A centring norm seen in a basis whose channel 0 is sqrt(d)·mean (ALGORITHMS.md §5.3): zero
    channel 0, then divide by sqrt(|x|²/d + eps), with d the full width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = torch.cat([torch.zeros_like(x[..., :1]), x[..., 1:]], dim=-1).float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


class StreamStart(nn.Module):
    """A LayerNorm whose output *is* the stream (CLIP's pre_layrnorm), split into its weightless
    normalization and an FP linear `writer` holding γ and β (and, once rotated, Q): ALGORITHMS.md §5.4."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.writer = nn.Linear(width, width)

    @classmethod
    @torch.no_grad()
    def from_layer_norm(cls, norm: nn.LayerNorm) -> "StreamStart":
        d = norm.normalized_shape[0]
        module = cls(d, norm.eps).to(norm.weight.dtype)
        module.writer.weight.copy_(torch.diag(norm.weight))
        module.writer.bias.copy_(norm.bias)
        return module

    @torch.no_grad()
    def to_layer_norm(self) -> nn.LayerNorm:
        """The LayerNorm this is, once the writer is diagonal again (its stream rotated back)."""
        w = self.writer.weight.double()
        gamma = torch.diagonal(w)
        if (w - torch.diag(gamma)).abs().max() > 1e-6 * w.abs().max():
            raise ValueError("the stream-start writer is not diagonal: rotate the stream back first")
        norm = nn.LayerNorm(w.shape[0], eps=self.eps).to(self.writer.weight.dtype)
        norm.weight.copy_(gamma)
        norm.bias.copy_(self.writer.bias)
        return norm.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.writer(F.layer_norm(x, (x.shape[-1],), eps=self.eps))


@torch.no_grad()
def bake_mean(writer: nn.Module) -> None:
    """Make the writer's output zero-mean over output channels (works for linears and convs)."""
    w = writer.weight.double()
    w = w - w.mean(dim=0, keepdim=True)
    writer.weight.copy_(w.to(writer.weight.dtype))
    if writer.bias is not None:
        writer.bias.copy_((writer.bias.double() - writer.bias.double().mean()).to(writer.bias.dtype))


@torch.no_grad()
def fold_layer_norm(norm: nn.LayerNorm, readers: list[nn.Module], chunks: int = 1) -> None:
    """Fold γ, β into the readers (each reading `chunks` normalized tokens side by side)."""
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


@torch.no_grad()
def bake_mean_embedding(param: nn.Parameter) -> None:
    """Make an additive stream embedding (class token, position table) zero-mean over channels."""
    p = param.double()
    param.copy_((p - p.mean(dim=-1, keepdim=True)).to(param.dtype))


def ln2rn_vision(model: nn.Module, family: ModelFamily) -> int:
    """Apply LN2RN to the vision encoder and the norm-led projector. Returns the number of norms
    replaced: by weightless RMSNorms on a closed stream (writers mean-baked), by centring norms on
    an open one (see the module docstring). Layer scales are folded into their writers first."""
    first = family.part("vision").segments[0].layout
    if family.vision_stream_start is None and not (first.residual_writers or first.stream_embeddings):
        raise NotImplementedError(f"LN2RN for the {family.name} vision tower ({family.pieces}) is not implemented: "
                                  "its stream's start is not declared (a stream-start norm, or writers of the "
                                  "first segment)")
    fold_layer_scales(model, family, ("vision",))
    if family.vision_stream_closed:
        for layout, _, block in family.blocks(model, ("vision",)):
            for name in layout.residual_writers:
                bake_mean(block.get_submodule(name))
        for param in family.stream_embeddings(model, "vision"):
            bake_mean_embedding(param)
        replacement = WeightlessRMSNorm
    else:
        if family.vision_stream_start is not None:
            model.set_submodule(family.vision_stream_start,
                                StreamStart.from_layer_norm(model.get_submodule(family.vision_stream_start)))
        replacement = CenteringNorm
    replaced = 0
    for layout, _, block in family.blocks(model, ("vision", "projector")):
        for norm_name, readers in layout.norm_readers:
            norm = block.get_submodule(norm_name)
            fold_layer_norm(norm, [block.get_submodule(r) for r in readers], layout.norm_chunks)
            block.set_submodule(norm_name, replacement(norm.eps))
            replaced += 1
    return replaced
