"""Online Hadamard cost: the fast transform (Sylvester blocks + one K x K matmul) against a dense
n x n matmul, at 512 tokens, for the widths real models need (ALGORITHMS.md §4.4, §14.4).

    python benchmarks/hadamard.py [--tokens 512] [--widths 3584,18944] [--out hadamard.json]

Prints a table and writes JSON. Median of repeated runs in one process; not a timed test.
"""

from __future__ import annotations

import argparse

import torch

from mquant.bench.latency import median_ms
from mquant.eval.report import machine_description, utc_now
from mquant.fileio import write_json_atomic
from mquant.transforms.hadamard import FastHadamard, dense_hadamard, hadamard_spec

CPU = torch.device("cpu")


def bench_width(n: int, tokens: int, repeats: int) -> dict:
    spec = hadamard_spec(n)
    fast = FastHadamard(spec)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(0))
    dense = torch.tensor(dense_hadamard(spec), dtype=torch.float32) / spec.order**0.5
    padded = torch.nn.functional.pad(x, (0, spec.order - n))
    with torch.no_grad():
        error = (fast(x) - padded @ dense).abs().max().item()
        fast_ms = median_ms(lambda: fast(x), repeats, CPU, warmup=1)
        dense_ms = median_ms(lambda: padded @ dense, max(3, repeats // 4), CPU, warmup=1)
    return {"n": n, "order": spec.order, "k": spec.k, "construction": spec.construction, "tokens": tokens,
            "fast_ms": round(fast_ms, 3), "dense_ms": round(dense_ms, 3), "speedup": round(dense_ms / fast_ms, 1),
            "max_abs_error": error}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--widths", default="3584,18944")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="hadamard.json")
    args = p.parse_args(argv)
    rows = [bench_width(int(n), args.tokens, args.repeats) for n in args.widths.split(",")]
    print(f"{'n':>6} {'H = K x 2^m':>14} {'fast ms':>9} {'dense ms':>9} {'speed-up':>9} {'max err':>9}")
    for r in rows:
        print(f"{r['n']:>6} {r['k']:>6} x {r['order'] // r['k']:<6} {r['fast_ms']:>9.2f} {r['dense_ms']:>9.2f} "
              f"{r['speedup']:>8.1f}x {r['max_abs_error']:>9.1e}")
    write_json_atomic(args.out, {"date": utc_now(), "machine": machine_description(),
                                 "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
