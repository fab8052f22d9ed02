"""`mquant bench latency`: prefill and decode latency of real integer execution, side by side.

A Qwen2-VL-shaped model (dimensions of a preset, `layers` decoder layers and `vision_layers` vision
blocks, random weights: values do not change the time) is quantized once at W4A8 (RTN weights,
online Hadamard, RMS, static activations with per-modality scales, AIFS). From that one model the
integer backend runs every activation variant on the same weights and code path:

    fp32, bf16                the floating-point model (what people run without mquant)
    w4a8-dynamic              per-token dynamic int8 activations (a reduction per row per call)
    w4a8-static               one static scale per linear
    w4a8-msq                  two static scales, rows looked up (the cost of visual and text
                              interleaved without AIFS; forced, the prompt's image is one block)
    w4a8-msq-aifs             two static scales on the two contiguous blocks AIFS makes (here the
                              single image's tokens are one block already: no reordering, and
                              attention keeps its causal path; an interleaved prompt would be
                              reordered and pay the permuted dense mask)

For each: median over repeats, in one process, of the time inside the decoder stack's linear
layers (online Hadamard excluded and reported apart; for W4A8, the norms that compute their
readers' codes in the same pass are counted in full as linear time), the decoder-stack prefill, the vision-encoder
prefill, and one decode step with a KV cache. The lower bound ("gemm-only") is the MSQ+AIFS linear
time with the activation quantization taken out (each layer replays the int8 input it quantized
before, inside the same prefill); act-quant overhead is the MSQ+AIFS linear time over it. The
integer GEMMs run back to back on their own are reported too (`gemm_isolated_ms`).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mquant.errors import MquantError
from mquant.models.tokenizer import build_tokenizer, token_ids
from mquant.models.vlm import VLM

VARIANTS = ("fp32", "bf16", "w4a8-dynamic", "w4a8-static", "w4a8-msq", "w4a8-msq-aifs")
PATH_OF = {"w4a8-dynamic": "dynamic", "w4a8-static": "static", "w4a8-msq": "rows", "w4a8-msq-aifs": "auto"}


@dataclass(frozen=True)
class Preset:
    """Model dimensions and prompt shape. Vision and decoder widths are those of the named model."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    mrope_section: tuple[int, int, int]
    vision_dim: int
    vision_heads: int
    visual_tokens: int = 1024
    text_tokens: int = 64
    layers: int = 2
    vision_layers: int = 2
    repeats: int = 5


PRESETS = {
    "qwen2-vl-2b": Preset(1536, 8960, 12, 2, (16, 24, 24), 1280, 16),
    "qwen2-vl-7b": Preset(3584, 18944, 28, 4, (16, 24, 24), 1280, 16, repeats=3),
    "ci-small": Preset(256, 704, 4, 2, (8, 12, 12), 128, 2, visual_tokens=64, text_tokens=16),
}


# -- the model ---------------------------------------------------------------------------------
def build_model(p: Preset, seed: int = 0) -> VLM:
    """A randomly initialised Qwen2-VL of the preset's shape, with the project's offline tokenizer."""
    from mquant.models.qwen2_vl import FAMILY as family, small_config

    tokenizer = build_tokenizer(family.chat)
    config = small_config(token_ids(tokenizer), hidden=p.hidden, intermediate=p.intermediate, layers=p.layers,
                          heads=p.heads, kv_heads=p.kv_heads, mrope_section=list(p.mrope_section),
                          vision=dict(depth=p.vision_layers, embed_dim=p.vision_dim, num_heads=p.vision_heads,
                                      mlp_ratio=4))
    torch.manual_seed(seed)
    model = family.model_class(config).eval()
    return VLM(model, tokenizer, family.images.make_processor(56, 112), family, f"random:{p.hidden}")


