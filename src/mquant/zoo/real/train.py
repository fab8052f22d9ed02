"""Train the real-weights model's projector: `python -m mquant.zoo.real.train` (seeded).

Only LLaVA's two-layer projector learns; the DINOv2 tower and the SmolLM2 decoder stay exactly as
pretrained, because their statistics (the decoder's massive activations, the tower's outlier
channel) are what this model exists to show. The loss is the answer cross-entropy of the embedded
model's training (`mquant.zoo.train.answer_loss`) on the benchmark's `train` split, with the same
training forms ("red circle" for a choice, what was seen then yes or no) and "describe the image"
companions; progress is checked on the `calib` split, the `test` split is never touched.

The result is the projector's parameters alone, written to `trained.safetensors` beside this file
(about 2 MB); `mquant zoo build real` merges them into the composed model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import save
from tqdm.auto import tqdm

from mquant.fileio import write_bytes_atomic, write_json_atomic
from mquant.models.vlm import load_pretrained
from mquant.zoo.real.build import TRAINED, default_dir, real_model
from mquant.zoo.train import answer_loss, cosine_schedule, optimizer_step, quick_eval, training_batches


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, eval_every: int, eval_n: int,
          device: str = "cpu", bf16: bool = False) -> dict:
    torch.manual_seed(seed)
    # The composed model with its seeded projector, built beside the shipped one.
    vlm = load_pretrained(real_model(default_dir().with_name(default_dir().name + "-untrained"), trained=None))
    model = vlm.model.to(device)
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)
    params = list(projector.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps))
    stream = training_batches(seed, batch_size)
    log = {"seed": seed, "device": str(device), "bf16": bf16, "steps": steps, "batch_size": batch_size, "lr": lr,
           "loss": [], "eval": []}
    start = time.perf_counter()
    model.eval()  # no dropout anywhere; gradients still flow to the projector
    bar = tqdm(range(steps), desc="projector")
    running = None
    # bf16 autocast: on AMD EPYC (AVX-512 BF16) bf16 matmuls at these shapes ran 2.7x faster than
    # fp32; the projector's parameters and the optimizer stay fp32.
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
    for step in bar:
        with autocast:
            loss = answer_loss(vlm, next(stream))
        optimizer_step(opt, sched, params, loss)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
        if step % 10 == 0:
            log["loss"].append([step, round(running, 4)])
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            log["eval"].append([step + 1, quick_eval(vlm, eval_n)])
            model.eval()
            tqdm.write(f"step {step + 1}: {log['eval'][-1][1]}")
    log["eval"].append([steps, quick_eval(vlm, eval_n)])
    log["train_seconds"] = round(time.perf_counter() - start, 1)
    tqdm.write(f"final (calib split): {log['eval'][-1][1]}")
    state = {k: v.detach().to("cpu").contiguous() for k, v in projector.state_dict().items()}
    write_bytes_atomic(out, save(state))
    write_json_atomic(out.with_name("train_log.json"), log)
    return log


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mquant.zoo.real.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=TRAINED, help=f"projector parameters (default {TRAINED})")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward and backward passes")
    p.add_argument("--eval-every", type=int, default=200, help="calib-split check every N steps (0: only at the end)")
    p.add_argument("--eval-n", type=int, default=32, help="calib questions per task in each check")
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    train(args.out, args.steps, args.batch_size, args.lr, args.seed, args.eval_every, args.eval_n, args.device, args.bf16)


if __name__ == "__main__":
    main()
