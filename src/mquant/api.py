"""The public API: `quantize`, `load`, `save`."""

from __future__ import annotations

import os
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch

from mquant.errors import MquantError
from mquant.modality.msq import attach_modality_state, per_modality_layers
from mquant.models.vlm import VLM, load_pretrained
from mquant.pipeline.calib import CalibrationSet, load_calibration
from mquant.pipeline.sequential import quantize_parts
from mquant.pipeline.smooth import smooth_model
from mquant.recipe import PARTS, Recipe, load_recipe
from mquant.runtime.guard import verify_quantized
from mquant.runtime.qlinear import set_activation_quant
from mquant.samples import Sample
from mquant.transforms.apply import apply_runtime, apply_transforms


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def quantize(
    model: VLM | str | os.PathLike,
    recipe: Recipe | str,
    calib: CalibrationSet | list[Sample] | str = "synthetic",
    *,
    num_samples: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> VLM:
    """Quantize `model` in place with `recipe`, calibrating on `calib`; returns the model.

    `model` is a loaded `VLM` or a path; `recipe` a `Recipe`, a preset name or a recipe file;
    `calib` a `CalibrationSet`, a list of `Sample`s, or a source spec (see `load_calibration`).
    The recipe and a report (per-layer errors and scales, calibration fingerprints, timings) are
    attached as `model.quant_info`.
    """
    start = time.perf_counter()
    vlm = model if isinstance(model, VLM) else load_pretrained(model)
    if vlm.quant_info is not None:
        raise MquantError(f"{vlm.path} is already quantized")
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    seed_everything(recipe.seed)
    if isinstance(calib, str):
        calib = load_calibration(calib, num_samples, recipe.seed)
    elif not isinstance(calib, CalibrationSet):
        calib = CalibrationSet("python", list(calib))
    if not calib.samples:
        raise MquantError("calibration set is empty")

    with torch.no_grad():
        batches = [vlm.encode([s], with_answer=bool(s.answers)) for s in calib.samples]
        timing: dict[str, float] = {}
        t = time.perf_counter()
        transforms = apply_transforms(vlm, recipe.transforms, batches) if recipe.transforms.any else None
        timing["transforms"] = time.perf_counter() - t
        fp_logits = vlm.model(**batches[0]).logits.float()
        if recipe.smoothquant is not None:
            t = time.perf_counter()
            parts = [p for p in PARTS if recipe.part(p) is not None]
            smooth_model(vlm, batches, recipe.smoothquant.alpha, parts)
            timing["smoothquant"] = time.perf_counter() - t
        layers, part_timing = quantize_parts(vlm, recipe, batches, device=device, progress=progress)
        timing.update(part_timing)
        set_activation_quant(vlm.model, True)
        attach_modality_state(vlm.model, vlm.image_token_id, per_modality_layers(vlm.model))
        apply_runtime(vlm, recipe.transforms, transforms)
        guard = verify_quantized(vlm.model, batches[0], fp_logits)
    timing["total"] = time.perf_counter() - start

    streams = (transforms or {}).get("rotated_streams", [])
    online = set((transforms or {}).get("online_hadamard", []))
    for layer in layers:
        layer["rotated"] = layer["part"] in streams or (layer["part"] == "projector" and bool(streams))
        layer["online_hadamard"] = layer["name"] in online
    from mquant import __version__

    report = {
        "mquant_version": __version__,
        "model": vlm.path,
        "recipe": recipe.to_dict(),
        "calibration": {
            "source": calib.source,
            "num_samples": len(calib.samples),
            "disjoint_from_eval": True,  # enforced: `mquant eval` refuses samples listed below
            "fingerprints": calib.fingerprints(),
        },
        "transforms": transforms,
        "layers": layers,
        "guard": guard,
        "timing_s": {k: round(v, 3) for k, v in timing.items()},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_version": torch.__version__,
    }
    vlm.quant_info = {"recipe": recipe.to_dict(), "report": report}
    return vlm


def load(path: str | os.PathLike, backend: str = "fake", dtype: torch.dtype | None = None,
         device: str | None = None, kernel: str = "auto") -> VLM:
    """Load a floating-point HF checkpoint, an mquant quantized checkpoint or a compressed-tensors
    export (`mquant export`).

    A quantized checkpoint runs on `backend`: "fake" (the fake-quant reference, float32),
    "cpu-int8" (int8 kernels on the CPU, bfloat16 elsewhere) or "triton" (the W4A8 GPU kernel,
    on `device`, default cuda). `dtype` overrides the backend's activation dtype; `kernel` picks the
    CPU kernel: "auto" (what this machine measured fastest per shape, `mquant.runtime.cpu_kernels`),
    "onednn", "onednn-u8", "onednn-s8", "int_mm" or "float" (the codes times dequantized weights)."""
    from mquant.export.compressed import is_compressed_tensors, load_export
    from mquant.export.native import MANIFEST, load_quantized
    from mquant.runtime.backends import BACKENDS, to_backend

    if backend not in BACKENDS:
        raise MquantError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if is_compressed_tensors(path):  # an `mquant export`: executed as transformers does (fake-quant)
        if backend != "fake":
            raise MquantError(f"{path}: a compressed-tensors export runs as transformers runs it (backend 'fake'); "
                              "load the native checkpoint for the integer backends")
        return load_export(path)
    if not (Path(path) / MANIFEST).exists():
        if backend != "fake":
            raise MquantError(f"{path}: not a quantized checkpoint; backend {backend!r} needs one")
        return load_pretrained(path, dtype or torch.float32)
    vlm = load_quantized(path)
    if device is None and backend == "triton" and torch.cuda.is_available():
        device = "cuda"
    if device is not None:
        vlm.model.to(device)
    to_backend(vlm.model, backend, dtype, kernel, family=vlm.family)
    return vlm


def save(vlm: VLM, out: str | os.PathLike) -> Path:
    """Write a quantized model as an mquant checkpoint directory (atomically)."""
    from mquant.export.native import save_quantized

    return save_quantized(vlm, out)
