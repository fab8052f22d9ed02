"""Round-to-nearest weight quantization (ALGORITHMS.md §2.1): no data, the baseline and fallback."""

from __future__ import annotations

import torch

from mquant.numerics.args import QuantArgs
from mquant.numerics.grid import quantize
from mquant.numerics.observers import scale_for_columns, weight_qparams
from mquant.numerics.qweight import QuantizedWeight, codes_dtype


def rtn_quantize(weight: torch.Tensor, args: QuantArgs) -> QuantizedWeight:
    w = weight.detach().float()
    scale, zero_point = weight_qparams(w, args)
    cols = w.shape[1]
    q = quantize(w, scale_for_columns(scale, args, cols), scale_for_columns(zero_point, args, cols), args)
    return QuantizedWeight(q.to(codes_dtype(args)), scale, zero_point, args)