def latency_recipe():
    """W4A8 as MQuant runs it; RTN weights, since weight values do not change the time."""
    from mquant.numerics.args import QuantArgs
    from mquant.recipe import PartScheme, Recipe, TransformScheme, WeightScheme

    weights = WeightScheme(num_bits=4, algorithm="rtn", clip_search=False)
    acts = QuantArgs(num_bits=8, strategy="tensor")
    part = PartScheme(weights=weights, input_activations=acts)
    return Recipe(name="latency-w4a8", description="latency benchmark", vision=part, projector=part,
                  language=PartScheme(weights=weights, input_activations=acts, modality_scales=True),
                  transforms=TransformScheme(online_hadamard=True, rms=True, aifs=True))


# -- inputs ------------------------------------------------------------------------------------
@dataclass
class Inputs:
    embeds: torch.Tensor  # [1, L, hidden]
    positions: torch.Tensor  # [3, 1, L]
    visual: torch.Tensor  # [1, L] bool: the image sits after the first third of the text
    pixels: torch.Tensor  # [4·visual_tokens, 1176]
    grid: torch.Tensor  # [[1, h, w]]


def make_inputs(p: Preset, device: torch.device, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    length = p.visual_tokens + p.text_tokens
    prefix = p.text_tokens // 3
    visual = torch.zeros(1, length, dtype=torch.bool)
    visual[0, prefix:prefix + p.visual_tokens] = True
    # Tokens on a th x tw grid (as square as the count allows), 2x2 patches per token.
    th = max(d for d in range(1, math.isqrt(p.visual_tokens) + 1) if p.visual_tokens % d == 0)
    h, w = 2 * th, 2 * (p.visual_tokens // th)
    return Inputs(torch.randn(1, length, p.hidden, generator=g).to(device),
                  torch.arange(length).expand(3, 1, length).to(device), visual.to(device),
                  torch.randn(4 * p.visual_tokens, 3 * 2 * 14 * 14, generator=g).to(device),
                  torch.tensor([[1, h, w]], device=device))


# -- timing ------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, repeats: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):  # compilation, kernel choice, autotuning
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@contextmanager
def timed_modules(modules: list[nn.Module], device: torch.device):
    """Accumulate the wall time spent inside `modules` (a list that the caller reads back)."""
    total = [0.0]
    starts: dict[int, float] = {}

    def before(module, _args):
        _sync(device)
        starts[id(module)] = time.perf_counter()

    def after(module, _args, _out):
        _sync(device)
        total[0] += time.perf_counter() - starts.pop(id(module))

    handles = [h for m in modules for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        yield total
    finally:
        for h in handles:
            h.remove()


class Runner:
    """Runs one model's decoder stack, vision encoder and decode step on fixed inputs."""

    def __init__(self, vlm: VLM, inputs: Inputs, dtype: torch.dtype) -> None:
        from mquant.modality.msq import modality_state

        self.vlm, self.inputs, self.dtype = vlm, inputs, dtype
        self.lm = vlm.model.get_submodule(vlm.family.language_model)
        self.visual = vlm.model.model.visual
        self.state = modality_state(vlm.model, vlm.image_token_id)
        self.embeds = inputs.embeds.to(dtype)
        self.pixels = inputs.pixels.to(dtype)

    @torch.no_grad()
    def prefill(self, use_cache: bool = False):
        self.state.visual = self.inputs.visual
        return self.lm(inputs_embeds=self.embeds, position_ids=self.inputs.positions, use_cache=use_cache)

    @torch.no_grad()
    def vision(self):
        return self.visual(self.pixels, grid_thw=self.inputs.grid)

    def decode_step(self):
        """One text token after the prefill, on a KV cache cropped back after each step."""
        out = self.prefill(use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        length = self.embeds.shape[1]
        token = self.embeds[:, -1:]
        position = torch.full((3, 1, 1), length, device=token.device)

        @torch.no_grad()
        def step():
            self.state.visual = torch.zeros(1, 1, dtype=torch.bool, device=token.device)
            self.lm(inputs_embeds=token, position_ids=position, cache=cache, use_cache=True)
            cache.crop(-1)  # drop the token just appended

        return step

    def lm_linears(self) -> list[nn.Module]:
        from mquant.runtime.int_linear import IntLinear

        kinds = (nn.Linear, IntLinear)
        return [m for m in self.lm.layers.modules() if isinstance(m, kinds)]

    def timed_layers(self) -> list[nn.Module]:
        """What "linear layers" times: the linears, and the norms that quantize their inputs
        (`QuantizingNorm`: the whole norm is charged to the integer path, not only its quantization)."""
        from mquant.runtime.fused_norm import QuantizingNorm

        return self.lm_linears() + [m for m in self.lm.layers.modules() if isinstance(m, QuantizingNorm)]

    def int_linears(self) -> list[nn.Module]:
        """The decoder stack's linears that run an integer product."""
        return [m for m in self.lm_linears() if getattr(m, "gemm", None) is not None]

    def transforms(self) -> list[nn.Module]:
        return [m.input_transform for m in self.lm_linears() if getattr(m, "input_transform", None) is not None]


def linear_ms(runner: Runner, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median time per prefill inside the decoder stack's linears, online Hadamard excluded, and
    inside the online Hadamards."""
    with timed_modules(runner.timed_layers(), device) as linears, timed_modules(runner.transforms(), device) as had:
        median_ms(runner.prefill, 1, device, warmup=2)  # compile/choose kernels outside the sums
        linears[0] = had[0] = 0.0
        runs = []
        for _ in range(repeats):
            before_l, before_h = linears[0], had[0]
            runner.prefill()
            runs.append(((linears[0] - before_l) * 1e3, (had[0] - before_h) * 1e3))
    return statistics.median(r[0] - r[1] for r in runs), statistics.median(r[1] for r in runs)


def measure(runner: Runner, repeats: int, device: torch.device) -> dict:
    """Times (ms) of one variant: linears (Hadamard excluded), Hadamard, stack prefill, vision, decode."""
    linears, hadamard = linear_ms(runner, repeats, device)
    return {
        "linears": round(linears, 3),
        "hadamard": round(hadamard, 3),
        "lm_prefill": round(median_ms(runner.prefill, repeats, device), 3),
        "vision_prefill": round(median_ms(runner.vision, repeats, device), 3),
        "decode": round(median_ms(runner.decode_step(), max(repeats, 10), device), 3),
    }


def gemm_in_model_ms(runner: Runner, repeats: int, device: torch.device) -> float:
    """The decoder stack's linears with their activation quantization taken out: each layer replays
    the int8 input it quantized in a first prefill, so the GEMMs run in the model's own sequence
    (same caches, same neighbours) — the lower bound the act-quant overhead is measured against."""
    layers = runner.int_linears()
    for m in layers:
        m.record = True
    runner.prefill()
    for m in layers:
        m.record, m.replay = False, m.recorded
    try:
        return linear_ms(runner, repeats, device)[0]
    finally:
        for m in layers:
            m.replay = m.recorded = None


def gemm_isolated_ms(runner: Runner, repeats: int, device: torch.device) -> float:
    """The decoder stack's integer GEMMs alone, back to back, on int8 inputs of the prefill's shapes."""
    layers = runner.int_linears()
    rows = runner.embeds.shape[1]
    g = torch.Generator().manual_seed(1)
    codes = [torch.randint(-127, 128, (rows, m.gemm.in_features), generator=g, dtype=torch.int8).to(device)
             for m in layers]

    def run():
        for m, q in zip(layers, codes):
            m.gemm.scalar(q, 0.01, runner.dtype)

    return median_ms(run, repeats, device)


# -- the benchmark -----------------------------------------------------------------------------
def run_latency(preset: str | Preset, device: str = "cpu", repeats: int | None = None,
                variants: tuple[str, ...] = VARIANTS, progress: bool = True) -> dict:
    import mquant
    from mquant.eval.report import machine_description, utc_now
    from mquant.modality.aifs import disable_aifs, enable_aifs
    from mquant.runtime.backends import to_backend
    from mquant.runtime.int_linear import int_linears

    name = preset if isinstance(preset, str) else "custom"
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise MquantError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
        preset = PRESETS[preset]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise MquantError(f"unknown variants: {', '.join(sorted(unknown))} (choose from {', '.join(VARIANTS)})")
    repeats = repeats or preset.repeats
    dev = torch.device(device)
    backend = "triton" if dev.type == "cuda" else "cpu-int8"
    inputs = make_inputs(preset, dev)
    vlm = build_model(preset)
    fp_model = copy.deepcopy(vlm.model).to(dev)
    say = print if progress else (lambda *a, **k: None)
    times: dict[str, dict] = {}
    for variant, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if variant in variants:
            say(f"  {variant} ...", flush=True)
            times[variant] = measure(Runner(VLM(fp_model.to(dtype), *_rest(vlm)), inputs, dtype), repeats, dev)
    del fp_model
    t = time.perf_counter()
    mquant.quantize(vlm, latency_recipe(), "synthetic", num_samples=2, progress=False)
    quantize_s = time.perf_counter() - t
    vlm.model.to(dev)
    to_backend(vlm.model, backend, torch.bfloat16, family=vlm.family)
    runner = Runner(vlm, inputs, torch.bfloat16)
    for variant in (v for v in VARIANTS[2:] if v in variants):
        say(f"  {variant} ...", flush=True)
        for _, m in int_linears(vlm.model):
            m.path = PATH_OF[variant]
        if variant == "w4a8-msq-aifs":
            enable_aifs(vlm.model, vlm.family.language_model, vlm.image_token_id)
        else:
            disable_aifs(vlm.model, vlm.family.language_model)
        times[variant] = measure(runner, repeats, dev)
    # After the MSQ+AIFS variant (the last one): its layers and layout are the ones in place.
    gemm = round(gemm_in_model_ms(runner, repeats, dev), 3) if "w4a8-msq-aifs" in times else None
    isolated = round(gemm_isolated_ms(runner, repeats, dev), 3)
    return {
        "date": utc_now(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else machine_description(),
        "threads": torch.get_num_threads(),
        "backend": backend,
        "preset": name,
        "shape": asdict(preset) | {"repeats": repeats},
        "times_ms": times,
        "gemm_only_ms": gemm,
        "gemm_isolated_ms": isolated,
        "ratios": ratios(times, gemm),
        "quantize_s": round(quantize_s, 1),
        "torch_version": torch.__version__,
    }


def _rest(vlm: VLM) -> tuple:
    return vlm.tokenizer, vlm.image_processor, vlm.family, vlm.path


def ratios(times: dict, gemm_ms: float | None) -> dict:
    """Speed-ups of MSQ+AIFS on the decoder stack's linear layers (and on the whole stack prefill)."""
    aifs = times.get("w4a8-msq-aifs")
    if aifs is None:
        return {}

    def over(variant: str, key: str = "linears") -> float | None:
        return round(times[variant][key] / aifs[key], 3) if variant in times else None

    return {
        "static_aifs_vs_dynamic": over("w4a8-dynamic"),
        "static_aifs_vs_bf16": over("bf16"),
        "static_aifs_vs_msq_no_aifs": over("w4a8-msq"),
        "act_quant_overhead": round(aifs["linears"] / gemm_ms - 1, 3) if gemm_ms else None,
        "prefill_vs_dynamic": over("w4a8-dynamic", "lm_prefill"),
        "prefill_vs_bf16": over("bf16", "lm_prefill"),
        "ttft_vs_bf16": round((times["bf16"]["lm_prefill"] + times["bf16"]["vision_prefill"])
                              / (aifs["lm_prefill"] + aifs["vision_prefill"]), 3) if "bf16" in times else None,
        "decode_vs_bf16": over("bf16", "decode"),
    }


# -- reporting ---------------------------------------------------------------------------------
# The project's targets per backend (CPU: issue [2/7], against a compute ceiling of 2.0x bf16 on
# AVX-512 VNNI without AMX; GPU: the first runtime issue's).
TARGETS = {
    "cpu-int8": {"static_aifs_vs_dynamic": (">=", 1.2), "static_aifs_vs_bf16": (">=", 1.85),
                 "static_aifs_vs_msq_no_aifs": (">=", 1.05), "act_quant_overhead": ("<=", 0.10),
                 "prefill_vs_bf16": (">=", 1.6), "decode_vs_bf16": (">=", 1.0)},
    "triton": {"static_aifs_vs_dynamic": (">=", 1.25), "static_aifs_vs_bf16": (">=", 1.5),
               "static_aifs_vs_msq_no_aifs": (">=", 1.05), "act_quant_overhead": ("<=", 0.25)},
}


def markdown(result: dict) -> str:
    s = result["shape"]
    lines = [f"Latency, preset `{result['preset']}` ({s['layers']} decoder layers of {s['hidden']}/{s['intermediate']}, "
             f"{s['vision_layers']} vision blocks of {s['vision_dim']}; {s['visual_tokens']} visual + "
             f"{s['text_tokens']} text tokens), {result['device']}, {result['threads']} threads, "
             f"backend {result['backend']}, median of {s['repeats']} runs (ms):", "",
             "| variant | linear layers | online Hadamard | decoder prefill | vision prefill | decode (1 token) |",
             "|---|---|---|---|---|---|"]
    for variant, t in result["times_ms"].items():
        lines.append(f"| {variant} | {t['linears']:.1f} | {t['hadamard']:.1f} | {t['lm_prefill']:.1f} | "
                     f"{t['vision_prefill']:.1f} | {t['decode']:.2f} |")
    if result["gemm_only_ms"] is not None:
        lines.append(f"| MSQ+AIFS linears without act-quant (GEMM-only limit) | {result['gemm_only_ms']:.1f} | | | | |")
    lines.append(f"| int8 GEMMs alone, back to back | {result['gemm_isolated_ms']:.1f} | | | | |")
    lines += ["", "| ratio | measured | target |", "|---|---|---|"]
    for key, value in result["ratios"].items():
        if value is None:
            continue
        target = TARGETS.get(result["backend"], {}).get(key)
        mark = ""
        if target:
            ok = value >= target[1] if target[0] == ">=" else value <= target[1]
            mark = f"{target[0]} {target[1]} ({'met' if ok else 'missed'})"
        lines.append(f"| {key} | {value:.3f} | {mark} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(result["times_ms"])
    keys = [("linears", "linear layers"), ("lm_prefill", "decoder prefill"), ("vision_prefill", "vision prefill")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        axes[0].bar([x + i * width for x in range(len(variants))], [result["times_ms"][v][key] for v in variants],
                    width, label=label)
    if result["gemm_only_ms"] is not None:
        axes[0].axhline(result["gemm_only_ms"], color="k", ls="--", lw=1, label="GEMM-only (no act-quant)")
    axes[0].set_xticks([x + width for x in range(len(variants))], variants, rotation=20)
    axes[0].set_ylabel("ms (median)")
    axes[0].legend(fontsize=8)
    axes[1].bar(range(len(variants)), [result["times_ms"][v]["decode"] for v in variants], color="tab:gray")
    axes[1].set_xticks(range(len(variants)), variants, rotation=60, fontsize=7)
    axes[1].set_title("decode, 1 token (ms)", fontsize=9)
    fig.suptitle(f"mquant latency, preset {result['preset']} — {result['device'][:60]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
