"""Activation quantization fused into the norm before it (ALGORITHMS.md §14.3).

A quantized linear that reads a norm's output (q/k/v after the attention norm, gate/up after the MLP
norm, the vision blocks' qkv and fc1) would otherwise cost three passes over its input: the norm
writes it, the quantizer reads it and writes codes, the GEMM reads the codes. `QuantizingNorm`
computes the norm and its readers' codes in one compiled pass (both encodings when its readers'
kernels differ: signed, and code + 128 for oneDNN's VNNI path) and leaves the codes where the
readers look for an already-quantized input (`int_linear.SHARED`), so they go straight to the GEMM.

The codes are those of the separate quantizer applied to the norm's output as returned (rounded to
the model's dtype first): the fused pass changes where they are computed, not what they are.
Fused: static scales (one, or AIFS's two row blocks) and dynamic per-token; MSQ's per-row lookup
without AIFS leaves the quantization to the readers. The norms it knows are checked against the
module on a random input when installed; a norm it does not know (or that fails the check) stays
as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from mquant.numerics.grid import MIN_SCALE
from mquant.runtime import native
from mquant.runtime.compiling import EAGER_BELOW, compiled
from mquant.runtime.cpu_kernels import ZERO_POINT_U8
from mquant.runtime.int_linear import SHARED, IntLinear

# Inputs of fewer elements run the norm's own ops and one native quantizer call (by the first reader,
# shared with the others) where this CPU has it: cheaper than the fused pass's many eager ones.
NATIVE_BELOW = EAGER_BELOW

# How the norms compute, by kind (their eager forwards, written out so one compiled function serves them all):
#   "rms"         HF's Llama/Qwen2/Mistral RMSNorm: w * (x / rms(x)).to(dtype)
#   "weightless"  mquant's WeightlessRMSNorm: (x / rms(x)).to(dtype)
#   "masked"      mquant's MaskedRMSNorm: channel 0 zeroed, then as "weightless"
#   "centering"   mquant's CenteringNorm: layer_norm(x) without gain or shift
#   "layer"       nn.LayerNorm with gain and shift
KINDS = ("rms", "weightless", "masked", "centering", "layer")


def norm_kind(norm: nn.Module) -> str | None:
    from mquant.transforms.ln2rn import CenteringNorm, MaskedRMSNorm, WeightlessRMSNorm

    if isinstance(norm, MaskedRMSNorm):
        return "masked"
    if isinstance(norm, CenteringNorm):
        return "centering"
    if isinstance(norm, WeightlessRMSNorm):
        return "weightless"
    if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None:
        return "layer"
    if "RMSNorm" in type(norm).__name__ and isinstance(getattr(norm, "weight", None), torch.Tensor) \
            and getattr(norm, "bias", None) is None and _eps(norm) is not None:
        return "rms"  # verified numerically on install: a variant computing otherwise (Gemma's 1 + w) is left alone
    return None


def norm_params(norm: nn.Module, kind: str) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """(gain, shift, eps) of a norm of `kind`, as `norm_quantize` takes them."""
    weight = norm.weight if kind in ("rms", "layer") else None
    bias = norm.bias if kind == "layer" else None
    return weight, bias, _eps(norm) if kind == "rms" else norm.eps


def _eps(norm: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(norm, name, None)
        if isinstance(value, float):
            return value
    return None


def norm_quantize(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, kind: str,
                  inner: torch.Tensor, outer: torch.Tensor, start: int, stop: int, qmin: int, qmax: int,
                  dynamic: bool, signed: bool, unsigned: bool):
    """(norm(x), signed codes or None, unsigned codes or None, per-row scales or None) in one pass.
    Static: rows [start, stop) on `inner`, the rest on `outer` (start == stop: one scale)."""
    dtype = x.dtype
    h = x.float()
    if kind == "masked":
        h = torch.cat([torch.zeros_like(h[..., :1]), h[..., 1:]], dim=-1)
    if kind in ("centering", "layer"):
        h = h - h.mean(-1, keepdim=True)
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if kind == "layer":
        y = y * weight.float() + bias.float()
    y = y.to(dtype)
    if kind == "rms":
        y = weight * y
    y2 = y.reshape(-1, y.shape[-1]).float()
    if dynamic:
        scale = (y2.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=MIN_SCALE)
    else:
        row = torch.arange(y2.shape[0], device=y2.device)[:, None]
        scale = torch.where((row >= start) & (row < stop), inner, outer)
    q = torch.clamp(torch.round(y2 / scale), qmin, qmax)
    return (y, q.to(torch.int8) if signed else None, (q + ZERO_POINT_U8).to(torch.uint8) if unsigned else None,
            scale if dynamic else None)


def _readers_agree(readers: list[IntLinear]) -> bool:
    """Readers whose inputs are quantized alike, straight from the norm's output."""
    first = readers[0]
    for r in readers:
        if r.gemm is None or r.act_args is None or r.patch is not None or r.input_transform is not None \
                or r.channel0 is not None:
            return False
        same = (r.qmin, r.qmax, r.act_args.dynamic, r.per_modality, r.modality) == \
            (first.qmin, first.qmax, first.act_args.dynamic, first.per_modality, first.modality)
        if not same or (not r.act_args.dynamic and (r.text_scale, r.visual_scale) != (first.text_scale, first.visual_scale)):
            return False
    return True


