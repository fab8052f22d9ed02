"""`mquant bench peers`: one decoder layer's linear stack on every CPU path, side by side in one run.

The same random weights (4-bit codes with per-channel scales) and inputs run on:

    fp32, bf16               torch's float linears (what people run without quantizing)
    mquant-static            W4A8, one static activation scale (the kernel this machine chose)
    mquant-msq-aifs          W4A8, two static scales on AIFS's two row blocks (prefill; decode rows are text)
    mquant-dynamic           W4A8, per-token dynamic activation scales
    torchao-int8-dynamic     torchao's Int8DynamicActivationInt8WeightConfig (eager)
    torchao-da8w4            torchao's Int8DynamicActivationIntxWeightConfig (int4 weights), where it runs
    openvino-int8            OpenVINO: FakeQuantize on the input, int8 weights, compiled for the CPU

A stack is the seven linears of one decoder layer (q, k, v, o, gate, up, down) of a model's shape,
on four inputs as in the model (q/k/v read one, gate/up another; mquant quantizes each input once,
as its runtime does); its time is the median of whole-stack passes (at decode sizes the weights
then come from memory, not cache, as in a real decode step). The norms before q/k/v and gate/up
are not part of it (mquant's runtime computes those codes inside the norm: `mquant bench latency`
times whole layers). Ratios are bf16's time over a path's.
Each mquant row records the kernel that ran each linear; OpenVINO's its executed primitive.
Peers that are not installed (`pip install torchao openvino`) or do not run here are skipped with
the reason in the JSON.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mquant.bench.latency import median_ms

PATHS = ("fp32", "bf16", "mquant-static", "mquant-msq-aifs", "mquant-dynamic", "torchao-int8-dynamic",
         "torchao-da8w4", "openvino-int8")


@dataclass(frozen=True)
class Stack:
    name: str
    linears: tuple[tuple[str, int, int, str], ...]  # (name, in, out, the input it reads)


def decoder_stack(name: str, hidden: int, intermediate: int, heads: int, kv_heads: int) -> Stack:
    kv = hidden // heads * kv_heads
    return Stack(name, (("q_proj", hidden, hidden, "attn"), ("k_proj", hidden, kv, "attn"),
                        ("v_proj", hidden, kv, "attn"), ("o_proj", hidden, hidden, "attn_out"),
                        ("gate_proj", hidden, intermediate, "mlp"), ("up_proj", hidden, intermediate, "mlp"),
                        ("down_proj", intermediate, hidden, "mlp_act")))


STACKS = {
    "qwen2-vl-2b": decoder_stack("qwen2-vl-2b", 1536, 8960, 12, 2),
    "qwen2-vl-7b": decoder_stack("qwen2-vl-7b", 3584, 18944, 28, 4),
    "smollm2-135m": decoder_stack("smollm2-135m", 576, 1536, 9, 3),  # the real-weights model's decoder
    "embedded": decoder_stack("embedded", 192, 448, 6, 2),  # the embedded Qwen2-VL-class model
}
ROWS = {"prefill": 1088, "decode-16": 16, "decode-1": 1}  # prefill: 1024 visual + 64 text tokens
VISUAL = (21, 21 + 1024)  # the visual block of the prefill rows (text before and after it)


# -- the paths -----------------------------------------------------------------------------------
class Layer:
    """One linear's random W4 weights and its input (shared with the layers reading the same one)."""

    def __init__(self, n: int, x: torch.Tensor, source: str, g: torch.Generator) -> None:
        k = x.shape[1]
        self.codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
        self.w_scale = torch.rand(n, 1, generator=g) * 0.01 + 1e-3
        self.weight = self.codes.float() * self.w_scale
        self.x, self.source = x, source
        self.x_scale = float(x.abs().max() / 127)


def stack_layers(stack: Stack, rows: int, seed: int = 0) -> list[Layer]:
    g = torch.Generator().manual_seed(seed)
    inputs: dict[str, torch.Tensor] = {}
    for _, k, _, source in stack.linears:
        inputs.setdefault(source, torch.randn(rows, k, generator=g))
    return [Layer(n, inputs[source], source, g) for _, _, n, source in stack.linears]


