"""Apply the recipe's function-preserving transforms to a model, before quantization.

Order (ALGORITHMS.md, pipeline at a glance): LN2RN on the vision encoder, fold RMSNorm gains, rotate
the language (R1) and vision (R1ᵥ) streams, per-head V/O rotations (R2), online Hadamard (R4), then
the RMS channel-0 split; AIFS (a run-time reordering of the prefill) comes last and is switched on
after calibration (`apply_runtime`). Each step is also callable on its own (`apply_step`), which is
how `mquant verify` measures the model after every step.
"""

from __future__ import annotations

import warnings

import torch

from mquant.algorithms.rms import ChannelZeroStats, should_split
from mquant.modality.aifs import enable_aifs
from mquant.models.vlm import VLM
from mquant.runtime.online import OnlineHadamardLinear
from mquant.runtime.patches import observe_inputs
from mquant.transforms.fuse_norms import fold_norm_gains
from mquant.transforms.ln2rn import ln2rn_vision
from mquant.transforms.online import apply_online_hadamard
from mquant.transforms.rotate import (
    random_hadamard, rotate_language_heads, rotate_part_heads, rotate_stream, vision_stream_rotation,
)

STEPS = ("ln2rn", "rotate", "online_hadamard", "rms", "aifs")
OFFLINE_STEPS = STEPS[:-1]  # change weights/modules; AIFS only changes how a prefill runs


def new_info() -> dict:
    """What the steps record (it lands in `quant_report.json` under `transforms`)."""
    return {"ln2rn": False, "rotated_streams": [], "online_hadamard": [], "rms": {}, "aifs": False, "warnings": []}


def enabled_steps(scheme) -> list[str]:
    return [name for name in STEPS if getattr(scheme, name)]


def apply_transforms(vlm: VLM, scheme, batches: list[dict] | None = None) -> dict:
    """Apply every offline step `scheme` (a `TransformScheme`) enables, in place; returns what was
    done. `batches` (calibration inputs) feed the RMS activation test."""
    info = new_info()
    for name in enabled_steps(scheme):
        if name in OFFLINE_STEPS:
            apply_step(vlm, name, scheme, info, batches)
    return info


def apply_runtime(vlm: VLM, scheme, info: dict | None = None) -> None:
    """Switch on the run-time steps (AIFS) of a transformed and calibrated model."""
    if scheme.aifs:
        apply_step(vlm, "aifs", scheme, info if info is not None else new_info())


def apply_step(vlm: VLM, name: str, scheme, info: dict, batches: list[dict] | None = None) -> None:
    if name not in STEPS:
        raise ValueError(f"unknown transform {name!r}")
    {"ln2rn": _ln2rn, "rotate": _rotate, "online_hadamard": _online_hadamard, "rms": _rms, "aifs": _aifs}[name](
        vlm, scheme, info, batches)


def _skip(info: dict, message: str) -> None:
    warnings.warn(message)
    info["warnings"].append(message)


def _ln2rn(vlm: VLM, scheme, info: dict, batches) -> None:
    ln2rn_vision(vlm.model, vlm.family)
    info["ln2rn"] = True


def _rotate(vlm: VLM, scheme, info: dict, batches) -> None:
    model, family = vlm.model, vlm.family
    fold_norm_gains(model, family, ("language",))
    rotate_stream(model, family, "language", random_hadamard(model.config.text_config.hidden_size, scheme.seed))
    rotate_language_heads(model, family, seed=None)  # exact Hadamard per head, as the reference
    info["rotated_streams"].append("language")
    vc = model.config.vision_config
    width = getattr(vc, "embed_dim", None) or vc.hidden_size
    heads = getattr(vc, "num_heads", None) or vc.num_attention_heads
    rotate_part_heads(model, family, "vision", heads, heads, width // heads, seed=scheme.seed + 2)
    if info["ln2rn"]:
        rotate_stream(model, family, "vision", vision_stream_rotation(family, width, scheme.seed + 1))
        info["rotated_streams"].append("vision")
    else:
        _skip(info, "the vision stream is not rotated: it still has LayerNorms (LN2RN off or unavailable)")


def _online_hadamard(vlm: VLM, scheme, info: dict, batches) -> None:
    info["online_hadamard"] = apply_online_hadamard(vlm.model, vlm.family, ("vision", "language"))


@torch.no_grad()
def _rms(vlm: VLM, scheme, info: dict, batches) -> None:
    """Split channel 0 of every vision online-Hadamard layer, and of each language one whose weight
    or (given calibration `batches`) activation test fires."""
    modules = {name: vlm.model.get_submodule(name) for name in info["online_hadamard"]}
    if not modules:
        raise ValueError("rms needs the online Hadamard step first")
    stats = {name: ChannelZeroStats() for name in modules}
    if batches:
        observe_inputs(vlm.model, {m: stats[n].observe for n, m in modules.items()}, batches)
    vision = tuple(f"{block}." for seg in vlm.family.part("vision").segments for block, _ in seg.blocks(vlm.model))
    for name, module in modules.items():
        assert isinstance(module, OnlineHadamardLinear)
        split, evidence = should_split(module.weight, stats[name] if batches else None, scheme.rms_threshold)
        is_vision = name.startswith(vision)
        module.split_channel0 = is_vision or split
        info["rms"][name] = {"split": module.split_channel0, "rule": "vision: always" if is_vision else "detected",
                             **evidence}


def _aifs(vlm: VLM, scheme, info: dict, batches) -> None:
    enable_aifs(vlm.model, vlm.family.language_model, vlm.image_token_id)
    info["aifs"] = True
