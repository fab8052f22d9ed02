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
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from mquant.algorithms.gptq import GPTQOutcome, HessianAccumulator, gptq_quantize_shared, relative_output_error
from mquant.algorithms.rtn import rtn_quantize
from mquant.errors import MquantError
from mquant.modality.msq import ModalityState, visual_rows
from mquant.models.spec import Segment
from mquant.models.vlm import VLM
from mquant.numerics.observers import ActivationObserver
from mquant.pipeline.capture import BlockCall, capture_block_inputs, replay
from mquant.recipe import PartScheme, Recipe
from mquant.runtime.patches import main_path, splits_channel0, transformed_input, weight_2d
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
        # MSQ: the visual-row mask of every calibration call (calls are captured one per batch).
        modality = ModalityState(vlm.image_token_id) if scheme.modality_scales else None
        masks = [visual_rows(b, vlm.image_token_id) for b in batches] if modality else None
        for segment in part.segments:
            blocks = segment.blocks(vlm.model)
            calls = capture_block_inputs(run_model, blocks[0][1], batches)
            bar = tqdm(blocks, desc=f"{part.name}: {segment.path}", disable=not progress, leave=False)
            for index, (block_name, block) in enumerate(bar):
                records += _quantize_block(block, block_name, segment, calls, scheme, part.name, recipe, device,
                                           modality, masks)
                if index + 1 < len(blocks):
                    calls = [c.with_hidden(replay(block, c, device).cpu()) for c in calls]
                block.to("cpu")
        timing[part.name] = time.perf_counter() - start
    return records, timing


def _quantize_block(
    block: nn.Module, block_name: str, segment: Segment, calls: list[BlockCall],
    scheme: PartScheme, part: str, recipe: Recipe, device: str,
    modality: ModalityState | None = None, masks: list[torch.Tensor] | None = None,
) -> list[dict]:
    block.to(device)
    records = []
    for group in segment.layout.groups:
        modules = [block.get_submodule(name) for name in group]
        channel0 = _channel0_mode(modules[0], scheme, recipe)
        stats = _collect_group_statistics(block, modules[0], calls, scheme, recipe.seed, device,
                                          channel0 == "int8", modality, masks)
        inputs = stats.freeze(part)
        gptq = scheme.weights is not None and scheme.weights.algorithm == "gptq"
        outcomes = gptq_quantize_shared([weight_2d(m).float() for m in modules], stats.hessian.H,
                                        scheme.weights.grid(), scheme.weights.gptq) if gptq else [None] * len(modules)
        for name, module, outcome in zip(group, modules, outcomes):
            q, record = _quantize_linear(module, scheme, stats.hessian, inputs, channel0, outcome)
            q.act_quant_enabled = recipe.propagate_activation_quant
            q.modality = modality
            block.set_submodule(name, q)
            records.append({"name": f"{block_name}.{name}", "part": part, **record})
    return records


@dataclass
class GroupStatistics:
    """What one replay of a block gathers about a group's shared input."""

    hessian: HessianAccumulator | None
    observers: dict[str, ActivationObserver]  # "all", or "visual" and "text" under MSQ
    channel0: ActivationObserver | None  # the RMS channel-0 input, when it is quantized

    def freeze(self, part: str) -> "FrozenInput":
        def qparams(key: str):
            observer = self.observers.get(key)
            if observer is not None and observer.rows_seen == 0:
                raise MquantError(f"no {key} rows in the calibration data: per-modality scales need samples "
                                  "with images and text")
            return observer.compute() if observer is not None else None

        channel0 = self.channel0.compute()[0] if self.channel0 is not None else None
        if "visual" in self.observers:
            text, visual = qparams("text"), qparams("visual")
            return FrozenInput(text, visual, channel0, {"visual": float(visual[0]), "text": float(text[0])})
        text = qparams("all")
        # One scale serves every token; the vision side only ever sees visual tokens.
        scales = None if text is None else {"visual": float(text[0]),
                                            "text": float(text[0]) if part == "language" else None}
        return FrozenInput(text, None, channel0, scales)


@dataclass
class FrozenInput:
    """The static quantization parameters of a group's input (text rows', or every row's)."""

    qparams: tuple | None
    visual_qparams: tuple | None
    channel0_scale: torch.Tensor | None
    a_scales: dict | None  # for the report


