"""SmoothQuant (ALGORITHMS.md §11.2): migrate activation outliers into the weights.

For a norm followed by readers W_1..W_k, s_j = max|X_j|^alpha / max_i |W_i[:, j]|^(1-alpha); the
norm's gain (and bias) is divided by s and every reader's columns multiplied by s. The function is
unchanged; only the ranges the quantizers see move.

A token-merging reader (`chunks` > 1) sees several normalized tokens side by side, so its input
channel j·d + c is norm channel c: one factor per norm channel serves every chunk, taken as the
maximum over the chunks of both statistics.
"""

from __future__ import annotations

import torch
from torch import nn


def smoothing_factors(act_absmax: torch.Tensor, readers: list[nn.Module], alpha: float,
                      chunks: int = 1) -> torch.Tensor:
    """Factors s of length in_features / chunks (the norm's width)."""
    w_absmax = torch.stack([m.weight.detach().abs().amax(dim=0).double() for m in readers]).amax(dim=0)
    w_absmax = w_absmax.view(chunks, -1).amax(dim=0)
    a = act_absmax.double().view(chunks, -1).amax(dim=0).clamp(min=1e-5)
    s = a.pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


@torch.no_grad()
def apply_smoothing(norm: nn.Module, readers: list[nn.Module], s: torch.Tensor, chunks: int = 1) -> None:
    """Fold diag(s)^-1 into the norm's affine parameters and diag(s) into each reader (float64)."""
    if getattr(norm, "weight", None) is None:
        raise ValueError(f"cannot smooth behind a norm without a gain: {type(norm).__name__}")
    norm.weight.copy_((norm.weight.double() / s).to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias.double() / s).to(norm.bias.dtype))
    for m in readers:
        m.weight.copy_((m.weight.double() * s.repeat(chunks)).to(m.weight.dtype))
