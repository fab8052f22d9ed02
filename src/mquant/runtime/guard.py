"""Proof that a model claiming to be quantized is (ALGORITHMS.md §9.5)."""

from __future__ import annotations

import torch

from mquant.errors import MquantError
from mquant.runtime.qlinear import quant_linears


@torch.no_grad()
def verify_quantized(model: torch.nn.Module, batch: dict, fp_logits: torch.Tensor) -> dict:
    """Run `batch`; every quantized linear must be called, hold on-grid codes with finite positive
    scales, and the logits must differ from the floating-point ones."""
    layers = quant_linears(model)
    if not layers:
        raise MquantError("no quantized layers in the model")
    for _, m in layers:
        m.calls = 0
        _check_parameters(_, m)
    q_logits = model(**batch).logits.float()
    idle = [n for n, m in layers if m.calls == 0]
    if idle:
        raise MquantError(f"{len(idle)} quantized layers were never called (e.g. {idle[0]})")
    if torch.equal(q_logits, fp_logits.float()):
        raise MquantError("quantized logits equal the floating-point logits bit for bit: quantizers are inactive")
    diff = (q_logits - fp_logits.float()).abs()
    return {
        "quantized_layers": len(layers),
        "quantized_calls": sum(m.calls for _, m in layers),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
    }


def _check_parameters(name: str, m) -> None:
    qw = m.quantized_weight()
    if qw is not None:
        a = qw.args
        if qw.q.min() < a.qmin or qw.q.max() > a.qmax:
            raise MquantError(f"{name}: weight codes outside the int{a.num_bits} grid")
        if not torch.isfinite(qw.scale).all() or (qw.scale <= 0).any():
            raise MquantError(f"{name}: non-finite or non-positive weight scale")
    scale = getattr(m, "input_scale", None)
    if scale is not None and (not torch.isfinite(scale).all() or (scale <= 0).any()):
        raise MquantError(f"{name}: non-finite or non-positive activation scale")
