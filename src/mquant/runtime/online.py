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

from mquant.runtime import native
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


class NativeHadamard(nn.Module):
    """`FastHadamard`'s transform run by the native butterflies (`mquant.runtime.native`: in fp32,
    rounded once; 3-4x faster at prefill widths, a few µs for a decode row) where they take the
    input, else by `fast` itself. The integer runtime's; the fake-quant model keeps `FastHadamard`."""

    def __init__(self, fast: FastHadamard) -> None:
        super().__init__()
        self.fast, self.spec = fast, fast.spec
        self._hk = fast.hk.float().contiguous()  # not a buffer: a cast of the model must not round it

    @classmethod
    def wrap(cls, fast: FastHadamard) -> nn.Module:
        """`fast` wrapped where the native transform runs its shape (segments of 16k), else itself."""
        fits = native.available() and native.hadamard_fits(fast.spec.order, fast.spec.k)
        return cls(fast) if fits else fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if native.takes(x2):
            return native.hadamard(x2, self.spec.order, self._hk).reshape(*x.shape[:-1], self.spec.order)
        return self.fast(x)
