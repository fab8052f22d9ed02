"""The CPU integer primitives of the int8 runtime (ALGORITHMS.md §14.2–14.3).

- Activation quantizers: static (one scale), two-block (AIFS: one row range on one scale, the rest
  on another), per-row lookup (MSQ without AIFS) and dynamic per-token, each compiled into one
  fused pass (`mquant.runtime.compiling`). With `unsigned` they write code + 128 as uint8 in the
  same pass: what oneDNN's VNNI path multiplies (u8 × s8) on CPUs without AMX. `static_codes`,
  `two_block_codes`, `row_codes` and `dynamic_codes` run them: the native kernel where this CPU has
  it (`mquant.runtime.native`: one call, a few µs), else the compiled pass.
- `Int8Gemm`: y = (q_x · W_qᵀ) · x_scale · w_scale + bias from int8 codes, on the kernel this
  machine measured fastest for the shape (`mquant.runtime.cpu_kernels`): mquant's native VNNI
  products, oneDNN's `qlinear_pointwise`, `torch._int_mm`, torch's weight-only products, or bf16
  on the dequantized weights where no integer kernel beats it. Group-wise weight scales (no fused kernel exists) run one integer product per group.

Codes are computed as round(x / scale) (division, not multiplication by 1/scale) so that they are
the fake-quant reference's codes bit for bit.
"""

from __future__ import annotations

import torch

from mquant.numerics.grid import MIN_SCALE
from mquant.runtime import cpu_kernels, native
from mquant.runtime.cpu_features import cpu_features
from mquant.runtime.compiling import compiled, scale_output


# -- activation quantizers (pure functions; compiled on first use) -------------------------------
def quantize_static(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, unsigned: bool = False) -> torch.Tensor:
    """Codes on a static grid: `scale` is one number, or one per row ([rows, 1]: the MSQ row lookup
    without AIFS). Signed int8, or with `unsigned` uint8 code + 128."""
    q = torch.clamp(torch.round(x.float() / scale), qmin, qmax)
    return (q + cpu_kernels.ZERO_POINT_U8).to(torch.uint8) if unsigned else q.to(torch.int8)


def quantize_two_blocks(x: torch.Tensor, inner: torch.Tensor, outer: torch.Tensor, start: int, stop: int,
                        qmin: int, qmax: int, unsigned: bool = False) -> torch.Tensor:
    """Rows [start, stop) on scale `inner`, every other row on `outer`: a compare, not a gather."""
    row = torch.arange(x.shape[0], device=x.device)[:, None]
    return quantize_static(x, torch.where((row >= start) & (row < stop), inner, outer), qmin, qmax, unsigned)


