"""`mquant demo`: the whole job on the embedded model, offline.

Evaluate the floating-point model on the built-in benchmark, quantize it with every preset recipe
(calibrating on the benchmark's calib split, disjoint from the test split), evaluate each quantized
model, and write `results.json`, `report.md` and `plot.png`.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from mquant.api import load, quantize, save
from mquant.eval.registry import BENCHMARK
from mquant.eval.report import machine_description, results_table, utc_now, write_plot
from mquant.eval.runner import evaluate
from mquant.fileio import atomic_directory, write_json_atomic, write_text_atomic
from mquant.recipe import PRESETS, load_recipe
from mquant.zoo import EMBEDDED_MODEL

FAST_LIMIT = 40  # test questions per task with --fast
NUM_CALIB = 64


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def run_demo(out: Path, fast: bool = False, recipes: list[str] | None = None, num_calib: int = NUM_CALIB,
             progress: bool = True) -> dict:
    out = Path(out)
    limit = FAST_LIMIT if fast else None
    names = recipes or list(PRESETS)
    recipes_ = [load_recipe(n) for n in names]
    start = time.perf_counter()
    fp = load(EMBEDDED_MODEL)
    fp_result = evaluate(fp, list(BENCHMARK), limit=limit, progress=progress)
    rows = [_row("fp32", "FP32", fp_result, _size_mb(EMBEDDED_MODEL))]
    for recipe in tqdm(recipes_, desc="recipes", disable=not progress):
        vlm = quantize(load(EMBEDDED_MODEL), recipe, "builtin", num_samples=num_calib, progress=False)
        ckpt = save(vlm, out / "checkpoints" / recipe.name)
        result = evaluate(vlm, list(BENCHMARK), limit=limit, progress=False)
        bits = "/".join(recipe.bits_label(p) for p in ("vision", "projector", "language"))
        rows.append(_row(recipe.name, bits, result, _size_mb(ckpt), recipe))
        tqdm.write(f"{recipe.name:<22} average {100 * result['average']:.1f}", file=None)
    results = {
        "rows": rows,
        "fp_average": fp_result["average"],
        "tasks": list(BENCHMARK),
        "n_per_task": {t: r["n"] for t, r in fp_result["tasks"].items()},
        "num_calib": num_calib,
        "fast": fast,
        "date": utc_now(),
        "machine": machine_description(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    table = results_table(rows, list(BENCHMARK))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "report.md", _report(results, table))
    write_plot(rows, list(BENCHMARK), fp_result["average"], out / "plot.png")
    results["table"] = table
    return results


def _row(name: str, bits: str, result: dict, size_mb: float, recipe=None) -> dict:
    language = recipe.language if recipe is not None else None
    w_bits = language.weights.num_bits if language and language.weights else (32 if recipe is None else 16)
    a_bits = language.input_activations.num_bits if language and language.input_activations else \
        (32 if recipe is None else 16)
    return {"recipe": name, "bits": bits, "w_bits": w_bits, "a_bits": a_bits,
            "tasks": {t: r["score"] for t, r in result["tasks"].items()},
            "details": {t: {k: v for k, v in r.items() if k not in ("score", "n", "metric")}
                        for t, r in result["tasks"].items()},
            "average": result["average"], "size_mb": round(size_mb, 3)}


def _report(results: dict, table: str) -> str:
    n = ", ".join(f"{t} {k}" for t, k in results["n_per_task"].items())
    return (
        "# mquant demo — embedded model\n\n"
        f"Ran {results['date']} on {results['machine']} in {results['seconds']:.0f} s "
        f"(`mquant demo{' --fast' if results['fast'] else ''}`).\n\n"
        f"Scores are % on the test split ({n} questions); calibration used {results['num_calib']} samples "
        "of the disjoint calib split. Bits are per part: vision / projector / language.\n\n"
        f"{table}\n\n![accuracy per recipe](plot.png)\n"
    )
