"""The CPU's int8 GEMM kernels, and which of them runs each shape on this machine.

Every kernel computes y = (q · Wᵀ) · x_scale · w_scale + bias from int8 weight codes W [out, in]
and activation codes q [rows, in]; the integer ones accumulate exactly in int32.

- `onednn-u8`: oneDNN's `qlinear_pointwise` fed *unsigned* codes (code + 128, zero point 128),
  scales and bias fused, output in the activation dtype. VNNI multiplies u8 × s8, so this is the
  brgemm/VNNI path on AVX-512 VNNI and AVX-VNNI CPUs without AMX, where signed activations fall to
  oneDNN's reference implementation (`matmul,ref_int8:any`: ~1000× slower, measured on AMD EPYC).
  The + 128 is part of the quantizer's single pass, so it costs nothing here.
- `onednn-s8`: the same with signed codes (AMX's path).
- `int_mm`: `torch._int_mm` (int32 out) and a compiled epilogue.
- `int8pack`, `int4pack`: torch's weight-only products (`_weight_int8pack_mm`,
  `_weight_int4pack_mm_for_cpu`) of the codes as floats (small integers: exact) and the int8 or
  packed int4 weights with their scales: they read 1 or 1/2 byte per weight where bf16 reads 2, so
  they are what decode steps (a few rows, bandwidth-bound) run.
- `vnni-w4`, `vnni-w8`: mquant's own AVX-512 VNNI kernels (`mquant.runtime.native`, built on
  first use): unsigned codes times the 4-bit weights read packed two per byte (or the 8-bit ones),
  epilogue fused, a few microseconds per call: decode steps and small layers.
- `float`, `float32`: the codes times the dequantized weights in the activation dtype, or in fp32
  (whose small-matrix path has the least fixed cost per call: tiny layers), prepared once chosen:
  what runs a shape where no integer kernel beats floating point here. Same codes, so the
  fake-quant model's results within float rounding; it is announced once.

Which kernel runs a shape is measured, not assumed: `KernelTable` times the candidates once per
(machine, in, out, row bucket) on a synthetic problem of that shape (a time budget per candidate),
after screening out, once per machine, any candidate orders of magnitude slower than the best on a
small problem (a single call of the reference path at a 2B model's shapes takes minutes). The
choices are kept in `$MQUANT_CACHE/cpu-kernels/<machine>.json`, keyed by the CPU model, its
instruction-set flags, the torch version and the thread count: a later load on the same machine
times nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mquant.fileio import cache_root, write_json_atomic
from mquant.runtime import native
from mquant.runtime.cpu_features import cpu_features
from mquant.runtime.compiling import compiled, scale_output

ZERO_POINT_U8 = 128  # unsigned codes are the signed ones plus this
SCREEN_SHAPE = (64, 512, 512)  # rows, in, out of the once-per-machine screening problem
SCREEN_FACTOR = 20.0  # a candidate this much slower than the best there is dropped on this machine
BUDGET_S = 0.05  # timed calls of one candidate stop after this long (at least one, at most REPEATS)
REPEATS = 3
TIMED_ROWS = 1024  # larger row buckets are timed at this many rows


def onednn_available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise") \
        and torch.backends.mkldnn.is_available()


# -- the kernels -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernel:
    """`prepare(codes [out, in] int8, w_scale [out] fp32, dtype)` builds the weight state once;
    `run(state, q, x_scale, bias, dtype)` multiplies codes q (uint8 = code + 128 when `unsigned`).
    `fits(in, out, four_bit)`: whether it takes weights of this shape (and code range);
    `fused_scales`: whether `run` also takes x_scale as one scale per row ([rows, 1]) or as AIFS's
    (inner, outer, start, stop), applied in its epilogue."""

    name: str
    unsigned: bool
    prepare: Callable
    run: Callable
    available: Callable[[], bool] = lambda: True
    fits: Callable[[int, int, bool], bool] = lambda k, n, four_bit: True
    fused_scales: bool = False


def _finish(y: torch.Tensor, x_scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """x_scale and bias on a weight-only kernel's output, in place (decode-sized outputs: cheap)."""
    if x_scale != 1.0:
        y.mul_(x_scale)
    return y if bias is None else y.add_(bias.to(y.dtype))


