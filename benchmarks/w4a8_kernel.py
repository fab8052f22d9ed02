"""Throughput of the Triton W4A8 kernel against torch._int_mm (int8 x int8 -> int32) and a bf16
matmul on the same shapes (ALGORITHMS.md §14; issue target: W4A8 >= 70 % of _int_mm). GPU only.

    python benchmarks/w4a8_kernel.py [--rows 1088,4096] [--out w4a8_kernel.json]

The Triton timing includes its whole epilogue (scales, bias, bf16 output); _int_mm's stops at the
int32 accumulator, so the ratio is conservative. Medians of CUDA-event timings after warm-up.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from mquant.eval.report import utc_now
from mquant.fileio import write_json_atomic

# (in, out): Qwen2-VL-7B's q/o, gate/up, down; Qwen2-VL-2B's gate/up; a square 4096.
SHAPES = [(3584, 3584), (3584, 18944), (18944, 3584), (1536, 8960), (4096, 4096)]


def median_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_shape(rows: int, k: int, n: int) -> dict:
    from mquant.runtime.triton_w4a8 import TritonW4A8Gemm

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randint(-127, 128, (rows, k), device="cuda", dtype=torch.int8, generator=g)
    w4 = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8, generator=g)
    w8_kn = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=g).t()
    gemm = TritonW4A8Gemm(w4, torch.rand(n, 1, device="cuda") + 0.01, None, torch.randn(n, device="cuda"))
    a16, b16 = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16), torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    # correctness on this shape: exact integer accumulation against _int_mm
    exact = TritonW4A8Gemm(w4, torch.ones(n, 1, device="cuda"), None, None).scalar(q, 1.0, torch.float32)
    reference = torch._int_mm(q, w4.t().contiguous()).float()
    ok = bool(torch.equal(exact, reference)) if rows * k < 2 ** 31 else None
    t_w4a8 = median_ms(lambda: gemm.scalar(q, 0.01, torch.bfloat16))
    t_blocks = median_ms(lambda: gemm.two_blocks(q, 0.01, 0.02, 16, rows - 64, torch.bfloat16))
    t_int = median_ms(lambda: torch._int_mm(q, w8_kn))
    t_bf16 = median_ms(lambda: torch.nn.functional.linear(a16, b16))
    flops = 2 * rows * k * n
    return {"rows": rows, "in": k, "out": n, "exact": ok,
            "w4a8_ms": round(t_w4a8, 4), "w4a8_two_blocks_ms": round(t_blocks, 4), "int_mm_ms": round(t_int, 4),
            "bf16_ms": round(t_bf16, 4), "w4a8_tops": round(flops / t_w4a8 / 1e9, 1),
            "w4a8_vs_int_mm": round(t_int / t_w4a8, 3), "w4a8_vs_bf16": round(t_bf16 / t_w4a8, 3)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1088,4096")
    p.add_argument("--out", default="w4a8_kernel.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("w4a8_kernel.py: needs a CUDA device")
    rows = [bench_shape(int(m), k, n) for m in args.rows.split(",") for k, n in SHAPES]
    print(f"{'rows':>5} {'in':>6} {'out':>6} {'exact':>6} {'w4a8 ms':>9} {'int_mm ms':>10} {'bf16 ms':>9} "
          f"{'vs int_mm':>10} {'vs bf16':>8}")
    for r in rows:
        print(f"{r['rows']:>5} {r['in']:>6} {r['out']:>6} {str(r['exact']):>6} {r['w4a8_ms']:>9.3f} "
              f"{r['int_mm_ms']:>10.3f} {r['bf16_ms']:>9.3f} {r['w4a8_vs_int_mm']:>10.2f} {r['w4a8_vs_bf16']:>8.2f}")
    write_json_atomic(args.out, {"date": utc_now(), "device": torch.cuda.get_device_name(),
                                 "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