def _channel0_mode(module: nn.Module, scheme: PartScheme, recipe: Recipe) -> str | None:
    """How an RMS-split layer runs its channel-0 branch: int8 needs a static activation grid to
    sit beside, otherwise it stays in floating point."""
    if not splits_channel0(module):
        return None
    acts = scheme.input_activations
    static = acts is not None and not acts.dynamic
    return "int8" if recipe.transforms.rms_channel0 == "int8" and static else "fp"


def _collect_group_statistics(block, first: nn.Module, calls, scheme: PartScheme, seed: int, device: str,
                              observe_channel0: bool = False, modality: ModalityState | None = None,
                              masks: list[torch.Tensor] | None = None) -> GroupStatistics:
    """Replay the block once; the group's shared input feeds the Hessian and the observer(s) (the
    main path's columns only: an RMS channel 0 has its own observer when it is quantized). Under
    MSQ, visual and text rows feed separate observers."""
    acts = scheme.input_activations
    static = acts is not None and not acts.dynamic
    keys = ("visual", "text") if static and scheme.modality_scales else ("all",) if static else ()
    stats = GroupStatistics(
        HessianAccumulator(weight_2d(first).shape[1]) if scheme.weights is not None else None,
        {k: ActivationObserver(acts, seed=seed) for k in keys},
        ActivationObserver(CHANNEL0_INT8, seed=seed) if observe_channel0 else None,
    )
    current: dict = {"seen": 0}  # the call's visual mask; calls of `first` in this replay; stop early?

    def hook(module, args):
        current["seen"] += 1
        full = transformed_input(module, args[0])
        x = main_path(module, full)
        if stats.hessian is not None:
            stats.hessian.add(x)
        if "all" in stats.observers:
            stats.observers["all"].observe(x)
        elif stats.observers:
            visual = current["mask"].to(x.device)
            stats.observers["visual"].observe(x[visual])
            stats.observers["text"].observe(x[~visual])
        if stats.channel0 is not None:
            stats.channel0.observe(full[:, :1])
        if current.get("stop_early"):
            raise _InputSeen

    handle = first.register_forward_pre_hook(hook)
    try:
        for i, call in enumerate(calls):
            if masks is not None:
                current["mask"] = masks[i]
                modality.visual = masks[i]  # for per-modality layers already quantized in this block
            current["seen"] = 0
            try:
                replay(block, call, device)
            except _InputSeen:
                continue
            # The rest of the block is not needed once the group's input is seen (most of a block's
            # work, for its first groups) — if the first replay showed that `first` runs once per call.
            current["stop_early"] = current["seen"] == 1
    finally:
        handle.remove()
    return stats


class _InputSeen(Exception):
    """Ends a statistics replay at the group's input (`_collect_group_statistics`)."""


def _quantize_linear(module: nn.Module, scheme: PartScheme, hessian: HessianAccumulator | None,
                     inputs: FrozenInput, channel0: str | None = None, outcome: GPTQOutcome | None = None):
    """`outcome`: the module's GPTQ result, solved with the rest of its group (`gptq_quantize_shared`)."""
    w = weight_2d(module).float()
    acts = scheme.input_activations
    record = {
        "shape": list(w.shape),
        "w_bits": scheme.weights.num_bits if scheme.weights else 16,
        "a_bits": acts.num_bits if acts else 16,
        "dynamic": bool(acts and acts.dynamic),
        "a_scales": inputs.a_scales,
        "rms_split": channel0 is not None,
    }
    qweight = None
    if scheme.weights is not None:
        grid = scheme.weights.grid()
        H = hessian.H
        if outcome is not None:
            qweight = outcome.weight
            record.update(algorithm="rtn-fallback" if outcome.fallback_rtn else "gptq", damp=outcome.damp_used)
        else:
            qweight = rtn_quantize(w, grid)
            record.update(algorithm="rtn")
        record["weight_error"] = relative_output_error(w, qweight.dequantize(), H)
    else:
        record.update(algorithm=None, weight_error=0.0)
    q = QuantLinear.from_float(module, qweight, acts, inputs.qparams, channel0, inputs.channel0_scale,
                               inputs.visual_qparams)
    return q, record