def _mquant(layers: list[Layer], variant: str) -> tuple[Callable, list[str]]:
    from mquant.runtime import int8_ops

    gemms = [int8_ops.Int8Gemm(layer.codes, layer.w_scale, None, None) for layer in layers]
    xs = {layer.source: layer.x.to(torch.bfloat16) for layer in layers}
    scales = {layer.source: (layer.x_scale, torch.tensor(layer.x_scale)) for layer in layers}
    rows = layers[0].x.shape[0]
    start, stop = VISUAL if rows > VISUAL[1] else (0, 0)

    def quantize(source: str, unsigned: bool):  # as IntLinear quantizes its input
        x, (s, s_t) = xs[source], scales[source]
        if variant == "dynamic":
            return int8_ops.dynamic_codes(x, 127, unsigned)
        if variant == "msq-aifs" and stop > start:
            return int8_ops.two_block_codes(x, s * 0.5, s, s_t * 0.5, s_t, start, stop, -128, 127, unsigned)
        return int8_ops.static_codes(x, s, s_t, -128, 127, unsigned)

    def run():
        codes: dict[tuple[str, bool], object] = {}  # each input quantized once per encoding, as the runtime does
        for gemm, layer in zip(gemms, layers):
            key = (layer.source, gemm.unsigned_input(rows, torch.bfloat16))
            if key not in codes:
                codes[key] = quantize(*key)
            if variant == "dynamic":
                gemm.rows(*codes[key], torch.bfloat16)
            elif variant == "msq-aifs" and stop > start:
                gemm.two_blocks(codes[key], layer.x_scale * 0.5, layer.x_scale, start, stop, torch.bfloat16)
            else:
                gemm.scalar(codes[key], layer.x_scale, torch.bfloat16)

    run()  # the kernel choices are made (or read) here
    return run, [gemm.kernel_for(rows, torch.bfloat16) for gemm in gemms]


def _float(layers: list[Layer], dtype: torch.dtype) -> tuple[Callable, list[str]]:
    pairs = [(layer.x.to(dtype), layer.weight.to(dtype)) for layer in layers]

    def run():
        for x, w in pairs:
            F.linear(x, w)

    return run, [str(dtype).removeprefix("torch.")] * len(layers)


def _torchao(layers: list[Layer], config_name: str) -> tuple[Callable, list[str]]:
    import torchao.quantization as tq

    if config_name == "int8-dynamic":
        config = tq.Int8DynamicActivationInt8WeightConfig()
    else:
        config = tq.Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=tq.PerAxis(0))
    modules = []
    for layer in layers:
        linear = torch.nn.Linear(layer.x.shape[1], layer.codes.shape[0], bias=False, dtype=torch.bfloat16)
        linear.weight.data.copy_(layer.weight)
        model = torch.nn.Sequential(linear)
        tq.quantize_(model, config)
        modules.append((model, layer.x.to(torch.bfloat16)))

    @torch.no_grad()
    def run():
        for model, x in modules:
            model(x)

    run()
    return run, [type(modules[0][0][0].weight).__name__] * len(layers)


def _openvino(layers: list[Layer]) -> tuple[Callable, list[str]]:
    """One OpenVINO model per input: its FakeQuantize feeds every linear reading it (q/k/v, gate/up)."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    core = ov.Core()
    requests, primitives = [], []
    for source in dict.fromkeys(layer.source for layer in layers):
        readers = [layer for layer in layers if layer.source == source]
        first = readers[0]
        x = ops.parameter(list(first.x.shape), ov.Type.f32, name="x")
        lo, hi = ops.constant(np.float32(-128 * first.x_scale)), ops.constant(np.float32(127 * first.x_scale))
        quantized = ops.fake_quantize(x, lo, hi, lo, hi, 256)
        outputs = [ops.matmul(quantized, ops.multiply(ops.convert(ops.constant(r.codes.numpy()), ov.Type.f32),
                                                      ops.constant(r.w_scale.numpy().astype(np.float32))), False, True)
                   for r in readers]
        compiled_model = core.compile_model(ov.Model(outputs, [x], source), "CPU", {
            "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"})
        request = compiled_model.create_infer_request()
        request.set_input_tensor(ov.Tensor(first.x.numpy()))
        requests.append(request)
        primitives += [op.get_rt_info()["primitiveType"].astype(str)
                       for op in compiled_model.get_runtime_model().get_ordered_ops()
                       if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"]

    def run():
        for request in requests:
            request.infer()

    return run, primitives or ["?"]


def path_runner(path: str, layers: list[Layer]) -> tuple[Callable, list[str]]:
    if path in ("fp32", "bf16"):
        return _float(layers, torch.float32 if path == "fp32" else torch.bfloat16)
    if path.startswith("mquant-"):
        return _mquant(layers, path.removeprefix("mquant-"))
    if path.startswith("torchao-"):
        return _torchao(layers, path.removeprefix("torchao-"))
    return _openvino(layers)


# -- the benchmark -------------------------------------------------------------------------------
def run_peers(stacks: list[str] | None = None, rows: list[str] | None = None, paths: tuple[str, ...] = PATHS,
              repeats: int = 5, progress: bool = True) -> dict:
    from mquant.eval.report import machine_description, utc_now
    from mquant.runtime.cpu_features import cpu_features

    say = print if progress else (lambda *a, **k: None)
    results, skipped = [], {}
    for stack_name in stacks or list(STACKS):
        stack = STACKS[stack_name]
        for rows_name in rows or list(ROWS):
            layers = stack_layers(stack, ROWS[rows_name])
            entry = {"stack": stack_name, "rows": rows_name, "m": ROWS[rows_name], "ms": {}, "kernels": {}}
            for path in paths:
                try:
                    run, kernels = path_runner(path, layers)
                except Exception as exc:  # a peer that is not installed or does not run on this CPU
                    skipped[path] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    continue
                entry["ms"][path] = round(median_ms(run, repeats, torch.device("cpu")), 4)
                entry["kernels"][path] = sorted(set(kernels))
                say(f"  {stack_name} {rows_name} {path}: {entry['ms'][path]:.3f} ms ({', '.join(entry['kernels'][path])})",
                    flush=True)
            bf16 = entry["ms"].get("bf16")
            entry["vs_bf16"] = {p: round(bf16 / t, 3) for p, t in entry["ms"].items()} if bf16 else {}
            results.append(entry)
    return {"date": utc_now(), "machine": machine_description(), "cpu": cpu_features().describe(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "peers": _peer_versions(),
            "repeats": repeats, "results": results, "skipped": skipped,
            "geomean_vs_bf16": _geomean(results)}


def _peer_versions() -> dict:
    versions = {}
    for name in ("torchao", "openvino"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # not installed: its rows are skipped
            versions[name] = None
    return versions


def _geomean(results: list[dict]) -> dict:
    """Per row kind, the geometric mean over stacks of each path's speed-up over bf16."""
    out = {}
    for rows_name in dict.fromkeys(r["rows"] for r in results):
        per_path: dict[str, list[float]] = {}
        for r in results:
            if r["rows"] == rows_name:
                for path, ratio in r["vs_bf16"].items():
                    per_path.setdefault(path, []).append(ratio)
        out[rows_name] = {p: round(math.exp(statistics.fmean(math.log(v) for v in vs)), 3) for p, vs in per_path.items()}
    return out


