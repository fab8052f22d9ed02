"""Small element-wise functions compiled once into one fused pass each (eager when compiling is off).

In eager mode an activation quantizer or an epilogue costs more than the int8 GEMM it serves, so
each is compiled once with `torch.compile` (dynamic shapes); without a working compiler (or with
MQUANT_COMPILE=0) they run eagerly, with identical results. A compiled call has a fixed cost of its
own (guards and dispatch: about 30 µs on a 2-core AMD EPYC, against 10 µs for the eager quantizer's
few ops on a decode row), so tensors smaller than `EAGER_BELOW` elements run eagerly.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

EAGER_BELOW = 1 << 15  # elements of the first argument


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
        if state["compiled"] and args[0].numel() >= EAGER_BELOW:
            try:
                return fast(*args)
            except Exception as exc:  # e.g. no C++ compiler on this machine: eager gives the same codes
                state["compiled"] = False
                warnings.warn(f"torch.compile failed for {fn.__name__} ({type(exc).__name__}); running it "
                              "eagerly (same results, slower)")
        return fn(*args)

    return run
