"""Score a model on tasks by greedy generation, refusing to evaluate on calibration data."""

from __future__ import annotations

from tqdm.auto import tqdm

from mquant.errors import MquantError
from mquant.eval.registry import DEFAULT_LIMIT, get_task
from mquant.models.vlm import VLM


def evaluate(vlm: VLM, task_names: list[str], limit: int | None = None, progress: bool = True) -> dict:
    calib = set((vlm.quant_info or {}).get("report", {}).get("calibration", {}).get("fingerprints", []))
    results = {}
    for name in task_names:
        task = get_task(name)
        samples = task.make_samples(limit or DEFAULT_LIMIT)
        overlap = [s.id for s in samples if s.fingerprint() in calib]
        if overlap:
            raise MquantError(f"task {name}: {len(overlap)} evaluation samples were used for calibration "
                              f"(e.g. {overlap[0]}); refusing to report a contaminated score")
        total = 0.0
        for sample in tqdm(samples, desc=f"eval {name}", disable=not progress, leave=False):
            prediction = vlm.generate([sample], task.max_new_tokens)[0]
            total += task.score(prediction, sample.answers)
        results[name] = {"metric": task.metric, "score": total / len(samples), "n": len(samples)}
    average = sum(r["score"] for r in results.values()) / len(results)
    recipe = (vlm.quant_info or {}).get("recipe", {}).get("name")
    return {"model": vlm.path, "recipe": recipe, "tasks": results, "average": average}
