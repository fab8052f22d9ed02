"""Integer grids: range statistics, scales and zero-points, quantize, dequantize, fake-quantize.

Shapes: weights are [out, in]; activations are [..., in]. A scale broadcasts against the tensor it
quantizes after `expand_groups` (for group scales, which are stored as [out, n_groups]).
"""

from __future__ import annotations

import math

import torch

from mquant.numerics.args import QuantArgs

MIN_SCALE = 1e-8  # guards against a degenerate (all-zero) range producing inf/NaN


def range_stats(x: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of `x` reduced at the granularity of `args`, shaped like the scales."""
    x = x.float()
    if args.strategy == "tensor":
        return x.amin().reshape(1), x.amax().reshape(1)
    if args.strategy in ("channel", "token"):
        return x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    groups = split_groups(x, args.group_size)
    return groups.amin(dim=-1), groups.amax(dim=-1)


def split_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View [out, in] as [out, n_groups, group_size]; a partial last group is padded with zeros.

    Zero padding never widens a range, because every range includes 0.
    """
    out, cols = x.shape
    n_groups = math.ceil(cols / group_size)
    pad = n_groups * group_size - cols
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(out, n_groups, group_size)


def expand_groups(t: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    """Per-group [out, n_groups] parameters expanded to one value per column, [out, cols]."""
    return t.repeat_interleave(group_size, dim=1)[:, :cols]


def qparams_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, args: QuantArgs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero-point for asymmetric grids) from a range; the range always includes 0."""
    xmin = torch.minimum(xmin.float(), torch.zeros_like(xmin, dtype=torch.float32))
    xmax = torch.maximum(xmax.float(), torch.zeros_like(xmax, dtype=torch.float32))
    if args.symmetric:
        scale = torch.maximum(xmin.abs(), xmax) / args.qmax
        return scale.clamp(min=MIN_SCALE), None
    scale = ((xmax - xmin) / (args.qmax - args.qmin)).clamp(min=MIN_SCALE)
    zero_point = torch.clamp(torch.round(-xmin / scale), args.qmin, args.qmax)
    return scale, zero_point


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, args: QuantArgs
) -> torch.Tensor:
    """Integer codes (as float32 holding integers; round half to even, clamped to the grid)."""
    q = torch.round(x.float() / scale)
    if zero_point is not None:
        q = q + zero_point
    return q.clamp(args.qmin, args.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    if zero_point is not None:
        q = q - zero_point
    return q * scale


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, args: QuantArgs
) -> torch.Tensor:
    """Exactly dequantize(quantize(x)), returned in the dtype of `x`."""
    return dequantize(quantize(x, scale, zero_point, args), scale, zero_point).to(x.dtype)


def dynamic_fake_quantize(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Fake-quantize with scales computed from `x` itself (per token, or per tensor)."""
    xmin, xmax = range_stats(x, args)
    scale, zero_point = qparams_from_range(xmin, xmax, args)
    return fake_quantize(x, scale, zero_point, args)
