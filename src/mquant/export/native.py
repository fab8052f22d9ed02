"""The native mquant checkpoint: everything needed to rebuild the quantized model exactly.

Layout of a checkpoint directory:
- `config.json`, tokenizer and image-processor files: the base model, as Hugging Face writes them;
- `model.safetensors`: every tensor; quantized linears hold `weight_packed` (int4, two per byte) or
  `weight_codes` (int8), `weight_scale` and static `input_scale`;
- `mquant_checkpoint.json`: format name and version, family, each quantized module's shape and
  quantization arguments (so the skeleton is rebuilt before tensors are loaded — nothing is pickled)
  and the SHA-256 of the weights file (checked at load: a corrupted file is refused);
- `recipe.yaml`, `quant_report.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer

from mquant.errors import MquantError
from mquant.fileio import atomic_directory, write_json_atomic, write_text_atomic
from mquant.modality.msq import attach_modality_state, per_modality_layers
from mquant.models.registry import family_for_config
from mquant.models.vlm import VLM
from mquant.recipe import Recipe
from mquant.transforms.apply import apply_runtime
from mquant.runtime.online import OnlineHadamardLinear
from mquant.runtime.qlinear import QuantLinear, quant_linears
from mquant.transforms.hadamard import HadamardSpec
from mquant.transforms.ln2rn import CenteringNorm, MaskedRMSNorm, StreamStart, WeightlessRMSNorm

MANIFEST = "mquant_checkpoint.json"
FORMAT = "mquant-native"
VERSION = 1
WEIGHTS = "model.safetensors"


def save_quantized(vlm: VLM, out: str | os.PathLike) -> Path:
    if vlm.quant_info is None:
        raise MquantError("model is not quantized; run mquant.quantize first")
    from mquant.runtime.int_linear import int_linears

    if int_linears(vlm.model):
        raise MquantError("this model runs on an integer backend; save the one loaded with backend='fake'")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "family": vlm.family.name,
        "modules": {name: m.describe() for name, m in quant_linears(vlm.model)},
        "replaced": structural_replacements(vlm.model),
    }
    with atomic_directory(out) as tmp:
        vlm.model.config.save_pretrained(tmp)
        vlm.tokenizer.save_pretrained(tmp)
        vlm.image_processor.save_pretrained(tmp)
        save_file(_unshared(vlm.model.state_dict()), str(tmp / WEIGHTS), metadata={"format": FORMAT})
        manifest["sha256"] = {WEIGHTS: file_sha256(tmp / WEIGHTS)}
        write_text_atomic(tmp / "recipe.yaml", Recipe.model_validate(vlm.quant_info["recipe"]).to_yaml())
        write_json_atomic(tmp / "quant_report.json", vlm.quant_info["report"])
        write_json_atomic(tmp / MANIFEST, manifest)  # written last: its presence marks a complete checkpoint
    return Path(out)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses aliased tensors (e.g. tied embeddings): give each key its own copy."""
    seen: set[int] = set()
    out = {}
    for key, t in state.items():
        t = t.detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def load_quantized(path: str | os.PathLike) -> VLM:
    path = Path(path)
    manifest = _read_manifest(path)
    config = AutoConfig.from_pretrained(path)
    family = family_for_config(config)
    if family.name != manifest.get("family"):
        raise MquantError(f"{path}: manifest family {manifest.get('family')!r} does not match config ({family.name})")
    torch.manual_seed(0)  # every tensor is overwritten below; this only makes init cheap to reason about
    model = family.model_class(config).eval()
    for name, desc in manifest.get("replaced", {}).items():
        _check_module(model, name, path)
        model.set_submodule(name, rebuild_replacement(desc))
    for name, desc in manifest["modules"].items():
        _check_module(model, name, path)
        model.set_submodule(name, QuantLinear.from_description(desc))
    weights = path / WEIGHTS
    if not weights.is_file():
        raise MquantError(f"{path}: missing {WEIGHTS}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise MquantError(f"{weights}: unreadable or truncated safetensors file ({exc})") from None
    expected = manifest.get("sha256", {}).get(WEIGHTS)
    if expected is not None and file_sha256(weights) != expected:
        raise MquantError(f"{weights}: corrupted (its SHA-256 differs from the one recorded at save time)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise MquantError(f"{weights}: tensors do not match the manifest ({first})") from None
    model.eval()
    recipe = (path / "recipe.yaml").read_text()
    report = json.loads((path / "quant_report.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = family.images.load_processor(str(path))
    recipe = Recipe.from_yaml(recipe, str(path / "recipe.yaml"))
    vlm = VLM(model, tokenizer, processor, family, str(path), {"recipe": recipe.to_dict(), "report": report})
    attach_modality_state(model, vlm.image_token_id, per_modality_layers(model))
    apply_runtime(vlm, recipe.transforms)
    return vlm


NORM_TYPES = {WeightlessRMSNorm: "weightless_rms_norm", CenteringNorm: "centering_norm",
              MaskedRMSNorm: "masked_rms_norm"}


def structural_replacements(model: torch.nn.Module) -> dict[str, dict]:
    """Modules the transforms put in place of the original classes (other than QuantLinear)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, WeightlessRMSNorm):  # and its centring / masked variants
            out[name] = {"type": NORM_TYPES[type(m)], "eps": m.eps}
        elif isinstance(m, StreamStart):
            out[name] = {"type": "stream_start", "width": m.writer.in_features, "eps": m.eps}
        elif isinstance(m, OnlineHadamardLinear):
            out[name] = {"type": "online_hadamard_linear", "hadamard": m.input_transform.spec.to_json(),
                         "out_features": m.weight.shape[0], "bias": m.bias is not None,
                         "split_channel0": m.split_channel0}
    return out


def rebuild_replacement(desc: dict) -> torch.nn.Module:
    norms = {v: k for k, v in NORM_TYPES.items()}
    if desc["type"] in norms:
        return norms[desc["type"]](desc["eps"])
    if desc["type"] == "stream_start":
        return StreamStart(desc["width"], desc["eps"])
    if desc["type"] == "online_hadamard_linear":
        module = OnlineHadamardLinear(HadamardSpec(**desc["hadamard"]), desc["out_features"], desc["bias"])
        module.split_channel0 = bool(desc.get("split_channel0", False))
        return module
    raise MquantError(f"unknown module type in checkpoint: {desc['type']!r}")


def _check_module(model: torch.nn.Module, name: str, path: Path) -> None:
    try:
        model.get_submodule(name)
    except AttributeError:
        raise MquantError(f"{path}: manifest names a module that the model does not have: {name}") from None


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise MquantError(f"{path}: not an mquant checkpoint (missing {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise MquantError(f"{file}: invalid JSON ({exc.msg})") from None
    if manifest.get("format") != FORMAT:
        raise MquantError(f"{file}: unknown format {manifest.get('format')!r} (expected {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise MquantError(f"{file}: unsupported checkpoint version {manifest.get('version')!r} "
                          f"(this mquant reads version {VERSION})")
    for needed in ("recipe.yaml", "quant_report.json", "config.json"):
        if not (path / needed).is_file():
            raise MquantError(f"{path}: missing {needed}")
    return manifest
