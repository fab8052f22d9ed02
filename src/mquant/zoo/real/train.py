"""Train what the real-weights model needs trained: `python -m mquant.zoo.real.train` (seeded).

The DINOv2 tower stays exactly as pretrained (its statistics, the outlier channel among them, are
what this model exists to show). LLaVA's two-layer projector learns, and so do low-rank adapters on
the decoder's attention projections (`--rank`, 0 for none): with the projector alone the frozen
135M decoder stayed at answer priors on every task but one (measured: after 110 steps of 8 samples,
calib-split scores yesno 0.19, compare 0.44, digits 0.25). The adapters are merged into the
decoder's weights by `mquant zoo build real`, which checks that the decoder still completes "The
capital of France is" with "Paris"; `benchmarks/real_residuals.py` measures whether its massive
activations survive them.

Losses (all on the benchmark's `train` split, `REAL_TASKS` only; progress is checked on `calib`,
`test` is never touched):
- the answer cross-entropy of the embedded model's training (`mquant.zoo.train.answer_loss`), with
  the same training forms and "describe the image" companions, plus its text-only yes/no drills;
- the embedded model's cell loss (`mquant.zoo.train.CellProbe`) on the projector's outputs, each
  DINOv2 patch labelled with the 28-px cell it lies in: the visual tokens land near the token
  embeddings of what they show, which a frozen decoder can already read. It needs no decoder pass,
  so `--vision-steps` of it alone come first.

The result is the projector's parameters and the adapters' factors, written to
`trained.safetensors` beside this file; the merge scale rides in its metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn
from tqdm.auto import tqdm

from mquant.fileio import write_bytes_atomic, write_json_atomic
from mquant.models.vlm import VLM, load_pretrained
from mquant.zoo.real.build import (
    KNOWLEDGE_PROMPT, REAL_TASKS, TRAINED, default_dir, greedy_completion, read_trained, real_model,
)
from mquant.zoo.render import CELL, COLORS, EMPTY, SHAPES, SIZE
from mquant.zoo.train import (
    CellProbe, answer_loss, comparison_drills, cosine_schedule, optimizer_step, quick_eval, training_batches,
)

# Attention only: adapters on the MLPs too (rank 8, 300 steps at 5e-4) made the decoder forget what
# it knew (it completed "The capital of France is" with " 12"); reading visual tokens is attention's job.
ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj")
# Yes/no (two questions per image) and the two-image comparison carry the most reasoning.
WEIGHTS = {"yesno": 2, "compare": 2}


class LowRankAdapter(nn.Module):
    """`base(x) + scale * x A^T B^T` with `B` starting at zero, so training starts at the pretrained
    decoder. Only `A` and `B` learn; `build.merge_adapters` folds `scale * B A` into the weight."""

    def __init__(self, base: nn.Linear, rank: int, scale: float) -> None:
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)


def add_adapters(decoder: nn.Module, rank: int, scale: float) -> dict[str, LowRankAdapter]:
    """Wrap every adapted linear of `decoder` (keys as in the shipped file: `language_model.<path>`)."""
    adapters = {}
    for name, module in list(decoder.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in ADAPTED and isinstance(child, nn.Linear):
                adapter = LowRankAdapter(child, rank, scale)
                setattr(module, child_name, adapter)
                adapters[f"language_model.{name}.{child_name}"] = adapter
    return adapters


def _autocast(bf16: bool):
    """bf16 autocast for one step's forward and backward (on AMD EPYC with AVX-512 BF16, bf16 matmuls
    at these shapes ran 2.7x faster than fp32; trained parameters and the optimizer stay fp32). One
    context per step, never around the loop: autocast caches its casts of the trained weights until
    the context exits, so updates made inside it would not reach the forward."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def patch_cells(samples) -> list:
    """`samples` with each image's 28-px cell labels repeated for the DINOv2 patches inside the cell
    (the projector emits one token per patch, row by row)."""
    per_side, patch = SIZE // CELL, SIZE // 8
    order = [(r * patch // CELL) * per_side + (c * patch // CELL) for r in range(8) for c in range(8)]
    return [dataclasses.replace(s, meta={**s.meta, "cells": [[cells[k] for k in order] for cells in s.meta["cells"]]})
            for s in samples]


def pretrain_projector(vlm: VLM, probe: CellProbe, steps: int, batch_size: int, lr: float, seed: int,
                       tasks: tuple[str, ...], bf16: bool = False) -> list:
    """The projector (and probe) on the cell loss alone: the tower runs, the decoder does not."""
    model = vlm.model.model
    params = list(model.multi_modal_projector.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps))
    stream = training_batches(seed + 1, batch_size, caption_every=0, tasks=tasks, weights=WEIGHTS)
    embeddings = model.language_model.embed_tokens.weight
    losses = []
    bar = tqdm(range(steps), desc="projector (cell loss)")
    for step in bar:
        samples = next(stream)
        images = [image for s in samples for image in s.images]
        pixels = vlm.image_processor(images=images, return_tensors="pt")["pixel_values"]
        with _autocast(bf16):
            with torch.no_grad():  # the tower is frozen: "default" features, the class token cropped
                features = model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
            tokens = model.multi_modal_projector(features)
            loss = probe.loss(tokens.reshape(-1, embeddings.shape[1]), embeddings, patch_cells(samples))
        optimizer_step(opt, sched, params, loss)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 20 == 0:
            losses.append([step, round(loss.item(), 4)])
    return losses


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, eval_every: int, eval_n: int,
          rank: int = 8, adapter_lr: float = 5e-4, vision_steps: int = 200, cell_loss_weight: float = 1.0,
          drills: int = 8, bf16: bool = False, tasks: tuple[str, ...] = REAL_TASKS, init: Path | None = None) -> dict:
    torch.manual_seed(seed)
    # The composed model with its seeded projector, built beside the shipped one.
    vlm = load_pretrained(real_model(default_dir().with_name(default_dir().name + "-untrained"), trained=None))
    model = vlm.model
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)
    scale = 2.0  # alpha / rank with alpha = 2 * rank
    adapters = add_adapters(model.model.language_model, rank, scale) if rank else {}
    previous = None
    if init is not None:
        _load_trained(init, projector, adapters)
        # The run that made `init`, so the shipped log records every stage of the parameters.
        earlier_log = init.with_name("train_log.json")
        previous = json.loads(earlier_log.read_text()) if earlier_log.is_file() else None
    # What the cells of these tasks can hold: a digit, a colour, a shape, or nothing.
    labels = [str(d) for d in range(10)] + list(COLORS) + list(SHAPES) + [EMPTY]
    probe = CellProbe(vlm.tokenizer, model.config.text_config.hidden_size, labels)
    log = {"seed": seed, "init": init.name if init else None, "bf16": bf16, "steps": steps, "batch_size": batch_size, "lr": lr, "rank": rank,
           "adapter_lr": adapter_lr, "vision_steps": vision_steps, "cell_loss_weight": cell_loss_weight,
           "drills": drills, "tasks": list(tasks), "previous": previous, "loss": [], "eval": []}
    start = time.perf_counter()
    model.eval()  # no dropout anywhere; gradients still flow to what trains
    if vision_steps:
        log["cell_loss"] = pretrain_projector(vlm, probe, vision_steps, 32, lr, seed, tasks, bf16)
    adapter_params = [p for a in adapters.values() for p in (a.lora_A, a.lora_B)]
    trained = list(projector.parameters()) + list(probe.parameters()) + adapter_params
    opt = torch.optim.AdamW([{"params": list(projector.parameters()) + list(probe.parameters()), "lr": lr},
                             {"params": adapter_params, "lr": adapter_lr}], betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps))
    stream = training_batches(seed, batch_size, tasks=tasks, weights=WEIGHTS)
    # Text-only drills train the adapters alone: without them they have nothing to train.
    drill_stream = comparison_drills(seed + 2, drills) if drills and adapters and "yesno" in tasks else None
    captured: list[torch.Tensor] = []
    hook = projector.register_forward_hook(lambda _m, _i, output: captured.append(output))
    embeddings = model.model.language_model.embed_tokens.weight
    bar = tqdm(range(steps), desc="projector + adapters")
    running = None
    for step in bar:
        samples = next(stream)
        captured.clear()
        with _autocast(bf16):
            parts = {"answer": answer_loss(vlm, samples)}
            if cell_loss_weight:
                tokens = torch.cat([c.reshape(-1, embeddings.shape[1]) for c in captured])
                parts["cell"] = cell_loss_weight * probe.loss(tokens, embeddings, patch_cells(samples))
            if drill_stream:
                parts["drill"] = answer_loss(vlm, next(drill_stream), decision_only=True)
            loss = sum(parts.values())
        optimizer_step(opt, sched, trained, loss)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
        if step % 10 == 0:
            log["loss"].append([step, round(running, 4), {k: round(v.item(), 4) for k, v in parts.items()}])
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            log["eval"].append([step + 1, quick_eval(vlm, eval_n, tasks)])
            model.eval()
            tqdm.write(f"step {step + 1}: {log['eval'][-1][1]}; '{KNOWLEDGE_PROMPT}' ->{_knowledge(vlm)!r}")
    hook.remove()
    log["eval"].append([steps, quick_eval(vlm, eval_n, tasks)])
    log["knowledge"] = _knowledge(vlm)
    log["train_seconds"] = round(time.perf_counter() - start, 1)
    tqdm.write(f"final (calib split): {log['eval'][-1][1]}; '{KNOWLEDGE_PROMPT}' ->{log['knowledge']!r}")
    state = {f"multi_modal_projector.{k}": v.detach().contiguous() for k, v in projector.state_dict().items()}
    for name, adapter in adapters.items():
        state[f"{name}.lora_A"] = adapter.lora_A.detach().contiguous()
        state[f"{name}.lora_B"] = adapter.lora_B.detach().contiguous()
    write_bytes_atomic(out, save(state, metadata={"lora_scale": repr(scale)}))
    write_json_atomic(out.with_name("train_log.json"), log)
    return log