def _onednn_prepare(codes, w_scale, dtype):
    return (torch.ops.onednn.qlinear_prepack(codes.contiguous(), None), w_scale.contiguous(),
            torch.zeros(codes.shape[0], dtype=torch.int64))


def _onednn_run(zero_point: int):
    def run(state, q, x_scale, bias, dtype):
        packed, w_scale, zeros = state
        return torch.ops.onednn.qlinear_pointwise(q, x_scale, zero_point, packed, w_scale, zeros, bias, 1.0, 0, dtype,
                                                  "none", [], "")
    return run


def _int_mm_prepare(codes, w_scale, dtype):
    return codes.t().contiguous(), w_scale.reshape(1, -1)


def _int_mm_run(state, q, x_scale, bias, dtype):
    codes_kn, w_scale = state
    return compiled(scale_output)(torch._int_mm(q, codes_kn), w_scale * x_scale, bias, dtype)


def _float_prepare(codes, w_scale, dtype):
    """The dequantized weight, [in, out] in the activation dtype."""
    return (codes.float() * w_scale.reshape(-1, 1)).t().contiguous().to(dtype)


def _float_run(weight_kn, q, x_scale, bias, dtype):
    x = q.to(weight_kn.dtype)  # codes are small integers: exact in bf16
    if bias is None:
        y = torch.mm(x, weight_kn).mul_(x_scale)
    else:
        y = torch.addmm(bias.to(weight_kn.dtype), x, weight_kn, alpha=x_scale)
    return y.to(dtype)


def _float32_prepare(codes, w_scale, dtype):
    return _float_prepare(codes, w_scale, torch.float32)


# Weight-only kernels (the codes, as floats, times int8 or int4 weights with their scales): they read
# 1 or 1/2 byte per weight where bf16 reads 2, which is what a decode step's time is.
def _int8pack_prepare(codes, w_scale, dtype):
    return codes.contiguous(), w_scale.to(dtype)


def _int8pack_run(state, q, x_scale, bias, dtype):
    codes, w_scale = state
    return _finish(torch._weight_int8pack_mm(q.to(dtype), codes, w_scale), x_scale, bias)


def _int4_group(k: int) -> int:
    return next(g for g in (256, 128, 64, 32) if k % g == 0)


