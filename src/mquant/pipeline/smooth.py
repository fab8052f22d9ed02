"""SmoothQuant as a pre-pass: measure per-channel input maxima behind each norm, then fold."""

from __future__ import annotations

from functools import partial

import torch

from mquant.algorithms.smoothquant import apply_smoothing, smoothing_factors
from mquant.models.vlm import VLM
from mquant.runtime.patches import observe_inputs


@torch.no_grad()
def smooth_model(vlm: VLM, batches: list[dict], alpha: float, parts: list[str]) -> int:
    """Smooth every (norm -> readers) pair that the family declares in `parts`; returns how many."""
    pairs = []
    for part in vlm.family.parts:
        if part.name not in parts:
            continue
        for segment in part.segments:
            for _, block in segment.blocks(vlm.model):
                for norm, readers in segment.layout.norm_readers:
                    pairs.append((block.get_submodule(norm), [block.get_submodule(r) for r in readers],
                                  segment.layout.norm_chunks))
    absmax: dict[int, torch.Tensor] = {}

    def record(i: int, x: torch.Tensor) -> None:
        m = x.abs().amax(dim=0).float()
        absmax[i] = m if i not in absmax else torch.maximum(absmax[i], m)

    observe_inputs(vlm.model, {readers[0]: partial(record, i) for i, (_, readers, _) in enumerate(pairs)}, batches)
    for i, (norm, readers, chunks) in enumerate(pairs):
        apply_smoothing(norm, readers, smoothing_factors(absmax[i], readers, alpha, chunks), chunks)
    return len(pairs)
