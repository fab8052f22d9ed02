"""Bring a quantized model back to its family's plain Hugging Face module graph, for formats whose
readers run only the original architecture (compressed-tensors in transformers).

What does not exist there is undone, exactly in floating point, and those layers leave the
quantized set (their weights keep their quantized values, their inputs are no longer quantized):

- an online Hadamard (R4) and the RMS channel-0 branch: the layer becomes a plain linear with
  W = [w₀ | W_main]·Mᵀ (M the normalized transform), cut back to the unpadded width;
- a rotated vision stream (it needs LN2RN's RMSNorms, the original has LayerNorms): every linear
  that reads or writes the stream becomes float and the rotation is undone (`rotate_stream` with Qᵀ);
  linears whose weights the undoing leaves unchanged stay quantized;
  an open stream (LLaVA's towers: the projector reads it raw) is rotated back out of its masked
  basis, and its stream-start writer, diagonal again, becomes the LayerNorm it came from;
- weightless and centring norms (folded gains, LN2RN) become the family's own norm modules with
  unit gain and zero bias (a centring norm is exactly such a LayerNorm). On the language stream
  (still rotated) an RMSNorm of unit gain is the same function.
  On a closed vision stream a LayerNorm also removes the mean, which LN2RN's mean-free writers no
  longer have exactly once quantized: the plain model differs from the native one by that much,
  and the export's accuracy is measured rather than assumed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mquant.errors import MquantError
from mquant.models.vlm import VLM
from mquant.runtime.online import OnlineHadamardLinear
from mquant.runtime.qlinear import QuantLinear, quant_linears
from mquant.transforms.hadamard import FastHadamard, HadamardSpec
from mquant.transforms.ln2rn import CenteringNorm, MaskedRMSNorm, StreamStart, WeightlessRMSNorm
from mquant.transforms.rotate import rotate_stream, vision_stream_rotation

@torch.no_grad()
def to_plain(vlm: VLM) -> list[str]:
    """Convert `vlm.model` in place; returns the names of the layers that left the quantized set."""
    model = vlm.model
    floated = []
    for name, m in list(model.named_modules()):
        if isinstance(m, (QuantLinear, OnlineHadamardLinear)) and _has_online_transform(m):
            model.set_submodule(name, float_module(m))
            floated.append(name)
    if "vision" in _rotated_streams(vlm):
        floated += _unrotate_vision(vlm)
    _restore_norms(vlm)
    return sorted(set(floated))


def _has_online_transform(m: nn.Module) -> bool:
    return getattr(m, "input_transform", None) is not None


def _rotated_streams(vlm: VLM) -> list[str]:
    transforms = (vlm.quant_info or {}).get("report", {}).get("transforms") or {}
    return transforms.get("rotated_streams", [])


def unfused_weight(weight: torch.Tensor, spec: HadamardSpec) -> torch.Tensor:
    """W with (xM)Wᵀ = x·(W Mᵀ)ᵀ: the weight of the same map on the untransformed input, [out, n]."""
    inverse = FastHadamard(HadamardSpec(spec.order, spec.order, spec.k, spec.construction)).double()
    inverse.hk = inverse.hk.t().contiguous()  # Mᵀ = H_Kᵀ ⊗ H_P / sqrt(order): Sylvester blocks are symmetric
    return inverse(weight.double())[:, : spec.n]


def float_module(m: nn.Module) -> nn.Module:
    """The plain float module computing what `m`'s weight path computes (inputs unquantized)."""
    if isinstance(m, OnlineHadamardLinear):
        weight, bias = m.weight.detach().double(), m.bias
    else:
        weight, bias = m.dequantized_weight().double(), m.bias
        if m.channel0 is not None:
            weight = torch.cat([m.channel0_column().double()[:, None], weight], dim=1)
    if getattr(m, "input_transform", None) is not None:
        weight = unfused_weight(weight, m.input_transform.spec)
    out_features = weight.shape[0]
    patch = getattr(m, "patch", None)
    if patch is not None:
        conv = nn.Conv3d if len(patch.kernel) == 3 else nn.Conv2d
        module = conv(weight.shape[1] // math.prod(patch.kernel), out_features, patch.kernel, stride=patch.kernel,
                      bias=bias is not None)
        module.weight.copy_(weight.reshape(module.weight.shape))
    else:
        module = nn.Linear(weight.shape[1], out_features, bias=bias is not None)
        module.weight.copy_(weight)
    if bias is not None:
        module.bias.copy_(bias.detach())
    module.requires_grad_(False)
    return module.to(weight.device)


def _unrotate_vision(vlm: VLM) -> list[str]:
    """Undo the vision stream's rotation: float every vision and projector linear, rotate back,
    and give back the quantized module wherever the weights did not change."""
    model, family = vlm.model, vlm.family
    parts = {"vision", "projector"}
    prefixes = tuple(f"{seg.path}" for p in family.parts if p.name in parts for seg in p.segments)
    originals = {name: m for name, m in quant_linears(model) if name.startswith(prefixes)}
    before = {}
    for name, m in originals.items():
        model.set_submodule(name, float_module(m))
        before[name] = model.get_submodule(name).weight.detach().clone()
    vc = model.config.vision_config
    width = getattr(vc, "embed_dim", None) or vc.hidden_size
    seed = vlm.quant_info["recipe"]["transforms"]["seed"] + 1  # as `transforms.apply._rotate`
    rotate_stream(model, family, "vision", vision_stream_rotation(family, width, seed).T)
    floated = []
    for name, m in originals.items():
        if torch.equal(model.get_submodule(name).weight, before[name]):
            model.set_submodule(name, m)  # untouched by the stream: stays quantized
        else:
            floated.append(name)
    return floated


def _restore_norms(vlm: VLM) -> None:
    """Weightless and centring norms back to the family's own classes, with unit gain and zero bias
    (a centring norm is a LayerNorm of unit gain and zero bias); an open stream's start back to its
    LayerNorm."""
    with torch.device("meta"):
        skeleton = vlm.family.model_class(vlm.model.config)
    for name, m in list(vlm.model.named_modules()):
        if isinstance(m, MaskedRMSNorm):
            raise MquantError(f"{name}: the open vision stream is still rotated; it cannot be exported to the "
                              "plain architecture")
        if isinstance(m, StreamStart):
            vlm.model.set_submodule(name, m.to_layer_norm())
        elif type(m) in (WeightlessRMSNorm, CenteringNorm):
            norm = skeleton.get_submodule(name).to_empty(device=next(vlm.model.parameters()).device)
            for pname, param in norm.named_parameters():
                param.requires_grad_(False)
                param.fill_(1.0 if pname == "weight" else 0.0)
            vlm.model.set_submodule(name, norm)