def _knowledge(vlm: VLM) -> str:
    """Does the decoder still know what SmolLM2 knew? Its greedy 4 tokens after KNOWLEDGE_PROMPT."""
    return greedy_completion(vlm.model, vlm.tokenizer, KNOWLEDGE_PROMPT, 4)


def _load_trained(path: Path, projector: nn.Module, adapters: dict[str, LowRankAdapter]) -> None:
    """Start from an earlier run's parameters (`--init`): same rank, same adapted layers."""
    state, factors, _ = read_trained(path)
    projector.load_state_dict(state, strict=True)
    for name, adapter in adapters.items():
        adapter.lora_A.data.copy_(factors[name][0])
        adapter.lora_B.data.copy_(factors[name][1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mquant.zoo.real.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=TRAINED, help=f"trained parameters (default {TRAINED})")
    p.add_argument("--steps", type=int, default=400, help="joint steps (default 400)")
    p.add_argument("--vision-steps", type=int, default=200, help="cell-loss-only steps first (default 200)")
    p.add_argument("--lr", type=float, default=1e-3, help="projector's peak learning rate (default 1e-3)")
    p.add_argument("--rank", type=int, default=8, help="adapters' rank (default 8; 0: projector only)")
    p.add_argument("--adapter-lr", type=float, default=5e-4, help="adapters' peak learning rate (default 5e-4)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--drills", type=int, default=8, help="text-only yes/no drills per step (default 8)")
    p.add_argument("--cell-loss-weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward and backward passes")
    p.add_argument("--eval-every", type=int, default=0, help="calib-split check every N steps (0: only at the end)")
    p.add_argument("--eval-n", type=int, default=32, help="calib questions per task in each check")
    p.add_argument("--init", type=Path, default=None,
                   help="start from these trained parameters (an earlier run's output) instead of the seeded ones")
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    train(args.out, args.steps, args.batch_size, args.lr, args.seed, args.eval_every, args.eval_n, args.rank,
          args.adapter_lr, args.vision_steps, args.cell_loss_weight, args.drills, args.bf16, init=args.init)


if __name__ == "__main__":
    main()
