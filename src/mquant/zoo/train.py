"""Train the embedded model: `python -m mquant.zoo.train` (seeded; about 45 minutes on 2 CPU cores).

The model learns every benchmark task from the `train` split, streamed (no sample is repeated):
answers are produced by generation, so the loss is next-token cross-entropy on the answer tokens
(plus the end-of-turn token) of a chat-formatted prompt. Progress is monitored on the `calib` split;
the `test` split is never touched here.

Measured on this task: at a peak learning rate of 1e-3 the language model settles on the answer
prior and never learns to read the visual tokens (digits stay at chance after 9,600 samples), while
the vision tower alone, probed directly, learns digits in 120 steps; at 3e-4 the language model
picks the visual tokens up after about 250 steps of digits alone (0.69 on calib digits after 300),
but not within 1,200 steps of the six tasks in turn, hence the digits-first curriculum.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mquant.fileio import atomic_directory, write_json_atomic
from mquant.models.qwen2_vl import FAMILY
from mquant.models.vlm import VLM
from mquant.zoo import benchmark
from mquant.zoo.architecture import build_components

DEFAULT_OUT = Path(__file__).parent / "model"


def answer_loss(vlm: VLM, samples) -> torch.Tensor:
    """Cross-entropy on each sample's answer and end-of-turn token (inputs are left-padded, so every
    answer ends at the same column: the template closes with `<|im_end|>` + newline)."""
    batch = vlm.encode(samples, with_answer=True)
    logits = vlm.model(**batch).logits
    ids = batch["input_ids"]
    L = ids.shape[1]
    end_of_turn = len(vlm.tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"])
    losses = []
    for row, sample in enumerate(samples):
        n = len(vlm.tokenizer(sample.answers[0], add_special_tokens=False)["input_ids"]) + 1
        last = L - end_of_turn + 1  # one past the <|im_end|> position
        targets = ids[row, last - n : last]
        losses.append(F.cross_entropy(logits[row, last - n - 1 : last - 1].float(), targets, reduction="sum"))
    count = sum(len(vlm.tokenizer(s.answers[0], add_special_tokens=False)["input_ids"]) + 1 for s in samples)
    return torch.stack(losses).sum() / count


def training_batches(seed: int, batch_size: int, curriculum_steps: int = 0):
    """Batches of one task at a time, cycling over the tasks (similar lengths, little padding);
    yes/no items contribute both questions of a pair. The first `curriculum_steps` batches are all
    `digits`, the task whose answer depends most simply on the image: it teaches the language model
    to read the visual tokens at all, which the mixed tasks alone did not within 1,200 steps."""
    tasks = list(benchmark.GENERATORS)
    drawn = {t: 0 for t in tasks}
    step = 0
    while True:
        task = "digits" if step < curriculum_steps else tasks[(step - curriculum_steps) % len(tasks)]
        batch: list = []
        while len(batch) < batch_size:
            batch += benchmark.draw(task, "train", drawn[task], seed)
            drawn[task] += 1
        yield batch[:batch_size]
        step += 1


@torch.no_grad()
def quick_eval(vlm: VLM, n: int = 48) -> dict[str, float]:
    from mquant.eval.registry import get_task

    vlm.model.eval()
    scores = {}
    for name in benchmark.GENERATORS:
        task = get_task(name)
        samples = benchmark.generate(name, "calib", n)
        preds = []
        for k in range(0, n, 16):
            preds += vlm.generate(samples[k : k + 16], task.max_new_tokens)
        scores[name] = task.aggregate(preds, samples)["score"]
    vlm.model.train()
    return scores


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


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, eval_every: int,
          curriculum_steps: int = 0) -> dict:
    torch.manual_seed(seed)
    config, tokenizer, processor = build_components()
    model = FAMILY.model_class(config)
    model.train()
    vlm = VLM(model, tokenizer, processor, FAMILY, str(out))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 30)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / steps)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    stream = training_batches(seed, batch_size, curriculum_steps)
    log = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "curriculum_steps": curriculum_steps,
           "loss": [], "eval": []}
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train")
    running = None
    # fp32 on purpose: on this CPU torch's bf16 matmuls for these shapes are ~30x slower than fp32.
    with patch_embedding_as_linear(model):
        for step in bar:
            loss = answer_loss(vlm, next(stream))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.set_postfix(loss=f"{running:.3f}")
            if step % 50 == 0:
                log["loss"].append([step, round(running, 4)])
            if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                log["eval"].append([step + 1, quick_eval(vlm)])
                tqdm.write(f"step {step + 1}: {log['eval'][-1][1]}")
    model.eval()
    log["eval"].append([steps, quick_eval(vlm)])
    log["train_seconds"] = round(time.perf_counter() - start, 1)
    tqdm.write(f"final (calib split): {log['eval'][-1][1]}")
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json_atomic(tmp / "train_log.json", log)
    return log


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mquant.zoo.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--steps", type=int, default=2700)
    p.add_argument("--curriculum-steps", type=int, default=300, help="digits-only steps first (default 300)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=600)
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    train(args.out, args.steps, args.batch_size, args.lr, args.seed, args.eval_every, args.curriculum_steps)


if __name__ == "__main__":
    main()