def markdown(result: dict) -> str:
    paths = [p for p in PATHS if any(p in r["ms"] for r in result["results"])]
    lines = [f"Linear stacks (one decoder layer's q, k, v, o, gate, up, down), {result['cpu']}, "
             f"{result['threads']} threads, torch {result['torch']}, "
             + ", ".join(f"{k} {v}" for k, v in result["peers"].items() if v) + f"; median of {result['repeats']} "
             "passes, ms (speed-up over bf16 in parentheses). Run on " + result["date"] + ".", "",
             "| stack | rows | " + " | ".join(paths) + " |", "|---|---|" + "---|" * len(paths)]
    for r in result["results"]:
        cells = [f"{r['ms'][p]:.2f} ({r['vs_bf16'][p]:.2f}×)" if p in r["ms"] else "—" for p in paths]
        lines.append(f"| {r['stack']} | {r['rows']} (M={r['m']}) | " + " | ".join(cells) + " |")
    lines += ["", "Geometric mean over stacks of the speed-up over bf16:", "",
              "| rows | " + " | ".join(paths) + " |", "|---|" + "---|" * len(paths)]
    for rows_name, ratios in result["geomean_vs_bf16"].items():
        lines.append(f"| {rows_name} | " + " | ".join(f"{ratios[p]:.2f}×" if p in ratios else "—" for p in paths) + " |")
    lines += ["", "Kernels (per stack and rows: what ran the seven linears):", "",
              "| stack | rows | " + " | ".join(p for p in paths if p.startswith(("mquant", "openvino"))) + " |",
              "|---|---|" + "---|" * sum(p.startswith(("mquant", "openvino")) for p in paths)]
    for r in result["results"]:
        cells = [", ".join(r["kernels"].get(p, ["—"])) for p in paths if p.startswith(("mquant", "openvino"))]
        lines.append(f"| {r['stack']} | {r['rows']} | " + " | ".join(cells) + " |")
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{p} ({why})" for p, why in result["skipped"].items())]
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [p for p in PATHS if p != "bf16" and any(p in r["ms"] for r in result["results"])]
    labels = [f"{r['stack']}\n{r['rows']}" for r in result["results"]]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(labels)), 4.5))
    width = 0.8 / max(len(paths), 1)
    for i, p in enumerate(paths):
        ax.bar([x + i * width for x in range(len(labels))], [r["vs_bf16"].get(p, 0) for r in result["results"]],
               width, label=p)
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, fontsize=7)
    ax.set_ylabel("speed-up over bf16 (higher is faster)")
    ax.legend(fontsize=7, ncol=4)
    ax.set_title(f"CPU linear stacks — {result['cpu'][:70]}, {result['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
