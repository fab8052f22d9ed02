"""`mquant verify`: apply function-preserving transforms without quantizing and measure how far the
model moved, after every step and at the end (ALGORITHMS.md §3.8: relative logit error <= 1e-4 in
fp32 and identical greedy generations). Users run it on their checkpoint before spending hours on
GPTQ; the tests run it on the tiny models.
"""

from __future__ import annotations

import torch
from pydantic import ValidationError

from mquant.errors import MquantError
from mquant.models.vlm import VLM, load_pretrained
from mquant.samples import Sample
from mquant.transforms.apply import STEPS, apply_step, enabled_steps, new_info

TOLERANCE = 1e-4  # max relative logit difference that still counts as the same function


def parse_transforms(text: str):
    """'ln2rn,rotate,...' -> a TransformScheme (unknown names and bad combinations are errors)."""
    from mquant.recipe import TransformScheme

    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in STEPS]
    if not names or unknown:
        raise MquantError(f"unknown transform '{(unknown or [''])[0]}'; available: {', '.join(STEPS)}")
    try:
        return TransformScheme(**{n: True for n in names})
    except ValidationError as exc:
        raise MquantError(f"--transforms {text}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


@torch.no_grad()
def _distance(reference: list[torch.Tensor], vlm: VLM, samples: list[Sample], ref_text: list[str],
              max_new_tokens: int) -> dict:
    abs_diff = rel_diff = 0.0
    for ref, sample in zip(reference, samples):
        diff = (vlm.logits(sample, with_answer=True) - ref).abs().max().item()
        abs_diff = max(abs_diff, diff)
        rel_diff = max(rel_diff, diff / ref.abs().max().item())
    generated = vlm.generate(samples, max_new_tokens)
    return {"max_abs_logit_diff": abs_diff, "max_rel_logit_diff": rel_diff,
            "generation_identical": generated == ref_text, "preserved": rel_diff <= TOLERANCE and generated == ref_text}


def verify_transforms(model_path: str, transforms: str, samples: list[Sample], max_new_tokens: int = 8,
                      progress: bool = True) -> dict:
    """Apply `transforms` step by step to a copy of the model at `model_path`; compare each stage's
    logits (teacher-forced answers included) and greedy generations with the original's."""
    from tqdm.auto import tqdm

    scheme = parse_transforms(transforms)
    reference = load_pretrained(model_path)
    ref_logits = [reference.logits(s, with_answer=True) for s in samples]
    ref_text = reference.generate(samples, max_new_tokens)
    del reference
    vlm = load_pretrained(model_path)
    batches = [vlm.encode([s]) for s in samples]
    info = new_info()
    steps = []
    for name in tqdm(enabled_steps(scheme), desc="verify", disable=not progress):
        apply_step(vlm, name, scheme, info, batches)
        steps.append({"transform": name, **_distance(ref_logits, vlm, samples, ref_text, max_new_tokens)})
    final = steps[-1]
    return {
        "transforms": [s["transform"] for s in steps],
        "max_abs_logit_diff": final["max_abs_logit_diff"],
        "max_rel_logit_diff": final["max_rel_logit_diff"],
        "generation_identical": final["generation_identical"],
        "preserved": all(s["preserved"] for s in steps),
        "tolerance": TOLERANCE,
        "steps": steps,
        "num_samples": len(samples),
        "generations": ref_text,
        "details": info,
    }