def _int4pack_prepare(codes, w_scale, dtype):
    """Codes + 8 as uint4, packed; per-channel scales repeated per group of the kernel, zero 0:
    the kernel's (q - 8) · scale + zero is the symmetric code times its scale."""
    n, k = codes.shape
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32) + 8, 1)
    group = _int4_group(k)
    scale = w_scale.to(dtype).reshape(1, n).expand(k // group, n)
    return packed, group, torch.stack([scale, torch.zeros_like(scale)], dim=-1).contiguous()


def _int4pack_run(state, q, x_scale, bias, dtype):
    packed, group, scales_and_zeros = state
    return _finish(torch._weight_int4pack_mm_for_cpu(q.to(dtype), packed, group, scales_and_zeros), x_scale, bias)


def _vnni_prepare(four_bit: bool):
    return lambda codes, w_scale, dtype: native.PackedWeight(codes, w_scale, four_bit)


def _vnni_run(weight, q, x_scale, bias, dtype):
    """`x_scale`: one number, one per row ([rows, 1] fp32), or AIFS's (inner, outer, start, stop):
    the epilogue applies each."""
    out = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    if isinstance(x_scale, torch.Tensor):
        y = weight(q, 1.0, bias, out, row_scale=x_scale.float().contiguous())
    elif isinstance(x_scale, tuple):
        inner, outer, start, stop = x_scale
        y = weight(q, outer, bias, out, inner=inner, start=start, stop=stop)
    else:
        y = weight(q, x_scale, bias, out)
    return y if out == dtype else y.to(dtype)


KERNELS: dict[str, Kernel] = {k.name: k for k in (
    Kernel("onednn-u8", True, _onednn_prepare, _onednn_run(ZERO_POINT_U8), onednn_available),
    Kernel("onednn-s8", False, _onednn_prepare, _onednn_run(0), onednn_available),
    Kernel("int_mm", False, _int_mm_prepare, _int_mm_run),
    Kernel("float", False, _float_prepare, _float_run),
    # fp32 products have the least fixed cost per call (MKL's small-matrix path): tiny layers.
    Kernel("float32", False, _float32_prepare, _float_run),
    # (torch 2.13's bf16 int8pack kernel crashes on an in-width not a multiple of 16, M > 1: measured)
    Kernel("int8pack", False, _int8pack_prepare, _int8pack_run, lambda: hasattr(torch, "_weight_int8pack_mm"),
           fits=lambda k, n, four_bit: k % 16 == 0),
    Kernel("int4pack", False, _int4pack_prepare, _int4pack_run, lambda: hasattr(torch, "_weight_int4pack_mm_for_cpu"),
           fits=lambda k, n, four_bit: four_bit and k % 32 == 0 and n % 16 == 0),
    Kernel("vnni-w4", True, _vnni_prepare(True), _vnni_run, native.available,
           fits=lambda k, n, four_bit: four_bit and native.fits(k, n, True), fused_scales=True),
    Kernel("vnni-w8", True, _vnni_prepare(False), _vnni_run, native.available,
           fits=lambda k, n, four_bit: native.fits(k, n, False), fused_scales=True),
)}
# oneDNN's u8 and s8 paths read the same packed weight.
STATE_OF = {name: "onednn" if name.startswith("onednn") else name for name in KERNELS}
# Those whose prepared weight depends on the activation dtype.
DTYPED = ("float", "int8pack", "int4pack")  # (float32's is always fp32)


def encode(q: torch.Tensor, unsigned: bool) -> torch.Tensor:
    """Codes in the encoding a kernel takes, from either (a pass: the quantizers write the right one
    in their own)."""
    if unsigned == (q.dtype == torch.uint8):
        return q
    if unsigned:
        return (q.to(torch.int16) + ZERO_POINT_U8).to(torch.uint8)
    return (q.to(torch.int16) - ZERO_POINT_U8).to(torch.int8)


# -- which kernel runs a shape ---------------------------------------------------------------------
def row_bucket(rows: int) -> int:
    """Rows rounded up to a power of two (decode steps: 1, 2, 4, ...; prefills: 512, 1024, ...)."""
    return 1 << max(rows - 1, 0).bit_length()


def _time_candidate(kernel: Kernel, rows: int, k: int, n: int, dtype: torch.dtype, budget: float,
                    give_up: float = float("inf")) -> float:
    """Median seconds of one call on a synthetic problem of this shape (after one untimed warm-up,
    which also compiles); one timed call when the warm-up alone overran the budget, none (the
    warm-up's time) when it took longer than `give_up`."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    state = kernel.prepare(codes, torch.rand(n, generator=g) * 0.01 + 1e-3, dtype)
    q = encode(torch.randint(-128, 128, (rows, k), dtype=torch.int8, generator=g), kernel.unsigned)
    bias = torch.randn(n, generator=g)
    start = time.perf_counter()
    kernel.run(state, q, 0.05, bias, dtype)
    warm = time.perf_counter() - start
    if warm > give_up:
        return warm
    times = []
    while len(times) < (1 if warm > budget else REPEATS) and (not times or sum(times) < budget):
        start = time.perf_counter()
        kernel.run(state, q, 0.05, bias, dtype)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def machine_key() -> str:
    features = cpu_features()
    text = json.dumps([features.model, features.flags(), torch.__version__, torch.get_num_threads()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class KernelTable:
    """Which kernel runs each (in, out, row bucket, dtype) on this machine, measured once and kept on
    disk. `timed` counts the synthetic problems timed by this table (tests read it)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_root() / "cpu-kernels" / f"{machine_key()}.json"
        self.candidates = tuple(name for name, kernel in KERNELS.items() if kernel.available())
        self.timed = 0
        self._announced = False  # the float fallback is announced once
        data = self._read()
        self.screened: dict[str, float] | None = data.get("screened")
        self.choices: dict[str, str] = data.get("choices", {})

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        # Choices made among other candidates (a kernel added, or one unavailable now) are remade.
        same = isinstance(data, dict) and data.get("machine") == cpu_features().describe() \
            and data.get("candidates") == list(self.candidates)
        return data if same else {}

    def _save(self) -> None:
        # Another process may have added choices since this one read the file: merge, then replace.
        on_disk = self._read()
        choices = {**on_disk.get("choices", {}), **self.choices}
        try:
            write_json_atomic(self.path, {"machine": cpu_features().describe(), "torch": torch.__version__,
                                          "threads": torch.get_num_threads(), "candidates": list(self.candidates),
                                          "screened": self.screened,
                                          "choices": dict(sorted(choices.items()))})
        except OSError as exc:  # a read-only cache costs a re-measurement next time, nothing else
            warnings.warn(f"could not write the CPU kernel choices to {self.path}: {exc}")

    def usable(self) -> tuple[str, ...]:
        """The candidates that survive the machine's screening (run once, on a small problem)."""
        if self.screened is None or not set(self.candidates) <= set(self.screened):
            rows, k, n = SCREEN_SHAPE
            self.screened = {name: round(_time_candidate(KERNELS[name], rows, k, n, torch.bfloat16, BUDGET_S), 7)
                             for name in self.candidates}
            self.timed += len(self.candidates)
            self._save()
        best = min(self.screened[c] for c in self.candidates)
        return tuple(c for c in self.candidates if self.screened[c] <= SCREEN_FACTOR * best)

    def choose(self, rows: int, k: int, n: int, dtype: torch.dtype, four_bit: bool = False) -> str:
        key = f"{k}x{n}:w{4 if four_bit else 8}:r{row_bucket(rows)}:{str(dtype).removeprefix('torch.')}"
        choice = self.choices.get(key)
        if choice not in self.candidates:
            # The fastest on the screening problem first, so that a candidate far behind the best
            # so far is dropped after its first call; buckets past TIMED_ROWS are timed at it
            # (compute-bound there: the ranking holds, the calibration stays seconds).
            usable = sorted((name for name in self.usable() if KERNELS[name].fits(k, n, four_bit)),
                            key=self.screened.get)
            timings: dict[str, float] = {}
            for name in usable:
                give_up = SCREEN_FACTOR * min(timings.values(), default=float("inf"))
                timings[name] = _time_candidate(KERNELS[name], min(row_bucket(rows), TIMED_ROWS), k, n, dtype,
                                                BUDGET_S, give_up)
            self.timed += len(usable)
            choice = min(timings, key=timings.get)
            self.choices[key] = choice
            self._save()
        if choice in ("float", "float32") and not self._announced:
            self._announced = True
            name = str(dtype).removeprefix("torch.")
            warnings.warn(f"cpu-int8: no integer kernel beats {name} on this CPU for {k} x {n} at up to "
                          f"{row_bucket(rows)} rows (nor for any other shape marked \"float\" or \"float32\" in "
                          f"{self.path}); those products run in floating point on the dequantized weights, "
                          f"with the same codes")
        return choice


@functools.cache
def kernel_table() -> KernelTable:
    """The process's table (one file read per process)."""
    return KernelTable()
