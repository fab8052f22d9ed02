"""The CPU integer primitives of the int8 runtime (ALGORITHMS.md §14.2–14.3).

- Activation quantizers: static (one scale), two-block (AIFS: one row range on one scale, the rest
  on another), per-row lookup (MSQ without AIFS) and dynamic per-token. In eager mode quantizing
  costs more than the int8 GEMM, so each is compiled once with `torch.compile` (dynamic shapes)
  into one fused pass; without a working compiler (or with MQUANT_COMPILE=0) they run eagerly,
  with identical results.
- `Int8Gemm`: y = (q_x · W_qᵀ) · x_scale · w_scale + bias from int8 codes, on oneDNN's
  `qlinear_pointwise` (AMX/VNNI, scales and bias fused, output in the activation dtype) or on
  `torch._int_mm` (int32 out, epilogue compiled), whichever measures faster for the shape; both
  accumulate exactly in int32. Group-wise weight scales (no fused kernel exists) run one integer
  product per group.

Codes are computed as round(x / scale) (division, not multiplication by 1/scale) so that they are
the fake-quant reference's codes bit for bit.
"""

from __future__ import annotations

import functools
import os
import time
import warnings

import torch

from mquant.numerics.grid import MIN_SCALE


# -- activation quantizers (pure functions; compiled on first use) -------------------------------
def quantize_static(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Codes on a static grid: `scale` is one number, or one per row ([rows, 1]: the MSQ row lookup
    without AIFS)."""
    return torch.clamp(torch.round(x.float() / scale), qmin, qmax).to(torch.int8)


def quantize_two_blocks(x: torch.Tensor, inner: torch.Tensor, outer: torch.Tensor, start: int, stop: int,
                        qmin: int, qmax: int) -> torch.Tensor:
    """Rows [start, stop) on scale `inner`, every other row on `outer`: a compare, not a gather."""
    row = torch.arange(x.shape[0], device=x.device)[:, None]
    return quantize_static(x, torch.where((row >= start) & (row < stop), inner, outer), qmin, qmax)


def quantize_dynamic(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric: each row's absmax / qmax, as the fake-quant reference computes it."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=MIN_SCALE)
    return quantize_static(x, scale, -qmax - 1, qmax), scale


def scale_output(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The epilogue outside the kernel: y · scale (+ bias) in `dtype` — an int32 accumulator times
    x_scale · w_scale, or a product times its row scales."""
    out = y.float() * scale
    return (out if bias is None else out + bias).to(dtype)


def _compile_enabled() -> bool:
    return os.environ.get("MQUANT_COMPILE", "1") != "0"


@functools.cache
def compiled(fn):
    """`fn` compiled with dynamic shapes, or `fn` itself when compiling is off or unavailable."""
    if not _compile_enabled():
        return fn
    try:
        import torch._inductor  # noqa: F401  (fails early on builds without inductor)
    except Exception:  # pragma: no cover - builds without a compiler
        return fn
    # One graph per dtype, contiguity and 1-row (decode) specialization: more than dynamo's
    # default limit of 8 once several models run in one process.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    fast = torch.compile(fn, dynamic=True)
    state = {"compiled": True}

    @functools.wraps(fn)
    def run(*args):
        if state["compiled"]:
            try:
                return fast(*args)
            except Exception as exc:  # e.g. no C++ compiler on this machine: eager gives the same codes
                state["compiled"] = False
                warnings.warn(f"torch.compile failed for {fn.__name__} ({type(exc).__name__}); running it "
                              "eagerly (same results, slower)")
        return fn(*args)

    return run


# -- the GEMM -------------------------------------------------------------------------------------
def onednn_available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise") \
        and torch.backends.mkldnn.is_available()


class Int8Gemm:
    """int8 weight codes [out, in] with their scales and bias, prepared once for the integer kernels
    (the CPU's; on CUDA, `_int_mm` for the 8-bit weights the Triton W4A8 kernel does not take).

    Three products, one per way activation scales can be laid out over the rows:
    `scalar` (one scale), `two_blocks` (AIFS: rows [start, stop) on one scale, the rest on another)
    and `rows` (one scale per row: MSQ without AIFS, and dynamic per-token).
    `kernel`: "auto" (time both kernels once per row-count bucket, keep the faster), "onednn" or "int_mm".
    """

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, group_size: int | None,
                 bias: torch.Tensor | None, kernel: str = "auto") -> None:
        if kernel not in ("auto", "onednn", "int_mm"):
            raise ValueError(f"unknown int8 kernel {kernel!r}")
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        # [in, out], the layout _int_mm reads. CUDA's _int_mm needs in and out multiples of 8 (and
        # more than 16 rows): pad with zero codes, which add nothing to the accumulator.
        self._pad_in = (-self.in_features) % 8 if codes.device.type == "cuda" and group_size is None else 0
        pad_out = (-self.out_features) % 8 if codes.device.type == "cuda" else 0
        self.codes_kn = torch.nn.functional.pad(codes, (0, self._pad_in, 0, pad_out)).t().contiguous()
        scale = w_scale.float()
        self.w_scale = (scale.expand(self.out_features, 1) if scale.numel() == 1 else scale).reshape(self.out_features, -1)
        self.bias = None if bias is None else bias.float()
        usable = codes.device.type == "cpu" and onednn_available() and group_size is None
        self.kernel = kernel if usable else "int_mm"
        if self.kernel != "int_mm":
            self.packed = torch.ops.onednn.qlinear_prepack(codes.contiguous(), None)
            self._w_scale_vec = self.w_scale.reshape(-1).contiguous()
            self._zero_points = torch.zeros(self.out_features, dtype=torch.int64, device=codes.device)
        self._choice: dict[int, str] = {}

    # -- the three activation-scale layouts -------------------------------------------------------
    def scalar(self, q: torch.Tensor, x_scale: float, dtype: torch.dtype) -> torch.Tensor:
        return self._product(q, x_scale, self.bias, dtype)

    def two_blocks(self, q: torch.Tensor, inner: float, outer: float, start: int, stop: int,
                   dtype: torch.dtype) -> torch.Tensor:
        """One GEMM on the majority block's scale, then the minority rows rescaled in place: with
        two contiguous blocks the fix-up touches only the smaller block's rows."""
        rows = q.shape[0]
        inner_major = 2 * (stop - start) >= rows
        y = self._product(q, inner if inner_major else outer, self.bias, dtype)
        ratio = (outer / inner) if inner_major else (inner / outer)
        minority = [(0, start), (stop, rows)] if inner_major else [(start, stop)]
        for a, b in minority:
            if b > a:
                block = y[a:b].mul_(ratio)  # (acc·s + bias)·r + bias·(1 - r) = acc·s·r + bias
                if self.bias is not None:
                    block.add_(self.bias, alpha=1 - ratio)
        return y

    def rows(self, q: torch.Tensor, row_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Row scales cannot enter the kernel (its source scale is one number): a pass over the output."""
        return compiled(scale_output)(self._product(q, 1.0, None, dtype), row_scale, self.bias, dtype)

    # -- kernels ----------------------------------------------------------------------------------
    def _product(self, q, x_scale, bias, dtype):
        if self.group_size is not None:
            return self._grouped(q, x_scale, bias, dtype)
        kernel = self.kernel if self.kernel != "auto" else self._choose(q, dtype)
        if kernel == "onednn":
            return torch.ops.onednn.qlinear_pointwise(q, x_scale, 0, self.packed, self._w_scale_vec, self._zero_points,
                                                      bias, 1.0, 0, dtype, "none", [], "")
        rows = q.shape[0]
        if q.device.type == "cuda":
            q = torch.nn.functional.pad(q, (0, self._pad_in, 0, max(0, 17 - rows)))
        acc = torch._int_mm(q, self.codes_kn)[:rows, :self.out_features]
        return compiled(scale_output)(acc, self.w_scale.reshape(1, -1) * x_scale, bias, dtype)

    def _choose(self, q: torch.Tensor, dtype: torch.dtype) -> str:
        bucket = 1 << max(q.shape[0] - 1, 0).bit_length()  # rows rounded up to a power of two
        if bucket not in self._choice:
            timings = {}
            for name in ("onednn", "int_mm"):
                self.kernel = name
                self._product(q, 1.0, None, dtype)  # warm-up (and compilation)
                start = time.perf_counter()
                for _ in range(2):
                    self._product(q, 1.0, None, dtype)
                timings[name] = time.perf_counter() - start
            self.kernel = "auto"
            self._choice[bucket] = min(timings, key=timings.get)
        return self._choice[bucket]

    def _grouped(self, q, x_scale, bias, dtype):
        g = self.group_size
        out = torch.zeros(q.shape[0], self.out_features, dtype=torch.float32, device=q.device)
        for i, start in enumerate(range(0, self.in_features, g)):
            acc = torch._int_mm(q[:, start:start + g].contiguous(), self.codes_kn[start:start + g])
            out += acc.float() * self.w_scale[:, i]
        out *= x_scale
        return (out if bias is None else out + bias).to(dtype)
