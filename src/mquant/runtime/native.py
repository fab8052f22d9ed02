"""mquant's native CPU kernels (`csrc/vnni.c`): built on first use, called through ctypes.

On a CPU with AVX-512 VNNI they give the integer runtime what no installable package does: a
product that reads 4-bit weight codes directly (half a byte per weight: what a decode step's time
is) and multiplies with VNNI, an 8-bit-weight one, activation quantizers and the online Hadamard
transform as butterflies — each one call of a few microseconds with no intermediate tensors, where
torch's ops cost tens of microseconds per call on small layers. Plain C with no torch headers: it
compiles in about a second with the C compiler torch.compile needs anyway, into
`$MQUANT_CACHE/native/<source hash>.so` (an atomic rename: concurrent builds are harmless); its
OpenMP is the runtime torch loaded (same soname), so the two share one thread pool. Without a compiler, or on other CPUs, `library()` is None
and the PyTorch kernels run (same codes, same results within float rounding); MQUANT_NATIVE=0
turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from importlib import resources
from pathlib import Path

import torch

from mquant.fileio import cache_root
from mquant.runtime.cpu_features import cpu_features

SOURCE = "vnni.c"
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
         "-mavx512vnni")
P, I64, F32, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SIGNATURES = {
    "mq_gemm_w4": (P, I64, I64, P, P, P, F32, F32, I64, I64, P, P, P, I64, INT),
    "mq_gemm_w8": (P, I64, I64, P, P, P, F32, F32, I64, I64, P, P, P, I64, INT),
    "mq_quantize": (P, INT, I64, I64, I64, F32, F32, I64, I64, P, INT, F32, INT, INT, INT, P),
    "mq_hadamard": (P, INT, I64, I64, I64, I64, I64, P, F32, P, INT),
}


def _supported() -> bool:
    features = cpu_features()
    return os.environ.get("MQUANT_NATIVE", "1") != "0" and features.avx512 and features.avx512_vnni


def _build(source: bytes, target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / SOURCE, Path(tmp) / target.name
        src.write_bytes(source)
        run = subprocess.run([compiler, *FLAGS, str(src), "-o", str(out)], capture_output=True, text=True)
        if run.returncode != 0:
            last = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit status {run.returncode}"
            raise OSError(f"{compiler} failed: {last}")
        os.replace(out, target)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot run (announced once, with why)."""
    if not _supported():
        return None
    source = resources.files("mquant.runtime").joinpath("csrc", SOURCE).read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_root() / "native" / f"vnni-{digest}.so"
    try:
        if not target.is_file():
            _build(source, target)
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        warnings.warn(f"mquant's native VNNI kernels are unavailable ({exc}); the PyTorch kernels run instead")
        return None
    for name, args in SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = args, None
    return lib


def available() -> bool:
    return library() is not None


# -- weights ---------------------------------------------------------------------------------------
def fits(k: int, n: int, four_bit: bool) -> bool:
    return n % 16 == 0 and k % (8 if four_bit else 4) == 0


def pack_weight(codes: torch.Tensor, four_bit: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [out, in] in the kernels' layout (see csrc/vnni.c), and 128 · each channel's code sum
    (what unsigned activations add to the accumulator)."""
    n, k = codes.shape
    corr = (codes.to(torch.int32).sum(dim=1) * 128).to(torch.int32).contiguous()
    if four_bit:
        c = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(n // 16, 16, k // 8, 2, 4)
        packed = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).permute(0, 2, 1, 3)
    else:
        packed = codes.to(torch.int8).reshape(n // 16, 16, k // 4, 4).permute(0, 2, 1, 3)
    return packed.contiguous(), corr


class PackedWeight:
    """Weight codes [out, in] (4-bit ones two per byte) with their per-channel scales, ready for the
    native product; calling it multiplies unsigned activation codes (uint8 code + 128)."""

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, four_bit: bool) -> None:
        self.packed, self.corr = pack_weight(codes, four_bit)
        self.w_scale = w_scale.float().reshape(-1).contiguous()
        self.out_features = codes.shape[0]
        lib = library()
        self._fn = lib.mq_gemm_w4 if four_bit else lib.mq_gemm_w8
        self._pointers = (self.packed.data_ptr(), self.corr.data_ptr(), self.w_scale.data_ptr())

    def __call__(self, q: torch.Tensor, x_scale: float, bias: torch.Tensor | None, dtype: torch.dtype,
                 inner: float | None = None, start: int = 0, stop: int = 0,
                 row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """(q - 128) · Wᵀ · s_m · w_scale + bias, in fp32 or bf16, with s_m = `inner` for rows
        [start, stop) and `x_scale` for the others, times `row_scale` [rows] per row when given;
        `bias` and `row_scale` fp32 and contiguous."""
        q = q.contiguous()
        rows, k = q.shape
        y = torch.empty(rows, self.out_features, dtype=dtype)
        packed, corr, w_scale = self._pointers
        self._fn(q.data_ptr(), rows, k, packed, corr, w_scale, x_scale, x_scale if inner is None else inner, start,
                 stop, None if row_scale is None else row_scale.data_ptr(), None if bias is None else bias.data_ptr(),
                 y.data_ptr(), self.out_features, dtype == torch.bfloat16)
        return y


# -- activation quantizers -------------------------------------------------------------------------
def takes(x: torch.Tensor) -> bool:
    """Whether the native quantizer and Hadamard take this input (CPU, fp32 or bf16, 2-D, rows contiguous)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 2
            and x.stride(1) == 1 and available())


def quantize(x: torch.Tensor, qmin: int, qmax: int, unsigned: bool, scale: float = 1.0,
             inner: float | None = None, start: int = 0, stop: int = 0, row_scale: torch.Tensor | None = None,
             dynamic: bool = False, min_scale: float = 0.0):
    """Codes of x [rows, in] — one scale; `inner` on rows [start, stop) (AIFS); `row_scale` [rows]
    per row; or `dynamic` per token (then returns the codes and the row scales [rows, 1]). Codes are
    int8, or uint8 code + 128 with `unsigned`."""
    rows, k = x.shape
    out = torch.empty(rows, k, dtype=torch.uint8 if unsigned else torch.int8)
    scales = torch.empty(rows, 1) if dynamic else None if row_scale is None else row_scale.float().contiguous()
    library().mq_quantize(x.data_ptr(), x.dtype == torch.bfloat16, rows, k, x.stride(0), scale,
                          scale if inner is None else inner, start, stop,
                          None if scales is None else scales.data_ptr(), dynamic, min_scale, qmin, qmax,
                          128 if unsigned else 0, out.data_ptr())
    return (out, scales) if dynamic else out


# -- online Hadamard -------------------------------------------------------------------------------
def hadamard_fits(order: int, k: int) -> bool:
    """Segments of a multiple of 16 (the vector path; smaller ones are faster as torch matmuls)."""
    return (order // k) % 16 == 0


def hadamard(x: torch.Tensor, order: int, hk: torch.Tensor) -> torch.Tensor:
    """x [rows, n] zero-padded to `order` times H_k ⊗ H_(order/k) / sqrt(order) (`FastHadamard`'s
    transform; `hk` the k x k factor, fp32 contiguous), computed in fp32, in x's dtype."""
    rows, n = x.shape
    out = torch.empty(rows, order, dtype=x.dtype)
    library().mq_hadamard(x.data_ptr(), x.dtype == torch.bfloat16, rows, n, x.stride(0), order, hk.shape[0],
                          hk.data_ptr(), order ** -0.5, out.data_ptr(), x.dtype == torch.bfloat16)
    return out
