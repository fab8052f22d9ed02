"""`IntLinear`: a `QuantLinear` executed with integer products instead of fake quantization.

Built from the fake-quant module (`from_quant`), it keeps the same pre-processing (patch unfold,
online Hadamard, RMS channel-0 split), quantizes the main-path input to int8 codes with the same
static or dynamic scales, and multiplies codes by codes on an integer kernel (`Int8Gemm` on CPU,
the Triton W4A8 kernel on GPU). The integer accumulation is exact; only the float epilogue
(scales, bias, the output dtype) differs from the reference, within float tolerance.

How activation scales meet the rows (ALGORITHMS.md §7–8, §14):
- one static scale, or per-modality scales while no row is visual (decode): `scalar`;
- per-modality scales after AIFS made the visual rows one block: `two_blocks`;
- per-modality scales on interleaved rows (MSQ without AIFS), dynamic per-token: `rows`.
`path` can force a layout for latency comparisons ("dynamic", "static", "rows": the per-row lookup
even where the visual rows are one block); "auto" follows the recipe.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from mquant.errors import MquantError
from mquant.numerics.grid import fake_quantize
from mquant.runtime import int8_ops
from mquant.runtime.online import NativeHadamard
from mquant.runtime.qlinear import CHANNEL0_INT8, QuantLinear


class SharedInputQuant:
    """The quantized forms of the last input seen, reused by every layer that reads the same tensor
    with the same scales (q/k/v, gate/up share one activation quantizer; a `QuantizingNorm` leaves
    its readers' codes here). Keyed by the live tensor object and its version counter, so a freed or
    modified tensor never matches; one tensor at a time, one entry per encoding and scale layout."""

    def __init__(self) -> None:
        self.ref, self.version, self.values = None, None, {}

    def get(self, x: torch.Tensor, key: tuple):
        if self.ref is not None and self.ref() is x and self.version == x._version:
            return self.values.get(key)
        return None

    def put(self, x: torch.Tensor, key: tuple, value) -> None:
        if self.ref is None or self.ref() is not x or self.version != x._version:
            self.ref, self.version, self.values = weakref.ref(x), x._version, {}
        self.values[key] = value


SHARED = SharedInputQuant()


class IntLinear(nn.Module):
    def __init__(self, ref: QuantLinear, gemm, dtype: torch.dtype) -> None:
        super().__init__()
        args = ref.act_args
        if args is not None and not args.symmetric:
            raise MquantError("the integer backends run symmetric activation grids only; "
                              "use backend='fake' for asymmetric activations")
        if ref.weight_args is not None and not ref.weight_args.symmetric:
            raise MquantError("the integer backends run symmetric weight grids only; use backend='fake'")
        self.in_features, self.out_features = ref.in_features, ref.out_features
        self.patch, self.input_transform, self.channel0 = ref.patch, ref.input_transform, ref.channel0
        self.act_args, self.per_modality, self.modality = args, ref.per_modality, ref.modality
        self.dtype, self.gemm, self.path = dtype, gemm, "auto"
        # `quantizations`: inputs this layer quantized itself (not found already quantized by a
        # neighbour reading the same tensor or by the norm before it).
        self.calls, self.quantizations, self.last_layout = 0, 0, None
        # Benchmarks time the product without its activation quantization: `record` keeps the last
        # quantized input in `recorded`; a non-None `replay` is used instead of quantizing.
        self.record, self.recorded, self.replay = False, None, None
        # Model code reads `.weight.dtype`/`.device` of the layers it calls (a patch embedding casts
        # its input to them) and a module's dtype from its first float parameter; this empty
        # parameter answers both without keeping a float weight.
        device = ref.bias.device if ref.bias is not None else next(ref.buffers()).device
        self.weight = nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)
        if gemm is None:  # weight-only or float layer: there is no integer product to run
            self.register_buffer("weight_float", ref.dequantized_weight().to(dtype), persistent=False)
            self.register_buffer("bias_float", None if ref.bias is None else ref.bias.detach().to(dtype),
                                 persistent=False)
        if args is not None:
            self.qmin, self.qmax = -(2 ** (args.num_bits - 1)), 2 ** (args.num_bits - 1) - 1
            if not args.dynamic:
                self.text_scale = float(ref.input_scale)
                self.visual_scale = float(ref.input_scale_visual) if ref.per_modality else self.text_scale
                # Tensors for the compiled quantizers (float arguments would be specialized: one
                # recompilation per distinct scale); plain attributes, not buffers, so that a dtype
                # cast of the model does not round them.
                self.text_scale_t = torch.tensor(self.text_scale, device=device)
                self.visual_scale_t = torch.tensor(self.visual_scale, device=device)
        if ref.channel0 is not None:
            self.register_buffer("channel0_weight", ref.channel0_column().to(dtype), persistent=False)
        if ref.channel0 == "int8":
            self.channel0_input_scale = ref.channel0_input_scale.clone()
        if self.input_transform is not None:
            self.input_transform = NativeHadamard.wrap(self.input_transform.to(dtype))

    @classmethod
    def from_quant(cls, ref: QuantLinear, make_gemm, dtype: torch.dtype) -> "IntLinear":
        """`make_gemm(codes, scale, group_size, bias)` builds the backend's product object."""
        qw = ref.quantized_weight()
        if qw is None and ref.act_args is not None:
            raise MquantError("the integer backends need quantized weights wherever activations are quantized; "
                              "use backend='fake' for float weights with quantized inputs")
        if qw is None or ref.act_args is None:
            return cls(ref, None, dtype)
        group = qw.args.group_size if qw.args.strategy == "group" else None
        bias = None if ref.bias is None else ref.bias.detach()
        return cls(ref, make_gemm(qw.q.to(torch.int8), qw.scale, group, bias), dtype)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.patch is not None:
            x, _ = self.patch.unfold(x)
        x = x.to(self.dtype)
        if self.input_transform is not None:
            x = self.input_transform(x)
        source = x  # what q/k/v (or gate/up) share: their quantized inputs are computed once
        if self.channel0 is not None:
            x0, x = x[..., :1], x[..., 1:]
        lead = x.shape[:-1]
        y = self.product(x, source).reshape(*lead, self.out_features)
        if self.channel0 is not None:
            y = y + self.channel0_branch(x0)
        return self.patch.fold(y) if self.patch is not None else y

    def channel0_branch(self, x0: torch.Tensor) -> torch.Tensor:
        """The RMS rank-1 branch; an int8 channel 0 is quantized on its own static grid."""
        if self.channel0 == "int8":
            x0 = fake_quantize(x0, self.channel0_input_scale, None, CHANNEL0_INT8)
        return x0 * self.channel0_weight

    def product(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """The main path: [..., in] -> [rows, out]. `source` (default `x`) keys the shared quantized input."""
        source = x if source is None else source
        # detach(): a tensor with no view base, so the compiled quantizers are not re-specialized
        # on how the input was viewed (a guard per base shape would exhaust dynamo's recompile limit).
        x2 = x.reshape(-1, x.shape[-1]).detach()
        if self.gemm is None:
            return F.linear(x2, self.weight_float, self.bias_float)
        how = self.layout(x2.shape[0])
        self.last_layout = how[0]  # which activation-scale layout ran (tests and benchmarks read it)
        # The codes in the encoding the shape's kernel takes (oneDNN's VNNI path: code + 128).
        unsigned = self.gemm.unsigned_input(x2.shape[0], self.dtype)
        if how[0] == "scalar":
            q = self._quantized(source, x2, how, unsigned, lambda: int8_ops.static_codes(
                x2, self.text_scale, self.text_scale_t, self.qmin, self.qmax, unsigned))
            return self.gemm.scalar(q, how[1], self.dtype)
        if how[0] == "block":
            _, start, stop = how
            q = self._quantized(source, x2, how, unsigned, lambda: int8_ops.two_block_codes(
                x2, self.visual_scale, self.text_scale, self.visual_scale_t, self.text_scale_t, start, stop,
                self.qmin, self.qmax, unsigned))
            return self.gemm.two_blocks(q, self.visual_scale, self.text_scale, start, stop, self.dtype)
        if how[0] == "dynamic":
            q, row_scale = self._quantized(source, x2, how, unsigned, lambda: int8_ops.dynamic_codes(
                x2, self.qmax, unsigned))
        else:  # a per-row lookup of the two modality scales
            q, row_scale = self._quantized(source, x2, how, unsigned, lambda: self._quantize_rows(x2, how[1], unsigned))
        return self.gemm.rows(q, row_scale, self.dtype)

    def _quantize_rows(self, x2: torch.Tensor, visual: torch.Tensor, unsigned: bool) -> tuple[torch.Tensor, torch.Tensor]:
        row_scale = torch.where(visual, self.visual_scale_t, self.text_scale_t)
        return int8_ops.row_codes(x2, row_scale, self.qmin, self.qmax, unsigned), row_scale

    def layout(self, rows: int) -> tuple:
        """("scalar", s) | ("block", start, stop) | ("rows", mask) | ("dynamic",) for this call."""
        if self.act_args.dynamic or self.path == "dynamic":
            return ("dynamic",)
        if not self.per_modality or self.path == "static":
            return ("scalar", self.text_scale)  # (the static single-scale variant reuses the text scale)
        if self.modality is None:
            raise MquantError("a per-modality layer has no modality state (see mquant.modality.msq)")
        how = self.modality.row_layout(rows)
        if how[0] == "text":
            return ("scalar", self.text_scale)
        if how[0] == "block" and how[1] == how[2]:
            return ("scalar", self.text_scale)
        if how[0] == "block" and self.path == "rows":
            return ("rows", self.modality.visual.reshape(rows, 1))
        return how

    def codes_key(self, shape: tuple, how: tuple, unsigned: bool) -> tuple:
        """What identifies this layer's codes of an input of `shape` laid out as `how`: layers with
        equal keys quantize a shared input identically."""
        scales = () if how[0] == "dynamic" else (self.text_scale, self.visual_scale)
        return (tuple(shape), self.qmin, self.qmax, self.path, how[0], *(how[1:3] if how[0] == "block" else ()),
                *scales, unsigned)

    def _quantized(self, x: torch.Tensor, x2: torch.Tensor, how: tuple, unsigned: bool, compute):
        if self.replay is not None:
            return self.replay
        key = self.codes_key(x2.shape, how, unsigned)
        hit = SHARED.get(x, key)
        if hit is None:
            hit = compute()
            self.quantizations += 1
            SHARED.put(x, key, hit)
        if self.record:
            self.recorded = hit
        return hit

    def extra_repr(self) -> str:
        kernel = type(self.gemm).__name__ if self.gemm is not None else "float"
        return f"in={self.in_features}, out={self.out_features}, kernel={kernel}, dtype={self.dtype}, path={self.path}"


def int_linears(model: nn.Module) -> list[tuple[str, IntLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IntLinear)]
