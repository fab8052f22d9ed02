"""Score a model on tasks by batched greedy generation, refusing to evaluate on calibration data."""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from mquant.errors import MquantError
from mquant.eval.registry import get_task
from mquant.models.vlm import VLM

# Prompts per generate call. On a CPU a decoding step of a small model costs about the same for 16
# rows as for 64 (fixed per-step work dominates), so larger batches finish a task several times
# sooner; left padding keeps every row's answer the same up to float rounding.
BATCH = 64
PRECISIONS = ("fp32", "bf16")


def matmul_precision(vlm: VLM, precision: str):
    """The context an evaluation runs in. `bf16`: matrix products in bf16 with fp32 accumulation
    (autocast), everything else, quantizers included, in fp32 (`QuantLinear` quantizes its input in
    fp32 before the product) — how a model is served, and 2x faster than fp32 on a CPU with
    AVX-512 BF16 (measured on the real-weights model's tasks)."""
    if precision not in PRECISIONS:
        raise MquantError(f"unknown precision {precision!r}; available: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    device = next(vlm.model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16)


def evaluate(vlm: VLM, task_names: list[str], limit: int | None = None, progress: bool = True,
             keep_predictions: bool = False, precision: str = "fp32") -> dict:
    calib = set((vlm.quant_info or {}).get("report", {}).get("calibration", {}).get("fingerprints", []))
    context = matmul_precision(vlm, precision)  # checked before any work
    results = {}
    for name in task_names:
        task = get_task(name)
        samples = task.make_samples(limit or task.default_limit)
        overlap = [s.id for s in samples if s.fingerprint() in calib]
        if overlap:
            raise MquantError(f"task {name}: {len(overlap)} evaluation samples were used for calibration "
                              f"(e.g. {overlap[0]}); refusing to report a contaminated score")
        predictions: list[str] = []
        bar = tqdm(total=len(samples), desc=f"eval {name}", disable=not progress, leave=False)
        for k in range(0, len(samples), BATCH):
            chunk = samples[k : k + BATCH]
            with context:
                predictions += vlm.generate(chunk, task.max_new_tokens)
            bar.update(len(chunk))
        bar.close()
        result = {"metric": task.metric, **task.aggregate(predictions, samples), "n": len(samples)}
        if keep_predictions:
            result["predictions"] = [{"id": s.id, "prediction": p, "answers": s.answers}
                                     for s, p in zip(samples, predictions)]
        results[name] = result
    average = sum(r["score"] for r in results.values()) / len(results)
    recipe = (vlm.quant_info or {}).get("recipe", {}).get("name")
    return {"model": vlm.path, "recipe": recipe, "tasks": results, "average": average, "precision": precision}
