"""The generic quantization engine: part by part, block by block, group by group.

For each part (vision -> projector -> language) and each segment in it, the inputs of the first
block are captured by running the (already partly quantized) model. Each block is then processed
group by group in the family's order: the block is replayed on every calibration input with the
earlier groups already quantized, the group's shared input feeds a GPTQ Hessian and a static
activation observer, and the group's linears are replaced by `QuantLinear`s. Finally the block's
quantized output becomes the next block's input. Only one block's activations are held at a time,
and only the current block sits on `device`.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from mquant.algorithms.gptq import HessianAccumulator, gptq_quantize, relative_output_error
from mquant.algorithms.rtn import rtn_quantize
from mquant.models.spec import Segment
from mquant.models.vlm import VLM
from mquant.numerics.observers import ActivationObserver
from mquant.pipeline.capture import BlockCall, capture_block_inputs, replay
from mquant.recipe import PartScheme, Recipe
from mquant.runtime.patches import splits_channel0, transformed_input, weight_2d
from mquant.runtime.qlinear import CHANNEL0_INT8, QuantLinear


def quantize_parts(
    vlm: VLM, recipe: Recipe, batches: list[dict], device: str = "cpu", progress: bool = True
) -> tuple[list[dict], dict[str, float]]:
    """Quantize every part the recipe names, in place. Returns per-layer records and timings."""
    records: list[dict] = []
    timing: dict[str, float] = {}
    run_model = lambda batch: vlm.model(**batch)  # noqa: E731
    for part in vlm.family.parts:
        scheme = recipe.part(part.name)
        if scheme is None or (scheme.weights is None and scheme.input_activations is None):
            continue
        start = time.perf_counter()
        for segment in part.segments:
            blocks = segment.blocks(vlm.model)
            calls = capture_block_inputs(run_model, blocks[0][1], batches)
            bar = tqdm(blocks, desc=f"{part.name}: {segment.path}", disable=not progress, leave=False)
            for index, (block_name, block) in enumerate(bar):
                records += _quantize_block(block, block_name, segment, calls, scheme, part.name, recipe, device)
                if index + 1 < len(blocks):
                    calls = [c.with_hidden(replay(block, c, device).cpu()) for c in calls]
                block.to("cpu")
        timing[part.name] = time.perf_counter() - start
    return records, timing


def _quantize_block(
    block: nn.Module, block_name: str, segment: Segment, calls: list[BlockCall],
    scheme: PartScheme, part: str, recipe: Recipe, device: str,
) -> list[dict]:
    block.to(device)
    records = []
    for group in segment.layout.groups:
        modules = [block.get_submodule(name) for name in group]
        channel0 = _channel0_mode(modules[0], scheme, recipe)
        hessian, observer, channel0_observer = _collect_group_statistics(
            block, modules[0], calls, scheme, recipe.seed, device, channel0 == "int8")
        input_qparams = observer.compute() if observer else None
        channel0_scale = channel0_observer.compute()[0] if channel0_observer else None
        for name, module in zip(group, modules):
            q, record = _quantize_linear(module, scheme, hessian, input_qparams, channel0, channel0_scale)
            q.act_quant_enabled = recipe.propagate_activation_quant
            block.set_submodule(name, q)
            records.append({"name": f"{block_name}.{name}", "part": part, **record})
    return records


def _channel0_mode(module: nn.Module, scheme: PartScheme, recipe: Recipe) -> str | None:
    """How an RMS-split layer runs its channel-0 branch: int8 needs a static activation grid to
    sit beside, otherwise it stays in floating point."""
    if not splits_channel0(module):
        return None
    acts = scheme.input_activations
    static = acts is not None and not acts.dynamic
    return "int8" if recipe.transforms.rms_channel0 == "int8" and static else "fp"


def _collect_group_statistics(block, first: nn.Module, calls, scheme: PartScheme, seed: int, device: str,
                              observe_channel0: bool = False):
    """Replay the block once; the group's shared input feeds the Hessian and the observer (the main
    path's columns only: an RMS channel 0 has its own observer when it is quantized)."""
    acts = scheme.input_activations
    observer = ActivationObserver(acts, seed=seed) if acts is not None and not acts.dynamic else None
    channel0_observer = ActivationObserver(CHANNEL0_INT8, seed=seed) if observe_channel0 else None
    hessian = HessianAccumulator(weight_2d(first).shape[1]) if scheme.weights is not None else None

    def hook(module, args):
        full = transformed_input(module, args[0])
        x = full[:, 1:] if splits_channel0(module) else full
        if hessian is not None:
            hessian.add(x)
        if observer is not None:
            observer.observe(x)
        if channel0_observer is not None:
            channel0_observer.observe(full[:, :1])

    handle = first.register_forward_pre_hook(hook)
    try:
        for call in calls:
            replay(block, call, device)
    finally:
        handle.remove()
    return hessian, observer, channel0_observer


def _quantize_linear(module: nn.Module, scheme: PartScheme, hessian, input_qparams, channel0: str | None = None,
                     channel0_scale: torch.Tensor | None = None):
    w = weight_2d(module).float()
    acts = scheme.input_activations
    record = {
        "shape": list(w.shape),
        "w_bits": scheme.weights.num_bits if scheme.weights else 16,
        "a_bits": acts.num_bits if acts else 16,
        "dynamic": bool(acts and acts.dynamic),
        "input_scale": float(input_qparams[0]) if input_qparams else None,
        "rms_split": channel0 is not None,
    }
    qweight = None
    if scheme.weights is not None:
        grid = scheme.weights.grid()
        H = hessian.H
        if scheme.weights.algorithm == "gptq":
            outcome = gptq_quantize(w, H, grid, scheme.weights.gptq)
            qweight = outcome.weight
            record.update(algorithm="rtn-fallback" if outcome.fallback_rtn else "gptq", damp=outcome.damp_used)
        else:
            qweight = rtn_quantize(w, grid)
            record.update(algorithm="rtn")
        record["weight_error"] = relative_output_error(w, qweight.dequantize(), H)
    else:
        record.update(algorithm=None, weight_error=0.0)
    q = QuantLinear.from_float(module, qweight, acts, input_qparams, channel0, channel0_scale)
    return q, record
