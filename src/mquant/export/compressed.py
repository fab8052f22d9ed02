"""Export to the compressed-tensors format that transformers and vLLM load (ALGORITHMS.md §14.5).

The format describes plain `Linear` layers of the original architecture with an integer grid per
weight and per input. What an mquant checkpoint holds beyond that has to be given up, and the
export says so:

- two modality scales (MSQ) -> one static `input_scale` per layer, max(visual, text) so that
  neither modality clips;
- AIFS is a run-time reordering of the prefill: engines run prompts in their own order;
- patch-embedding convolutions are not `Linear`s: exported unquantized (their dequantized weights);
- structural transforms (the online Hadamard, the RMS branch, a rotated vision stream, LN2RN's
  norms) are undone in floating point (`mquant.export.plain`): those layers leave the quantized set.

Schemes (`--scheme`):
- "w8a8-static": `int-quantized`, the weight codes stored as int8 (4-bit values stay 4-bit
  valued; the file is not smaller), per-channel or per-group scales, static per-tensor inputs;
- "w4a8-dynamic": the same weights, inputs quantized per token at run time (calibrated scales unused);
- "w4a16": `pack-quantized` (eight 4-bit codes per int32), inputs in floating point.

`scheme_model` builds mquant's own fake-quant model of an exported scheme: the reference the
reloaded export must reproduce, and what `mquant export` evaluates.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from mquant.errors import MquantError
from mquant.export.native import load_quantized
from mquant.export.plain import to_plain
from mquant.fileio import atomic_directory, write_json_atomic
from mquant.models.vlm import VLM
from mquant.numerics.args import QuantArgs
from mquant.runtime.qlinear import QuantLinear, quant_linears

SCHEMES = ("w8a8-static", "w4a8-dynamic", "w4a16")
PER_TOKEN = QuantArgs(num_bits=8, strategy="token", dynamic=True)


# -- what can be exported ----------------------------------------------------------------------
def check_exportable(vlm: VLM, scheme: str) -> None:
    """What the format needs of the quantized layers left in the plain model."""
    grids = [a for _, m in quant_linears(vlm.model) for a in (m.weight_args, m.act_args) if a is not None]
    if any(not a.symmetric for a in grids):
        raise MquantError("compressed-tensors export covers symmetric grids; this checkpoint has asymmetric ones")
    weights = {m.weight_args for _, m in quant_linears(vlm.model) if m.patch is None and m.weight_args is not None}
    if scheme == "w4a16" and any(w.num_bits != 4 for w in weights):
        raise MquantError("w4a16 packs 4-bit weights; this checkpoint's weights have "
                          f"{', '.join(sorted({str(w.num_bits) for w in weights}))} bits")
    if scheme == "w8a8-static":
        acts = {m.act_args for _, m in quant_linears(vlm.model) if m.patch is None}
        if None in acts or any(a.dynamic for a in acts if a is not None):
            raise MquantError("w8a8-static needs static activation scales on every quantized linear; "
                              "this checkpoint has dynamic or unquantized inputs (use w4a8-dynamic or w4a16)")


def warnings_for(vlm: VLM, scheme: str) -> list[str]:
    layers = quant_linears(vlm.model)
    out = []
    msq = [n for n, m in layers if hasattr(m, "input_scale_visual")]  # calibrated with two scales
    if msq and scheme == "w8a8-static":
        out.append(f"MSQ: {len(msq)} layers have two static input scales (visual, text); the format holds one: "
                   "exported as max(visual, text)")
    if vlm.quant_info and vlm.quant_info["recipe"]["transforms"].get("aifs"):
        out.append("AIFS (visual-first prefill order) is run-time behaviour the format cannot carry; "
                   "results are the same, the integer layout is not")
    floated = getattr(vlm, "floated", [])
    if floated:
        out.append(f"{len(floated)} layers run in floating point (their quantized weight values, inputs "
                   "unquantized): transformers runs neither online Hadamards nor a rotated vision stream "
                   f"(e.g. {floated[0]}); see `ignore` in config.json")
    patches = [n for n, m in layers if m.patch is not None]
    if patches:
        out.append(f"{', '.join(patches)}: a patch convolution, not a Linear: exported unquantized "
                   "(its dequantized weights in floating point)")
    if scheme != "w4a16" and any((m.weight_args and m.weight_args.num_bits <= 4) for _, m in layers):
        out.append("int-quantized stores 4-bit weight codes as int8: the weights take 8 bits on disk")
    if scheme == "w4a8-dynamic":
        out.append("activations become dynamic per-token int8: the calibrated static scales are not used; "
                   "compressed-tensors' reference forward (transformers) gives a 2-D input one scale for the whole "
                   "tensor, so layers fed [tokens, features] (Qwen2-VL's vision blocks) are per-tensor dynamic there")
    if scheme == "w4a16":
        out.append("activations are not quantized (W4A16): the calibrated static scales are not used")
    return out


def natural_scheme(vlm: VLM) -> str:
    """The scheme closest to the checkpoint's own activations."""
    acts = [m.act_args for _, m in quant_linears(vlm.model) if m.patch is None]
    if all(a is None for a in acts):
        return "w4a16"
    return "w4a8-dynamic" if any(a is not None and a.dynamic for a in acts) else "w8a8-static"


