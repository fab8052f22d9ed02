"""Packing of 4-bit integers, two per byte.

Signed values in [-8, 7] are stored offset-binary (value + 8), the even column in the low nibble.
An odd number of columns is padded with one zero code; `unpack_int4` takes the true width.
"""

from __future__ import annotations

import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[..., n] integers in [-8, 7] -> [..., ceil(n/2)] uint8."""
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("pack_int4 needs values in [-8, 7]")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[-1] % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_int4`: [..., ceil(n/2)] uint8 -> [..., n] int8."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 needs uint8, got {packed.dtype}")
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).flatten(-2)[..., :n]
