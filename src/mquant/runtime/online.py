"""Online Hadamard (R4, ALGORITHMS.md §3.7): a linear whose input is rotated at run time.

The input of down_proj / the ViT's fc2 comes out of a nonlinearity, so no offline rotation reaches
it. Split R4 in two halves: offline W ← W·H (fused in float64, zero columns appended when the width
had to be padded), online x ← x·H just before the activation quantizer. Then
(xH)(WH)ᵀ = x Wᵀ exactly. With `split_channel0` (RMS, ALGORITHMS.md §6) channel 0 of xH is computed
as its own rank-1 branch, the same function regrouped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mquant.transforms.hadamard import FastHadamard, HadamardSpec, hadamard_spec


class OnlineHadamardLinear(nn.Module):
    """y = (x·H) Wᵀ + b, with H applied by the fast transform and W already fused with H."""

    def __init__(self, spec: HadamardSpec, out_features: int, bias: bool) -> None:
        super().__init__()
        self.input_transform = FastHadamard(spec)
        self.weight = nn.Parameter(torch.zeros(out_features, spec.order), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.split_channel0 = False

    @classmethod
    @torch.no_grad()
    def fuse(cls, linear: nn.Linear) -> "OnlineHadamardLinear":
        spec = hadamard_spec(linear.in_features)
        module = cls(spec, linear.out_features, linear.bias is not None)
        # Rows of W are right-multiplied by H: exactly what the fast transform does to a row vector.
        fused = FastHadamard(spec).double()(linear.weight.double())
        module.weight.copy_(fused.to(linear.weight.dtype))
        if linear.bias is not None:
            module.bias.copy_(linear.bias)
        return module.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_transform(x).to(self.weight.dtype)
        if not self.split_channel0:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x[..., 1:], self.weight[:, 1:], self.bias) + x[..., :1] * self.weight[:, 0]

    def extra_repr(self) -> str:
        return f"order={self.input_transform.spec.order}, out={self.weight.shape[0]}, split_channel0={self.split_channel0}"
