"""Execution backends for a quantized model.

- "fake": the fake-quant reference (`QuantLinear`), float32 by default; the accuracy numbers.
- "cpu-int8": every quantized linear with a quantized input runs on int8 kernels (`Int8Gemm`:
  oneDNN/AMX or `torch._int_mm`), 4-bit weights unpacked to int8 once here, bf16 elsewhere.
- "triton": the same on CUDA with the Triton W4A8 kernel (int4 unpacked in the kernel); 8-bit
  weights use `torch._int_mm`.
Weight-only layers (no activation quantizer) run as float linears of their dequantized weights.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from mquant.errors import MquantError
from mquant.runtime.int8_ops import Int8Gemm
from mquant.runtime.int_linear import IntLinear
from mquant.runtime.qlinear import quant_linears

BACKENDS = ("fake", "cpu-int8", "triton")
DEFAULT_DTYPE = {"fake": torch.float32, "cpu-int8": torch.bfloat16, "triton": torch.bfloat16}


def triton_unavailable_reason() -> str | None:
    """None when the Triton backend can run here, otherwise why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the triton package is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernel in Triton's interpreter)"
    return None


def _gemm_factory(backend: str, kernel: str):
    if backend == "cpu-int8":
        return functools.partial(Int8Gemm, kernel=kernel)
    from mquant.runtime.triton_w4a8 import TritonW4A8Gemm

    def make(codes, scale, group_size, bias):
        if codes.numel() and codes.min() >= -8 and codes.max() <= 7 and group_size is None:
            return TritonW4A8Gemm(codes, scale, group_size, bias)
        return Int8Gemm(codes, scale, group_size, bias, kernel="int_mm")

    return make


def to_backend(model: nn.Module, backend: str, dtype: torch.dtype | None = None, kernel: str = "auto",
               family=None, fuse_norms: bool = True) -> nn.Module:
    """Convert `model`'s `QuantLinear`s in place to run on `backend`; returns the model in `dtype`
    (default: float32 for "fake", bfloat16 for the integer backends). With the model's `family`, on
    cpu-int8, the norms that feed quantized linears also compute their codes (`fused_norm`)."""
    if backend not in BACKENDS:
        raise MquantError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    dtype = dtype or DEFAULT_DTYPE[backend]
    if backend == "fake":
        return model.to(dtype)
    layers = quant_linears(model)
    if not layers:
        raise MquantError("the model has no quantized layers to run on an integer backend")
    device = next(model.parameters()).device
    if backend == "cpu-int8" and device.type != "cpu":
        raise MquantError(f"backend cpu-int8 runs on the CPU; the model is on {device}")
    if backend == "triton":
        reason = triton_unavailable_reason()
        if reason:
            raise MquantError(f"backend triton is unavailable: {reason}")
    make_gemm = _gemm_factory(backend, kernel)
    for name, layer in layers:
        model.set_submodule(name, IntLinear.from_quant(layer, make_gemm, dtype))
    model.to(dtype)
    if backend == "cpu-int8" and family is not None and fuse_norms:
        from mquant.runtime.fused_norm import fuse_norms as fuse

        fuse(model, family)
    return model
