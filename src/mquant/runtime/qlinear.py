"""`QuantLinear`: the fake-quant reference of a quantized linear layer (or patch convolution).

Weights are stored as integer codes plus scales (packed two per byte in checkpoints when 4-bit) and
dequantized once; activations are fake-quantized on every call with a static scale fixed at
calibration, or dynamically per token. A call counter proves the quantizer ran.

An RMS-split layer (ALGORITHMS.md §6) computes channel 0 of its Hadamard-rotated input apart from
the quantized main path: `channel0="fp"` keeps that weight column and activation in floating point
(as the reference code), `"int8"` puts both on their own per-tensor int8 grids (static scale for
the activation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mquant.errors import MquantError
from mquant.numerics.args import QuantArgs
from mquant.numerics.grid import dynamic_fake_quantize, fake_quantize
from mquant.numerics.packing import pack_int4, unpack_int4
from mquant.numerics.qweight import QuantizedWeight, codes_dtype
from mquant.runtime.patches import PatchGeometry, splits_channel0, weight_2d
from mquant.transforms.hadamard import FastHadamard, HadamardSpec


# The RMS channel-0 activation grid of `channel0="int8"`: symmetric int8, one static scale.
CHANNEL0_INT8 = QuantArgs(num_bits=8, strategy="tensor")


def _weight_param_shapes(args: QuantArgs, out_f: int, in_f: int) -> tuple[int, ...]:
    if args.strategy == "tensor":
        return (1,)
    if args.strategy == "channel":
        return (out_f, 1)
    return (out_f, -(-in_f // args.group_size))


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weight_args: QuantArgs | None,
        act_args: QuantArgs | None,
        patch: PatchGeometry | None = None,
        hadamard: HadamardSpec | None = None,
        channel0: str | None = None,
        per_modality: bool = False,
    ) -> None:
        super().__init__()
        if channel0 not in (None, "fp", "int8"):
            raise ValueError(f"channel0 must be None, 'fp' or 'int8', got {channel0!r}")
        # An online Hadamard runs on the input before the activation quantizer; `in_features` is
        # then the transformed (possibly padded) width, less channel 0 when RMS splits it off.
        self.input_transform = FastHadamard(hadamard) if hadamard is not None else None
        self.in_features, self.out_features = in_features, out_features
        self.weight_args, self.act_args, self.patch = weight_args, act_args, patch
        if weight_args is None:
            self.register_buffer("weight_fp", torch.zeros(out_features, in_features))
        else:
            self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=codes_dtype(weight_args)))
            shape = _weight_param_shapes(weight_args, out_features, in_features)
            self.register_buffer("weight_scale", torch.ones(shape))
            if not weight_args.symmetric:
                self.register_buffer("weight_zero_point", torch.zeros(shape))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        static = act_args is not None and not act_args.dynamic
        if per_modality and not static:
            raise ValueError("per-modality scales are static activation scales")
        # `input_scale` is the text scale under MSQ (and the only scale otherwise).
        self.per_modality = per_modality
        self.modality = None  # a ModalityState, attached by mquant.modality.msq
        for suffix in ("", "_visual") if per_modality else ("",):
            if static:
                self.register_buffer(f"input_scale{suffix}", torch.ones(1))
                if not act_args.symmetric:
                    self.register_buffer(f"input_zero_point{suffix}", torch.zeros(1))
        self.channel0 = channel0
        if channel0 == "fp":
            self.register_buffer("channel0_weight", torch.zeros(out_features))
        elif channel0 == "int8":
            self.register_buffer("channel0_codes", torch.zeros(out_features, dtype=torch.int8))
            self.register_buffer("channel0_scale", torch.ones(1))
            self.register_buffer("channel0_input_scale", torch.ones(1))
        self.act_quant_enabled = True
        self.calls = 0
        self._dequantized: torch.Tensor | None = None

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        qweight: QuantizedWeight | None,
        act_args: QuantArgs | None,
        input_qparams: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        channel0: str | None = None,
        channel0_input_scale: torch.Tensor | None = None,
        visual_qparams: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> "QuantLinear":
        """Wrap `module` (whose main-path weight `qweight` quantized). For an RMS-split module,
        `channel0` says how the split-off column runs; "int8" needs its static input scale.
        `visual_qparams` makes the activation quantizer per-modality (`input_qparams` then being
        the text rows')."""
        patch = PatchGeometry.of(module) if isinstance(module, (nn.Conv2d, nn.Conv3d)) else None
        transform = getattr(module, "input_transform", None)
        hadamard = transform.spec if transform is not None else None
        w = weight_2d(module)
        if splits_channel0(module) != (channel0 is not None):
            raise ValueError("channel0 must be given exactly for RMS-split modules")
        q = cls(w.shape[1], w.shape[0], module.bias is not None, qweight.args if qweight else None, act_args, patch,
                hadamard, channel0, visual_qparams is not None)
        with torch.no_grad():
            if channel0 is not None:
                q._set_channel0(module.weight.detach()[:, 0].float(), channel0_input_scale)
            if qweight is None:
                q.weight_fp.copy_(w.float())
            else:
                q.weight_codes.copy_(qweight.q)
                q.weight_scale.copy_(qweight.scale)
                if qweight.zero_point is not None:
                    q.weight_zero_point.copy_(qweight.zero_point)
            if module.bias is not None:
                q.bias.copy_(module.bias.detach().float())
            if input_qparams is not None:
                q.set_input_qparams(*input_qparams)
            if visual_qparams is not None:
                q.set_input_qparams(*visual_qparams, suffix="_visual")
        return q.to(module.weight.device)

    def _set_channel0(self, column: torch.Tensor, input_scale: torch.Tensor | None) -> None:
        if self.channel0 == "fp":
            self.channel0_weight.copy_(column)
            return
        scale = (column.abs().max() / 127).clamp(min=1e-8)
        self.channel0_codes.copy_(torch.round(column / scale).clamp(-128, 127).to(torch.int8))
        self.channel0_scale.copy_(scale.reshape(1))
        self.channel0_input_scale.copy_(input_scale.reshape(1))

    def set_input_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor | None, suffix: str = "") -> None:
        getattr(self, f"input_scale{suffix}").copy_(scale.reshape(1))
        if zero_point is not None:
            getattr(self, f"input_zero_point{suffix}").copy_(zero_point.reshape(1))

    # -- weights ----------------------------------------------------------------------------------
    def quantized_weight(self) -> QuantizedWeight | None:
        if self.weight_args is None:
            return None
        zp = getattr(self, "weight_zero_point", None)
        return QuantizedWeight(self.weight_codes, self.weight_scale, zp, self.weight_args)

    @property
    def weight(self) -> torch.Tensor:
        """The effective (dequantized) weight in the wrapped module's shape; model code reads
        `.weight.dtype`/`.device` of the layers it calls, so this must exist."""
        w = self.dequantized_weight()
        if self.patch is None:
            return w
        return w.view(self.out_features, -1, *self.patch.kernel)

    def dequantized_weight(self) -> torch.Tensor:
        if self.weight_args is None:
            return self.weight_fp
        if self._dequantized is None or self._dequantized.device != self.weight_codes.device:
            self._dequantized = self.quantized_weight().dequantize().to(self.weight_scale.device)
        return self._dequantized

    def _apply(self, fn, recurse=True):  # device moves invalidate the dequantized cache
        self._dequantized = None
        return super()._apply(fn, recurse)

    # -- checkpoint layout: 4-bit codes are packed two per byte -------------------------------------
    def _packs(self) -> bool:
        return self.weight_args is not None and self.weight_args.num_bits <= 4 and self.weight_args.symmetric

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packs():
            destination[prefix + "weight_packed"] = pack_int4(destination.pop(prefix + "weight_codes"))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self._packs() and prefix + "weight_packed" in state_dict:
            state_dict[prefix + "weight_codes"] = unpack_int4(state_dict.pop(prefix + "weight_packed"), self.in_features)
        self._dequantized = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- forward ----------------------------------------------------------------------------------
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        args = self.act_args
        if args is None or not self.act_quant_enabled:
            return x
        # In fp32 whatever the input's dtype (a bf16 product's output under autocast): the grid's
        # rounding must see the value the calibrated scale was chosen for, not its bf16 neighbour.
        x = x.float()
        if args.dynamic:
            return dynamic_fake_quantize(x, args)
        scale, zero_point = self.input_scale, getattr(self, "input_zero_point", None)
        if self.per_modality:  # MSQ: each row takes its modality's scale (a lookup, no reduction)
            if self.modality is None:
                raise MquantError("a per-modality layer has no modality state (see mquant.modality.msq)")
            visual = self.modality.rows(x)
            scale = torch.where(visual, self.input_scale_visual, scale)
            if zero_point is not None:
                zero_point = torch.where(visual, self.input_zero_point_visual, zero_point)
        return fake_quantize(x, scale, zero_point, args)

    def channel0_column(self) -> torch.Tensor:
        """W'_{:,0}, the split-off weight column, as the branch multiplies it ([out], float)."""
        if self.channel0 == "fp":
            return self.channel0_weight
        return self.channel0_codes.float() * self.channel0_scale

    def channel0_branch(self, x0: torch.Tensor) -> torch.Tensor:
        """The rank-1 RMS branch: x'_0 · W'_{:,0} ([..., 1] -> [..., out])."""
        if self.channel0 == "int8" and self.act_quant_enabled:
            x0 = fake_quantize(x0, self.channel0_input_scale, None, CHANNEL0_INT8)
        return x0 * self.channel0_column()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.patch is not None:
            x, _ = self.patch.unfold(x)
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.channel0 is not None:
            x0, x = x[..., :1], x[..., 1:]
        w = self.dequantized_weight()
        y = F.linear(self.quantize_input(x).to(w.dtype), w, self.bias)
        if self.channel0 is not None:
            y = y + self.channel0_branch(x0.to(w.dtype))
        return self.patch.fold(y) if self.patch is not None else y

    def extra_repr(self) -> str:
        w = self.weight_args.describe() if self.weight_args else "fp"
        a = self.act_args.describe() if self.act_args else "fp"
        kind = f", patch={self.patch.kernel}" if self.patch else ""
        if self.input_transform is not None:
            kind += f", online_hadamard={self.input_transform.spec.order}"
        if self.channel0 is not None:
            kind += f", rms_channel0={self.channel0}"
        if self.per_modality:
            kind += ", per_modality"
        return f"in={self.in_features}, out={self.out_features}, weights={w}, inputs={a}{kind}"

    def describe(self) -> dict:
        """What a checkpoint needs to rebuild this module before loading its tensors."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "weights": self.weight_args.model_dump() if self.weight_args else None,
            "input_activations": self.act_args.model_dump() if self.act_args else None,
            "patch": self.patch.to_json() if self.patch else None,
            "online_hadamard": self.input_transform.spec.to_json() if self.input_transform is not None else None,
            "rms_channel0": self.channel0,
            "per_modality": self.per_modality,
        }

    @classmethod
    def from_description(cls, d: dict) -> "QuantLinear":
        return cls(
            d["in_features"], d["out_features"], d["bias"],
            QuantArgs(**d["weights"]) if d["weights"] else None,
            QuantArgs(**d["input_activations"]) if d["input_activations"] else None,
            PatchGeometry(tuple(d["patch"]["kernel"])) if d["patch"] else None,
            HadamardSpec(**d["online_hadamard"]) if d.get("online_hadamard") else None,
            d.get("rms_channel0"),
            d.get("per_modality", False),
        )


def quant_linears(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def set_activation_quant(model: nn.Module, enabled: bool) -> None:
    for _, m in quant_linears(model):
        m.act_quant_enabled = enabled
