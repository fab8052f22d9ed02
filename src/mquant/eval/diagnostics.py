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


@torch.no_grad()
def residual_statistics(vlm: VLM, batches: list[dict], part: str = "language") -> list[dict]:
    """Per block of `part`: its output residual stream's max |h|, median |h| and their ratio, where
    the max sits (token position, channel), and the visual over text max |h| (language model).

    The massive activations of real LLMs (a few thousand times the median, on one token and one
    channel, from an early layer on) show here; `activation_statistics` sees the normalised inputs.
    """
    blocks = [(name, block) for _, name, block in vlm.family.blocks(vlm.model, (part,))]
    found: list[dict] = [{"block": name, "max": 0.0, "medians": [], "visual": 0.0, "text": 0.0, "at": None}
                         for name, _ in blocks]
    current: dict = {}

    def hook(index: int):
        def record(_module, _args, output):
            h = (output[0] if isinstance(output, tuple) else output).detach().float()
            h = h.reshape(-1, h.shape[-1]) if h.dim() != 3 else h[0]  # one sample per batch
            entry, a = found[index], h.abs()
            flat = int(a.argmax())
            if float(a.max()) > entry["max"]:
                entry["max"], entry["at"] = float(a.max()), [flat // a.shape[1], flat % a.shape[1]]
            entry["medians"].append(float(a.median()))
            visual = current.get("visual")
            if visual is not None and visual.numel() == a.shape[0]:
                for key, rows in (("visual", a[visual]), ("text", a[~visual])):
                    if rows.numel():
                        entry[key] = max(entry[key], float(rows.max()))
        return record

    handles = [block.register_forward_hook(hook(i)) for i, (_, block) in enumerate(blocks)]
    try:
        for batch in batches:
            if batch["input_ids"].shape[0] != 1:
                raise ValueError("residual_statistics takes one sample per batch")
            current["visual"] = visual_rows(batch, vlm.image_token_id).reshape(-1) if part == "language" else None
            vlm.model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    out = []
    for entry in found:
        median = sorted(entry["medians"])[len(entry["medians"]) // 2] if entry["medians"] else 0.0
        row = {"block": entry["block"], "max": round(entry["max"], 2), "median": round(median, 5),
               "max_over_median": round(entry["max"] / max(median, 1e-12), 1), "argmax": entry["at"]}
        if part == "language":
            row["visual_over_text"] = round(entry["visual"] / max(entry["text"], 1e-12), 3)
        out.append(row)
    return out
