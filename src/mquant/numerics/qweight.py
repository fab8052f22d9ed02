"""A quantized weight: integer codes plus the scales that map them back to real values."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mquant.numerics.args import QuantArgs
from mquant.numerics.grid import dequantize
from mquant.numerics.observers import scale_for_columns


@dataclass
class QuantizedWeight:
    """Codes `q` [out, in] (int8, or uint8 for asymmetric 8-bit), `scale` and optional `zero_point`
    at the granularity of `args` (tensor [1], channel [out, 1], group [out, n_groups])."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    args: QuantArgs

    def dequantize(self) -> torch.Tensor:
        cols = self.q.shape[1]
        return dequantize(
            self.q.float(),
            scale_for_columns(self.scale, self.args, cols),
            scale_for_columns(self.zero_point, self.args, cols),
        )


def codes_dtype(args: QuantArgs) -> torch.dtype:
    return torch.uint8 if (not args.symmetric and args.num_bits == 8) else torch.int8