# -- mquant's fake-quant model of an exported scheme --------------------------------------------
def scheme_model(checkpoint: str | os.PathLike, scheme: str) -> VLM:
    """The checkpoint as the exported scheme computes: the plain architecture (`export.plain`), one
    scale per input (max of the modality scales), per-token or no activation quantization as the
    scheme says, patch convolutions unquantized, the prefill in prompt order. The names of the
    layers that had to leave the quantized set are in `vlm.floated`."""
    from mquant.modality.aifs import disable_aifs

    if scheme not in SCHEMES:
        raise MquantError(f"unknown scheme {scheme!r} (choose from {', '.join(SCHEMES)})")
    vlm = load_quantized(checkpoint)
    disable_aifs(vlm.model, vlm.family.language_model)
    vlm.floated = to_plain(vlm)
    check_exportable(vlm, scheme)
    for _, m in quant_linears(vlm.model):
        if m.patch is not None or scheme == "w4a16":
            m.act_args = None
        elif scheme == "w4a8-dynamic":
            m.act_args, m.per_modality = PER_TOKEN, False
            m.quantize_input = _per_token_as_compressed_tensors
        elif m.per_modality:
            with torch.no_grad():
                m.input_scale.copy_(torch.maximum(m.input_scale, m.input_scale_visual))
            m.per_modality = False
    return vlm


def _per_token_as_compressed_tensors(x: torch.Tensor) -> torch.Tensor:
    """What compressed-tensors 0.20 computes for a dynamic "token" input (its reference forward,
    the one transformers runs): symmetric scale = absmax / 127.5 (half the 255-step range, where
    mquant's own per-token grid uses / 127), reduced over the dimensions after the first two. A 3-D
    [batch, tokens, features] input gets one scale per token; for a 2-D [tokens, features] input
    (the vision blocks of Qwen2-VL) that list is empty, which torch reads as "all": one dynamic
    scale for the whole tensor."""
    dims = tuple(range(2, x.dim())) or tuple(range(x.dim()))
    absmax = x.float().abs().amax(dim=dims, keepdim=True)
    scale = (absmax / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    return (torch.clamp(torch.round(x.float() / scale), -128, 127) * scale).to(x.dtype)


# -- writing ---------------------------------------------------------------------------------------
def pack_int32(codes: torch.Tensor) -> torch.Tensor:
    """[out, in] codes in [-8, 7] -> [out, ceil(in/8)] int32: eight offset-binary nibbles per word,
    the lowest column in the lowest bits (compressed-tensors' `pack-quantized`)."""
    rows, cols = codes.shape
    u = torch.nn.functional.pad(codes.to(torch.int64) + 8, (0, (-cols) % 8), value=8).reshape(rows, -1, 8)
    word = sum(u[..., i] << (4 * i) for i in range(8))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _grid(args: QuantArgs, num_bits: int | None = None) -> dict:
    return {"num_bits": num_bits or args.num_bits, "type": "int", "symmetric": args.symmetric,
            "strategy": args.strategy, "group_size": args.group_size, "dynamic": args.dynamic,
            "observer": None, "block_structure": None, "actorder": None}


def quantization_config(vlm: VLM, scheme: str, ignore: list[str]) -> dict:
    """One config group per (weight grid, input grid) pair; with a single pair it targets every
    `Linear` (minus `ignore`), otherwise each group names its layers."""
    fmt = "pack-quantized" if scheme == "w4a16" else "int-quantized"
    pairs: dict[tuple, list[str]] = {}
    for name, m in quant_linears(vlm.model):
        if m.patch is None and m.weight_args is not None:
            pairs.setdefault((m.weight_args, m.act_args), []).append(name)
    groups = {}
    for i, ((weights, inputs), names) in enumerate(pairs.items()):
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(pairs) == 1 else sorted(names),
            # int-quantized stores every code in an int8, whatever its bit width
            "weights": _grid(weights, 8 if fmt == "int-quantized" else None),
            "input_activations": None if inputs is None else _grid(inputs),
            "output_activations": None, "format": fmt}
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