def quantize_dynamic(x: torch.Tensor, qmax: int, unsigned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric: each row's absmax / qmax, as the fake-quant reference computes it."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=MIN_SCALE)
    return quantize_static(x, scale, -qmax - 1, qmax, unsigned), scale


def static_codes(x: torch.Tensor, scale: float, scale_t: torch.Tensor, qmin: int, qmax: int,
                 unsigned: bool) -> torch.Tensor:
    """`quantize_static` of x [rows, in] on one scale (`scale_t`: the same as a tensor, for the compiled pass)."""
    if native.takes(x):
        return native.quantize(x, qmin, qmax, unsigned, scale=scale)
    return compiled(quantize_static)(x, scale_t, qmin, qmax, unsigned)


def two_block_codes(x: torch.Tensor, inner: float, outer: float, inner_t: torch.Tensor, outer_t: torch.Tensor,
                    start: int, stop: int, qmin: int, qmax: int, unsigned: bool) -> torch.Tensor:
    if native.takes(x):
        return native.quantize(x, qmin, qmax, unsigned, scale=outer, inner=inner, start=start, stop=stop)
    return compiled(quantize_two_blocks)(x, inner_t, outer_t, start, stop, qmin, qmax, unsigned)


def row_codes(x: torch.Tensor, row_scale: torch.Tensor, qmin: int, qmax: int, unsigned: bool) -> torch.Tensor:
    """Codes on one scale per row (`row_scale` [rows, 1])."""
    if native.takes(x):
        return native.quantize(x, qmin, qmax, unsigned, row_scale=row_scale.reshape(-1))
    return compiled(quantize_static)(x, row_scale, qmin, qmax, unsigned)


def dynamic_codes(x: torch.Tensor, qmax: int, unsigned: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if native.takes(x):
        return native.quantize(x, -qmax - 1, qmax, unsigned, dynamic=True, min_scale=MIN_SCALE)
    return compiled(quantize_dynamic)(x, qmax, unsigned)


# -- the GEMM -------------------------------------------------------------------------------------
class Int8Gemm:
    """int8 weight codes [out, in] with their scales and bias, prepared for the integer kernels (the
    CPU's, `mquant.runtime.cpu_kernels`; on CUDA, `_int_mm` for the 8-bit weights the Triton W4A8
    kernel does not take).

    Three products, one per way activation scales can be laid out over the rows:
    `scalar` (one scale), `two_blocks` (AIFS: rows [start, stop) on one scale, the rest on another)
    and `rows` (one scale per row: MSQ without AIFS, and dynamic per-token).
    `kernel`: "auto" (the kernel this machine's `KernelTable` measured fastest for the shape and row
    count), or a kernel's name (`cpu_kernels.KERNELS`; "onednn" is the oneDNN path that suits this
    CPU: signed codes with AMX, unsigned without). Codes may come signed or unsigned (code + 128):
    `unsigned_input(rows, dtype)` says which the chosen kernel takes, so the quantizer can produce
    them in its own pass; the other encoding is converted here.
    """

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, group_size: int | None,
                 bias: torch.Tensor | None, kernel: str = "auto") -> None:
        if kernel == "onednn":
            kernel = "onednn-s8" if cpu_features().amx else "onednn-u8"
        if kernel != "auto" and kernel not in cpu_kernels.KERNELS:
            raise ValueError(f"unknown int8 kernel {kernel!r}; choose from auto, onednn, {', '.join(cpu_kernels.KERNELS)}")
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        scale = w_scale.float()
        self.w_scale = (scale.expand(self.out_features, 1) if scale.numel() == 1 else scale).reshape(self.out_features, -1)
        self.bias = None if bias is None else bias.float()
        self.cuda = codes.device.type == "cuda"
        if self.cuda or group_size is not None:
            # CUDA's _int_mm needs in and out multiples of 8 (and more than 16 rows): pad with zero
            # codes, which add nothing to the accumulator. Group scales: one _int_mm per group.
            self._pad_in = (-self.in_features) % 8 if self.cuda and group_size is None else 0
            pad_out = (-self.out_features) % 8 if self.cuda else 0
            self.codes_kn = torch.nn.functional.pad(codes, (0, self._pad_in, 0, pad_out)).t().contiguous()
            kernel = "int_mm"
        self.four_bit = bool(codes.numel() == 0 or (codes.min() >= -8 and codes.max() <= 7))
        if kernel != "auto":
            if not cpu_kernels.KERNELS[kernel].available():
                raise ValueError(f"int8 kernel {kernel!r} is not available in this torch build")
            if not cpu_kernels.KERNELS[kernel].fits(self.in_features, self.out_features, self.four_bit):
                raise ValueError(f"int8 kernel {kernel!r} does not take {self.out_features} x {self.in_features} "
                                 f"{'4' if self.four_bit else '8'}-bit weights")
        self.kernel = kernel
        self._codes = codes.contiguous()  # what each kernel's weight state is prepared from, when first chosen
        self._states: dict[tuple, object] = {}
        self._choice: dict[tuple[int, torch.dtype], str] = {}

    # -- the three activation-scale layouts -------------------------------------------------------
    def scalar(self, q: torch.Tensor, x_scale: float, dtype: torch.dtype) -> torch.Tensor:
        return self._product(q, x_scale, self.bias, dtype)

    def two_blocks(self, q: torch.Tensor, inner: float, outer: float, start: int, stop: int,
                   dtype: torch.dtype) -> torch.Tensor:
        """Kernels with fused scales apply both in their epilogue. Others: one GEMM on the majority
        block's scale, then the minority rows rescaled in place (two contiguous blocks: the fix-up
        touches only the smaller block's rows)."""
        if self._fused_scales(q.shape[0], dtype):
            return self._product(q, (inner, outer, start, stop), self.bias, dtype)
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
        """Kernels with fused scales apply row scales in their epilogue; the others' source scale is
        one number: there, a pass over the output."""
        if self._fused_scales(q.shape[0], dtype):
            return self._product(q, row_scale, self.bias, dtype)
        return compiled(scale_output)(self._product(q, 1.0, None, dtype), row_scale, self.bias, dtype)

    def _fused_scales(self, rows: int, dtype: torch.dtype) -> bool:
        return cpu_kernels.KERNELS[self.kernel_for(rows, dtype)].fused_scales

    # -- kernels ----------------------------------------------------------------------------------
    def kernel_for(self, rows: int, dtype: torch.dtype) -> str:
        if self.kernel != "auto":
            return self.kernel
        key = (cpu_kernels.row_bucket(rows), dtype)
        if key not in self._choice:
            self._choice[key] = cpu_kernels.kernel_table().choose(rows, self.in_features, self.out_features, dtype,
                                                                  self.four_bit)
        return self._choice[key]

    def unsigned_input(self, rows: int, dtype: torch.dtype) -> bool:
        return cpu_kernels.KERNELS[self.kernel_for(rows, dtype)].unsigned

    def _product(self, q, x_scale, bias, dtype):
        if self.cuda or self.group_size is not None:
            return self._padded_or_grouped(cpu_kernels.encode(q, False), x_scale, bias, dtype)
        kernel = cpu_kernels.KERNELS[self.kernel_for(q.shape[0], dtype)]
        q = cpu_kernels.encode(q, kernel.unsigned)
        key = (cpu_kernels.STATE_OF[kernel.name], dtype if kernel.name in cpu_kernels.DTYPED else None)
        if key not in self._states:
            self._states[key] = kernel.prepare(self._codes, self.w_scale.reshape(-1), dtype)
        return kernel.run(self._states[key], q, x_scale, bias, dtype)

    def _padded_or_grouped(self, q, x_scale, bias, dtype):
        if self.group_size is None:
            rows = q.shape[0]
            q = torch.nn.functional.pad(q, (0, self._pad_in, 0, max(0, 17 - rows)))
            acc = torch._int_mm(q, self.codes_kn)[:rows, :self.out_features]
            return compiled(scale_output)(acc, self.w_scale.reshape(1, -1) * x_scale, bias, dtype)
        g = self.group_size
        out = torch.zeros(q.shape[0], self.out_features, dtype=torch.float32, device=q.device)
        for i, start in enumerate(range(0, self.in_features, g)):
            acc = torch._int_mm(q[:, start:start + g].contiguous(), self.codes_kn[start:start + g])
            out += acc.float() * self.w_scale[:, i]
        out *= x_scale
        return (out if bias is None else out + bias).to(dtype)
