"""SmoothQuant (ALGORITHMS.md §11.2): migrate activation outliers into the weights.

For a norm followed by readers W_1..W_k, s_j = max|X_j|^alpha / max_i |W_i[:, j]|^(1-alpha); the
norm's gain (and bias) is divided by s and every reader's columns multiplied by s. The function is
unchanged; only the ranges the quantizers see move.
"""

from __future__ import annotations

import torch
from torch import nn


def smoothing_factors(act_absmax: torch.Tensor, readers: list[nn.Module], alpha: float) -> torch.Tensor:
    w_absmax = torch.stack([m.weight.detach().abs().amax(dim=0).double() for m in readers]).amax(dim=0)
    a = act_absmax.double().clamp(min=1e-5)
    s = a.pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


@torch.no_grad()
def apply_smoothing(norm: nn.Module, readers: list[nn.Module], s: torch.Tensor) -> None:
    """Fold diag(s)^-1 into the norm's affine parameters and diag(s) into each reader (float64)."""
    if getattr(norm, "weight", None) is None:
        raise ValueError(f"cannot smooth behind a norm without a gain: {type(norm).__name__}")
    norm.weight.copy_((norm.weight.double() / s).to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias.double() / s).to(norm.bias.dtype))
    for m in readers:
        m.weight.copy_((m.weight.double() * s).to(m.weight.dtype))