def export_compressed(checkpoint: str | os.PathLike, out: str | os.PathLike, scheme: str) -> dict:
    """Write the compressed-tensors export of a native checkpoint; returns what was given up."""
    vlm = scheme_model(checkpoint, scheme)
    layers = dict(quant_linears(vlm.model))
    state = {k: v for k, v in vlm.model.state_dict().items() if not _inside(k, layers)}
    ignore = _unquantized_linears(vlm.model)
    for name, m in layers.items():
        if m.patch is not None or m.weight_args is None:
            state[f"{name}.weight"] = m.weight.detach().float()
            ignore.append(name)
        elif scheme == "w4a16":
            state[f"{name}.weight_packed"] = pack_int32(m.weight_codes)
            state[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features], dtype=torch.int32)
            state[f"{name}.weight_scale"] = m.weight_scale.float()
        else:
            state[f"{name}.weight"] = m.weight_codes.to(torch.int8)
            state[f"{name}.weight_scale"] = m.weight_scale.float()
            if scheme == "w8a8-static":
                state[f"{name}.input_scale"] = m.input_scale.float().reshape(1)
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias.detach().float()
    qconfig = quantization_config(vlm, scheme, sorted(ignore))
    with atomic_directory(out) as tmp:
        vlm.tokenizer.save_pretrained(tmp)
        vlm.image_processor.save_pretrained(tmp)
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        vlm.model.config.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        write_json_atomic(tmp / "config.json", {**config, "quantization_config": qconfig})
    return {"scheme": scheme, "format": qconfig["format"], "warnings": warnings_for(vlm, scheme), "ignore": sorted(ignore),
            "path": Path(out)}


def _inside(key: str, layers: dict[str, QuantLinear]) -> bool:
    return any(key.startswith(name + ".") for name in layers) or key.endswith("._dequantized")


def _unquantized_linears(model: torch.nn.Module) -> list[str]:
    """Float Linears the "Linear" target would otherwise match (lm_head, anything left in FP)."""
    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]


def size_mb(path: str | os.PathLike) -> float:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 2**20


def read_export_config(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / "config.json").read_text())["quantization_config"]


def is_compressed_tensors(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        qconfig = json.loads(config.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return qconfig.get("quant_method") == "compressed-tensors"


def load_export(out: str | os.PathLike) -> VLM:
    """A compressed-tensors export as transformers runs it (fake-quant; needs the compressed-tensors
    package), with the tokenizer and image processor saved beside it."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise MquantError("loading a compressed-tensors export needs the compressed-tensors package "
                          "(pip install compressed-tensors)") from None
    from mquant.models.vlm import load_pretrained

    vlm = load_pretrained(out)
    # compressed-tensors decompresses on the first forward of the whole model, but `generate` of a
    # multimodal model calls the vision encoder before that: decompress now.
    model = vlm.model
    compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
    if getattr(model, "ct_decompress_hook", None) is not None and compressor is not None:
        compressor.decompress_model(model)
    return vlm


def export_accuracy(checkpoint: str | os.PathLike, out: str | os.PathLike, scheme: str, limit: int,
                    tasks: list[str] | None = None) -> dict:
    """Average score on `tasks` (default: the whole built-in benchmark) of the native checkpoint, of
    mquant's fake-quant model of the exported scheme and (with compressed-tensors installed) of the
    export reloaded by transformers."""
    from mquant.eval.registry import BENCHMARK
    from mquant.eval.runner import evaluate

    native = load_quantized(checkpoint)
    rows = {"native (fake-quant)": native, f"exported scheme {scheme} (mquant fake-quant)": scheme_model(checkpoint, scheme)}
    try:
        rows["export reloaded by transformers"] = load_export(out)
    except MquantError as exc:
        print(f"mquant: warning: {exc}; the transformers reload is not evaluated")
    tasks = tasks or list(BENCHMARK)
    return {name: evaluate(vlm, tasks, limit=limit, progress=False)["average"] for name, vlm in rows.items()}