class QuantizingNorm(nn.Module):
    """`norm`, computing its readers' int8 codes in the same pass (see the module docstring)."""

    def __init__(self, norm: nn.Module, kind: str, readers: list[IntLinear]) -> None:
        super().__init__()
        self.norm, self.kind = norm, kind
        self._readers = tuple(readers)  # a tuple, not submodules: they stay where the model has them
        self.fused_calls = 0
        # A reader that does not multiply the norm's output as it is (Qwen2-VL's merger reads it
        # merged four tokens to a row) quantizes for itself: seen on the next call, the fusion stops.
        self.active, self._quantized_before = True, None

    def _readers_missed(self) -> bool:
        done = sum(r.quantizations for r in self._readers)
        missed = self._quantized_before is not None and done > self._quantized_before
        self._quantized_before = done
        return missed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self._readers[0]
        rows = x.numel() // x.shape[-1]
        if self.active and self._readers_missed():
            self.active = False
        how = first.layout(rows) if self.active else None
        # Not fused: MSQ without AIFS (each reader looks its rows up), another dtype, a benchmark's
        # replay, a small input with the native quantizer (NATIVE_BELOW).
        small = x.numel() < NATIVE_BELOW and native.takes(x.reshape(rows, x.shape[-1]))
        if how is None or how[0] == "rows" or small or x.dtype != first.dtype \
                or any(r.path != first.path or r.replay is not None for r in self._readers):
            self._quantized_before = None
            return self.norm(x)
        encodings = {r.gemm.unsigned_input(rows, first.dtype) for r in self._readers}
        dynamic = how[0] == "dynamic"
        start, stop = (how[1], how[2]) if how[0] == "block" else (0, 0)
        weight, bias, eps = norm_params(self.norm, self.kind)
        inner = first.visual_scale_t if how[0] == "block" else None
        outer = None if dynamic else first.text_scale_t
        y, signed, unsigned, row_scale = compiled(norm_quantize)(
            x, weight, bias, eps, self.kind, inner if inner is not None else outer, outer, start, stop,
            first.qmin, first.qmax, dynamic, False in encodings, True in encodings)
        shape = (rows, x.shape[-1])
        for is_unsigned, codes in ((False, signed), (True, unsigned)):
            if codes is not None:
                SHARED.put(y, first.codes_key(shape, how, is_unsigned), (codes, row_scale) if dynamic else codes)
        self.fused_calls += 1
        self._quantized_before = sum(r.quantizations for r in self._readers)
        return y

    def extra_repr(self) -> str:
        return f"kind={self.kind}, readers={len(self._readers)}, active={self.active}"


@torch.no_grad()
def _computes_like(norm: nn.Module, kind: str, dtype: torch.dtype) -> bool:
    """Whether the fused pass's norm matches the module's own forward on a random input."""
    width = next((p.shape[-1] for p in norm.parameters()), None) or 64
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(0)).to(dtype) * 3
    weight, bias, eps = norm_params(norm, kind)
    one = torch.ones((), dtype=torch.float32)
    ours = norm_quantize(x, weight, bias, eps, kind, one, one, 0, 0, -128, 127, False, False, False)[0]
    theirs = norm(x)
    return theirs.shape == ours.shape and torch.allclose(ours.float(), theirs.float(), rtol=2e-2, atol=1e-3)


def fuse_norms(model: nn.Module, family) -> int:
    """Replace each declared norm (`BlockLayout.norm_readers`) whose readers are all integer linears
    quantizing alike by a `QuantizingNorm`. Returns how many were fused."""
    fused = 0
    for layout, _, block in family.blocks(model, ("vision", "projector", "language")):
        for norm_name, reader_names in layout.norm_readers:
            try:
                norm = block.get_submodule(norm_name)
                readers = [block.get_submodule(r) for r in reader_names]
            except AttributeError:  # a norm or reader this checkpoint does not have
                continue
            kind = norm_kind(norm)
            if kind is None or not all(isinstance(r, IntLinear) for r in readers) or not _readers_agree(readers):
                continue
            if not _computes_like(norm, kind, readers[0].dtype):
                continue
            block.set_submodule(norm_name, QuantizingNorm(norm, kind, readers))
            fused += 1
    return fused
