"""Train the embedded model: `python -m mquant.zoo.train` (seeded; about 40 minutes on 2 CPU cores).

The model learns every benchmark task from the `train` split, streamed (no sample is repeated).
Answers are produced by generation, so the main loss is next-token cross-entropy on the answer
tokens (plus the end-of-turn token) of a chat-formatted prompt, averaged per sample. Progress is
monitored on the `calib` split; the `test` split is never touched here.

Training-only aids make a model this small learn in minutes what the answer loss alone did not
(measured: with the answer loss and a digits-first curriculum, calib scores after 1,800 steps were
0 % on textread and 9 % on docfields, the language model guessing answer priors):

- a *cell loss* (`CellProbe`): every merged visual token (one 28 x 28 cell of a benchmark image)
  is pulled towards the token embeddings of what its cell shows (a digit, the word or characters
  written there, the colour and shape drawn there, or `empty`); with tied input/output embeddings
  the language model then only has to learn where to look and to copy;
- a *character-slot loss* (`CharacterSlotProbe`): the first, second, ... character of a number or
  code in a cell, read out of its visual token linearly, so that the order of the characters is
  something the language model can copy;
- "describe the image" companions (`benchmark.caption_sample`) for half of the items, so the
  language model practises reading every cell out in order.

Multiple-choice and yes/no samples are trained on answers their parsers read the same way
(`benchmark.training_form`): the chosen option's text, and what the model saw followed by yes or no
("there are 3 shapes, so no"). The comparison that decides the yes or no is also drilled on text
alone (`comparison_drills`, `--drills` per step). `python benchmarks/question_kinds.py` splits the
scores by question kind.

Training starts with `--vision-steps` steps of the cell and slot losses alone (the language model is not run:
a step costs a third of a full one), then trains everything. Training runs in fp32: on this CPU
torch's bf16 matmuls for these shapes are about 30x slower. `--device cuda` trains on a GPU (not
bit-identical to the CPU run that made the committed weights).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

from mquant.fileio import atomic_directory, write_json_atomic
from mquant.models.qwen2_vl import FAMILY
from mquant.models.vlm import VLM
from mquant.samples import IMAGE_MARKER
from mquant.zoo import benchmark
from mquant.zoo.architecture import build_components

DEFAULT_OUT = Path(__file__).parent / "model"


def answer_loss(vlm: VLM, samples, decision_only: bool = False) -> torch.Tensor:
    """Cross-entropy on each sample's answer and end-of-turn token, averaged per sample and then over
    the batch, so a long caption weighs as much as a one-word answer, not thirty times more (inputs
    are left-padded, so every answer ends at the same column: the template closes with
    `<|im_end|>` + newline). `decision_only`: on the answer's last token alone (`comparison_drills`)."""
    batch = vlm.encode(samples, with_answer=True)
    ids = batch["input_ids"]
    last = ids.shape[1] - len(vlm.tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"]) + 1
    spans = []
    for sample in samples:
        if decision_only:  # the answer's last token, not the end-of-turn token after it
            spans.append((last - 2, last - 1))
        else:
            spans.append((last - 1 - len(vlm.tokenizer(sample.answers[0], add_special_tokens=False)["input_ids"]), last))
    # Only the answer columns' logits: the output head over every prompt position cost a fifth of a step.
    first = min(start for start, _ in spans) - 1
    logits = vlm.model(**batch, logits_to_keep=ids.shape[1] - first).logits
    losses = [F.cross_entropy(logits[row, start - 1 - first : end - 1 - first].float(), ids[row, start:end])
              for row, (start, end) in enumerate(spans)]
    return torch.stack(losses).mean()


def comparison_drills(seed: int, batch_size: int):
    """Batches of text-only yes/no items, trained on the yes or no alone: the question and the
    training answer's reasoning ("... the shape closest to the top is the red circle, so") without
    the image.

    Why: the reasoning is what the model says it saw, so the yes or no after it only compares the
    question's words with the answer's. Trained on the image items alone, a model compared a colour
    or shape at chance after 4,400 steps (a yes/no token is one of some fifteen in its answer, and
    images cost most of a step); fine-tuning its language model on these drills taught the
    comparison in a few hundred steps, and drilling from the start costs a quarter of each step."""
    i = 0
    while True:
        batch: list = []
        while len(batch) < batch_size:
            for sample in benchmark.draw("yesno", "train", i, seed):
                batch.append(dataclasses.replace(benchmark.training_form(sample), images=[], meta={},
                                                 text=sample.text.replace(f"{IMAGE_MARKER}\n", "")))
            i += 1
        yield batch[:batch_size]


class CharacterSlotProbe(nn.Module):
    """Training-only supervision of the characters of a number or code, slot by slot: a linear
    read-out, from each merged visual token, of the first, second, ... character centred in its cell
    (cells without such characters are skipped).

    Why: the cell loss pulls a token towards a weighted mix of its characters' embeddings, from which
    the language model must tell the second character from the third by weight alone, and a repeated
    digit not at all; a model trained without it read 17 % of five-digit numbers right against 99 %
    of words. Slots make the order a linear feature the language model can copy. The probe is not part
    of the saved model."""

    SLOTS = 4
    ALPHABET = "0123456789/ABCDEFGHJKLMNPRSTUVWXYZ"

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.head = nn.Linear(dim, self.SLOTS * (len(self.ALPHABET) + 1))

    def targets(self, samples) -> torch.Tensor:
        """(cells of every image in batch order, SLOTS) class indices; -100 where not supervised."""
        none, rows = len(self.ALPHABET), []
        for sample in samples:
            for cells in sample.meta["cells"]:
                for labels in cells:
                    chars = [self.ALPHABET.index(c) for c in labels if len(c) == 1 and c in self.ALPHABET]
                    rows.append((chars + [none] * self.SLOTS)[: self.SLOTS] if chars else [-100] * self.SLOTS)
        return torch.tensor(rows)

    def loss(self, visual_tokens: torch.Tensor, samples) -> torch.Tensor:
        targets = self.targets(samples).to(visual_tokens.device)
        logits = self.head(visual_tokens).float().reshape(len(targets), self.SLOTS, -1)
        if not (targets >= 0).any():
            return logits.sum() * 0
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


class CellProbe(nn.Module):
    """Training-only supervision of the visual tokens: each merged token (one 28 x 28 cell of a
    benchmark image) should name what its cell holds (`meta["cells"]`: colour and shape, a digit,
    the word or characters written there, or `empty`). Scores are cosine similarities with the
    language model's token embeddings under a learned temperature, so the tokens the vision tower
    emits land near the embeddings of the words they show: the language model then only has to
    learn where to look, which from the answer loss alone took it thousands of steps (see the
    module docstring). The characters of numbers and codes are also read out slot by slot
    (`CharacterSlotProbe`). The probe is not part of the saved model."""

    def __init__(self, tokenizer, dim: int, labels: list[str] | None = None) -> None:
        """`labels`: score the tokens against these labels' token embeddings only, not the whole
        vocabulary (a fraction of the cost where the cells can only hold a few kinds of thing)."""
        super().__init__()
        self.tokenizer = tokenizer
        self.slots = CharacterSlotProbe(dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self._ids: dict[str, list[int]] = {}
        self.vocab = sorted({i for label in labels for i in self.label_ids(label)}) if labels else None

    def label_ids(self, label: str) -> list[int]:
        """The tokens of `label`, and of " " + `label` where that is one token: a word is one token
        with its leading space inside a sentence (captions, options) and another without (first in
        an answer), and the visual token should be near both."""
        if label not in self._ids:
            ids = self.tokenizer(label, add_special_tokens=False)["input_ids"]
            spaced = self.tokenizer(" " + label, add_special_tokens=False)["input_ids"]
            self._ids[label] = sorted(set(ids + spaced)) if len(spaced) == 1 else ids
        return self._ids[label]

    def targets(self, samples, vocab: int) -> torch.Tensor:
        """(cells of every image in batch order, vocab) target distributions."""
        column = {v: k for k, v in enumerate(self.vocab)} if self.vocab else None
        rows = []
        for sample in samples:
            for cells in sample.meta["cells"]:
                for labels in cells:
                    row = torch.zeros(len(self.vocab) if column else vocab)
                    for label, weight in zip(labels, self.label_weights(labels)):
                        ids = self.label_ids(label)
                        row[[column[i] for i in ids] if column else ids] += weight / len(ids)
                    rows.append(row)
        return torch.stack(rows)

    @staticmethod
    def label_weights(labels: list[str]) -> list[float]:
        """How much of a cell's target each label gets: equal shares, except for the characters of a
        number or code, which halve from left to right, so that the visual token says in which order
        they are written (with equal shares it holds them as a set, and the model read 13758 as 13785)."""
        if all(len(label) == 1 for label in labels):
            weights = [0.5 ** k for k in range(len(labels))]
        else:
            weights = [1.0] * len(labels)
        return [w / sum(weights) for w in weights]

    def loss(self, visual_tokens: torch.Tensor, embeddings: torch.Tensor, samples) -> torch.Tensor:
        """Cross-entropy of the merged visual tokens of `samples` (batch order) against their cells."""
        targets = self.targets(samples, embeddings.shape[0]).to(embeddings.device)
        if self.vocab:
            embeddings = embeddings[self.vocab]
        if visual_tokens.shape[0] != targets.shape[0]:
            raise RuntimeError(f"{visual_tokens.shape[0]} visual tokens for {targets.shape[0]} labelled cells")
        logits = self.log_scale.exp() * F.normalize(visual_tokens, dim=-1) @ F.normalize(embeddings, dim=-1).T
        cells = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
        return cells + self.slots.loss(visual_tokens, samples)


# Drawn twice as often as the others: the tasks that read numbers and codes character by character
# (the slowest skill to learn) and the one that needs the most reasoning about a scene (counting one
# kind of shape, the colour of a named one, the topmost one).
TASK_WEIGHTS = {"textread": 2, "docfields": 2, "choice": 2}


def training_batches(seed: int, batch_size: int, caption_every: int = 2, tasks: tuple[str, ...] | None = None,
                     weights: dict[str, int] = TASK_WEIGHTS):
    """Batches of `batch_size` samples mixing `tasks` (default: every task) by `weights` (yes/no items
    contribute both questions of a pair); every `caption_every`-th item of a task also contributes its
    "describe the image" companion."""
    names = tuple(tasks or benchmark.GENERATORS)
    tasks = [t for t in names for _ in range(weights.get(t, 1))]
    drawn = {t: 0 for t in names}
    step = 0
    while True:
        batch: list = []
        k = 0
        while len(batch) < batch_size:
            task = tasks[(step * batch_size + k) % len(tasks)]
            drawn_samples = benchmark.draw(task, "train", drawn[task], seed)
            item = [benchmark.training_form(sample) for sample in drawn_samples]
            if caption_every and drawn[task] % caption_every == 0:
                item.append(benchmark.caption_sample(item[0]))
            batch += item
            drawn[task] += 1
            k += 1
        yield batch[:batch_size]
        step += 1


@torch.no_grad()
def quick_eval(vlm: VLM, n: int = 48, tasks: tuple[str, ...] | None = None) -> dict[str, float]:
    from mquant.eval.registry import get_task

    vlm.model.eval()
    scores = {}
    for name in tasks or benchmark.GENERATORS:
        task = get_task(name)
        samples = benchmark.generate(name, "calib", n)
        preds = []
        for k in range(0, n, 16):
            preds += vlm.generate(samples[k : k + 16], task.max_new_tokens)
        scores[name] = task.aggregate(preds, samples)["score"]
    vlm.model.train()
    return scores


def _batched_vision_attention(attn, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """Qwen2-VL's vision attention for images of equal patch counts as one batched SDPA call.

    Transformers' non-flash path runs one attention call per image (about 70 per layer for a
    training batch); every benchmark image has the same size, so one call does the same work with a
    few kernels instead of hundreds (training only; ragged batches fall back to the original)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if len(set(lengths)) != 1:
        return type(attn).forward(attn, hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
    seq, heads = hidden_states.shape[0], attn.num_heads
    q, k, v = attn.qkv(hidden_states).reshape(seq, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
    q, k, v = (t.reshape(len(lengths), lengths[0], heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
    return attn.proj(out.transpose(1, 2).reshape(seq, -1))


@contextlib.contextmanager
def training_fast_paths(model):
    """Training-time equivalents of two slow spots of Qwen2-VL's vision tower (the saved model is
    untouched): the patch embedding as a matmul and vision attention batched over images."""
    attns = [block.attn for block in model.model.visual.blocks]
    with patch_embedding_as_linear(model):
        for attn in attns:
            attn.forward = functools.partial(_batched_vision_attention, attn)
        try:
            yield
        finally:
            for attn in attns:
                del attn.forward


@contextlib.contextmanager
def patch_embedding_as_linear(model):
    """Run Qwen2-VL's Conv3d patch embedding as the linear map it is (kernel == stride) while training.

    The pixel rows are already flattened patches in the kernel's (C, T, H, W) order, so this is the
    same function; CPU Conv3d backward is a slow reference kernel (about 5 s per batch of 32 here,
    against milliseconds for the matmul). The saved model keeps its ordinary Conv3d.
    """
    embed = model.model.visual.patch_embed
    conv = embed.proj
    embed.forward = lambda x: F.linear(x.to(conv.weight.dtype), conv.weight.flatten(1), conv.bias)
    try:
        yield
    finally:
        del embed.forward


def cosine_schedule(steps: int):
    """Linear warm-up over the first 1/30 of the steps, then cosine decay to 5 % of the peak."""
    warmup = max(1, steps // 30)
    return lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / steps)))


def optimizer_step(opt, sched, params, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def pretrain_vision(vlm: VLM, probe: CellProbe, captured: list, steps: int, batch_size: int, lr: float,
                    seed: int) -> list:
    """Train the vision tower and merger on the cell loss alone (no language model in the loop).

    A vision-only step costs a fraction of a full one, and the tower then starts the joint phase
    already emitting tokens near the embeddings of what each cell shows."""
    model = vlm.model
    params = list(model.model.visual.parameters()) + list(model.get_input_embeddings().parameters()) \
        + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps))
    stream = training_batches(seed + 1, batch_size, caption_every=0)
    embeddings = model.get_input_embeddings().weight
    losses = []
    bar = tqdm(range(steps), desc="vision")
    for step in bar:
        samples = next(stream)
        images = [image for sample in samples for image in sample.images]
        inputs, _ = vlm.family.images.process(vlm.image_processor, images, model.config)
        captured.clear()
        model.model.visual(inputs["pixel_values"].to(model.device), grid_thw=inputs["image_grid_thw"].to(model.device))
        loss = probe.loss(torch.cat(captured), embeddings, samples)
        optimizer_step(opt, sched, params, loss)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 50 == 0:
            losses.append([step, round(loss.item(), 4)])
    return losses


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, eval_every: int,
          vision_steps: int = 0, vision_lr_scale: float = 1.0, cell_loss_weight: float = 1.0,
          drills: int = 0, device: str = "cpu") -> dict:
    torch.manual_seed(seed)
    config, tokenizer, processor = build_components()
    model = FAMILY.model_class(config).to(device)
    model.train()
    vlm = VLM(model, tokenizer, processor, FAMILY, str(out))
    probe = CellProbe(tokenizer, config.text_config.hidden_size).to(device)
    captured: list[torch.Tensor] = []
    hook = model.model.visual.merger.register_forward_hook(lambda _m, _i, output: captured.append(output))
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        groups.setdefault((name.startswith("model.visual."), param.dim() >= 2), []).append(param)
    # The vision tower (with the merger) learns from gradients that pass through the whole language
    # model; a higher rate lets it form features before the language model settles on answer priors.
    opt = torch.optim.AdamW([{"params": params, "lr": lr * (vision_lr_scale if visual else 1.0),
                              "weight_decay": 0.05 if matrix else 0.0}
                             for (visual, matrix), params in groups.items()]
                            + [{"params": list(probe.parameters()), "lr": lr, "weight_decay": 0.0}], betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps))
    stream = training_batches(seed, batch_size)
    drill_stream = comparison_drills(seed + 2, drills) if drills else None
    log = {"seed": seed, "device": str(device), "steps": steps, "batch_size": batch_size, "lr": lr,
           "vision_lr_scale": vision_lr_scale, "cell_loss_weight": cell_loss_weight, "vision_steps": vision_steps,
           "drills": drills, "loss": [], "eval": []}
    start = time.perf_counter()
    # fp32 on purpose: on this CPU torch's bf16 matmuls for these shapes are ~30x slower than fp32.
    with training_fast_paths(model):
        if vision_steps:
            log["vision_loss"] = pretrain_vision(vlm, probe, captured, vision_steps, batch_size,
                                                 lr * vision_lr_scale, seed)
        bar = tqdm(range(steps), desc="train")
        running = None
        for step in bar:
            samples = next(stream)
            captured.clear()
            loss = answer_loss(vlm, samples)
            if cell_loss_weight:
                loss = loss + cell_loss_weight * probe.loss(torch.cat(captured), model.get_input_embeddings().weight,
                                                            samples)
            if drill_stream:
                loss = loss + answer_loss(vlm, next(drill_stream), decision_only=True)
            optimizer_step(opt, sched, model.parameters(), loss)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.set_postfix(loss=f"{running:.3f}")
            if step % 50 == 0:
                log["loss"].append([step, round(running, 4)])
            if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                log["eval"].append([step + 1, quick_eval(vlm)])
                tqdm.write(f"step {step + 1}: {log['eval'][-1][1]}")
    hook.remove()
    model.eval()
    log["eval"].append([steps, quick_eval(vlm)])
    log["train_seconds"] = round(time.perf_counter() - start, 1)
    tqdm.write(f"final (calib split): {log['eval'][-1][1]}")
    model.to("cpu")
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json_atomic(tmp / "train_log.json", log)
    return log


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mquant.zoo.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--vision-steps", type=int, default=800, help="vision-only cell-loss steps first (default 800)")
    p.add_argument("--steps", type=int, default=4400, help="joint steps after them (default 4400)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    p.add_argument("--vision-lr-scale", type=float, default=2.0, help="vision tower LR / language LR (default 2)")
    p.add_argument("--cell-loss-weight", type=float, default=1.0, help="weight of the cell loss (default 1)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--drills", type=int, default=16,
                   help="text-only yes/no comparison drills per step (default 16; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu",
                   help="torch device (default cpu; the committed weights come from a CPU run)")
    p.add_argument("--eval-every", type=int, default=750, help="calib-split check every N steps (0: only at the end)")
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    train(args.out, args.steps, args.batch_size, args.lr, args.seed, args.eval_every, args.vision_steps,
          args.vision_lr_scale, args.cell_loss_weight, args.drills, args.device)


if __name__ == "__main__":
    main()
