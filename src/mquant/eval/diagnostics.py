"""Per-layer activation statistics that explain accuracy tables (ALGORITHMS.md §6, §7).

For the shared input of every declared linear group (what one activation quantizer sees):
- `max_over_rms`: max|x| / rms(x) over all rows, the outlier ratio a per-tensor int8 grid suffers;
- `channel0_over_max_other`: |x_0| against the largest other channel (the RMS outlier, when an
  exact Hadamard ran on the input);
- `visual_absmax`, `text_absmax` and their ratio in the language model (the MSQ motivation: the
  paper reports visual ranges about 40x the text ones).
Measured on a floating-point model with forward pre-hooks; nothing is changed.
"""

from __future__ import annotations

import torch

from mquant.modality.msq import visual_rows
from mquant.models.vlm import VLM
from mquant.runtime.patches import observe_inputs


class _InputStats:
    def __init__(self, part: str) -> None:
        self.part = part
        self.sq_sum = 0.0
        self.count = 0
        self.absmax = 0.0
        self.channel0 = 0.0
        self.others = 0.0
        self.by_modality = {"visual": 0.0, "text": 0.0}

    def observe(self, x: torch.Tensor, visual: torch.Tensor | None) -> None:
        x = x.detach().float()
        self.sq_sum += float(x.pow(2).sum())
        self.count += x.numel()
        self.absmax = max(self.absmax, float(x.abs().max()))
        self.channel0 = max(self.channel0, float(x[:, 0].abs().max()))
        self.others = max(self.others, float(x[:, 1:].abs().max()))
        if visual is not None and visual.numel() == x.shape[0]:
            for key, rows in (("visual", x[visual]), ("text", x[~visual])):
                if rows.numel():
                    self.by_modality[key] = max(self.by_modality[key], float(rows.abs().max()))

    def summary(self) -> dict:
        rms = (self.sq_sum / max(self.count, 1)) ** 0.5
        out = {"part": self.part, "max_over_rms": round(self.absmax / max(rms, 1e-12), 2),
               "channel0_over_max_other": round(self.channel0 / max(self.others, 1e-12), 2)}
        if self.part == "language":
            v, t = self.by_modality["visual"], self.by_modality["text"]
            out.update(visual_absmax=round(v, 4), text_absmax=round(t, 4), visual_over_text=round(v / max(t, 1e-12), 2))
        return out


@torch.no_grad()
def activation_statistics(vlm: VLM, batches: list[dict]) -> dict[str, dict]:
    """{first linear of each group: statistics of its input} over `batches`, by part order."""
    stats: dict[str, _InputStats] = {}
    callbacks = {}
    current: dict = {}
    for part in vlm.family.parts:
        for segment in part.segments:
            for block_name, block in segment.blocks(vlm.model):
                for group in segment.layout.groups:
                    entry = stats[f"{block_name}.{group[0]}"] = _InputStats(part.name)
                    callbacks[block.get_submodule(group[0])] = (
                        lambda x, e=entry: e.observe(x, current["visual"] if e.part == "language" else None))

    def before(batch: dict) -> None:
        current["visual"] = visual_rows(batch, vlm.image_token_id)

    observe_inputs(vlm.model, callbacks, batches, before)
    return {name: s.summary() for name, s in stats.items() if s.count}
