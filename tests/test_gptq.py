import warnings

import pytest
import torch

from mquant.algorithms.gptq import GPTQConfig, HessianAccumulator, gptq_quantize, relative_output_error
from mquant.algorithms.rtn import rtn_quantize
from mquant.numerics.args import QuantArgs


def _correlated_inputs(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scales = torch.logspace(-1, 1, d)
    return (torch.randn(n, d, generator=g) @ mix) * scales


def _output_error(w, w_hat, x):
    return ((x @ (w - w_hat).T) ** 2).sum().item()


CASES = [
    (QuantArgs(num_bits=4, strategy="channel", clip_search=True), GPTQConfig()),
    (QuantArgs(num_bits=4, strategy="channel"), GPTQConfig(act_order=False)),
    (QuantArgs(num_bits=3, strategy="channel"), GPTQConfig(block_size=32)),
    (QuantArgs(num_bits=4, strategy="group", group_size=32), GPTQConfig()),
    (QuantArgs(num_bits=4, strategy="group", group_size=32), GPTQConfig(act_order=False, static_groups=False)),
    (QuantArgs(num_bits=4, strategy="channel", symmetric=False), GPTQConfig()),
    (QuantArgs(num_bits=8, strategy="channel"), GPTQConfig()),
    (QuantArgs(num_bits=2, strategy="tensor"), GPTQConfig()),
]


@pytest.mark.parametrize("args,cfg", CASES, ids=lambda v: v.describe() if hasattr(v, "describe") else str(v))
@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_beats_rtn_on_calibration_data(args, cfg, seed):
    d_in, d_out = 96, 40
    x = _correlated_inputs(512, d_in, seed)
    w = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed + 10))
    acc = HessianAccumulator(d_in)
    for chunk in x.split(100):
        acc.add(chunk)
    gptq = gptq_quantize(w, acc.H, args, cfg)
    assert not gptq.fallback_rtn
    rtn = rtn_quantize(w, args)
    e_gptq = _output_error(w, gptq.weight.dequantize(), x)
    e_rtn = _output_error(w, rtn.dequantize(), x)
    assert e_gptq < e_rtn
    # The report's error proxy agrees with the directly measured output error.
    rel = relative_output_error(w, gptq.weight.dequantize(), acc.H)
    assert rel == pytest.approx(e_gptq / ((x @ w.T) ** 2).sum().item(), rel=1e-3)
    codes = gptq.weight.q.float()
    assert codes.min() >= args.qmin and codes.max() <= args.qmax


def test_hessian_is_running_average():
    x = torch.randn(300, 8)
    acc = HessianAccumulator(8)
    for chunk in (x[:7], x[7:100], x[100:]):
        acc.add(chunk)
    assert torch.allclose(acc.H, 2 / 300 * x.T @ x, atol=1e-5)


def test_static_groups_use_natural_order_scales():
    args = QuantArgs(num_bits=4, strategy="group", group_size=16)
    w = torch.randn(8, 64)
    x = _correlated_inputs(256, 64, 3)
    out = gptq_quantize(w, 2 / 256 * x.T @ x, args, GPTQConfig(act_order=True, static_groups=True))
    rtn = rtn_quantize(w, args)
    assert torch.equal(out.weight.scale, rtn.scale)  # scales from the original weight, not permuted


def test_dead_inputs_get_zero_weight():
    x = _correlated_inputs(256, 32, 4)
    x[:, 5] = 0
    w = torch.randn(6, 32)
    out = gptq_quantize(w, 2 / 256 * x.T @ x, QuantArgs(num_bits=4, strategy="channel"), GPTQConfig())
    assert torch.all(out.weight.q[:, 5] == 0)


def test_cholesky_failure_falls_back_to_rtn_with_warning():
    w = torch.randn(4, 8)
    H = -torch.eye(8)  # not positive definite at any damping
    args = QuantArgs(num_bits=4, strategy="channel")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = gptq_quantize(w, H, args, GPTQConfig())
    assert out.fallback_rtn and any("RTN" in str(c.message) for c in caught)
    assert torch.equal(out.weight.q, rtn_quantize(w, args).q)


def test_act_order_groups_without_static_groups_is_rejected():
    with pytest.raises(ValueError):
        gptq_quantize(torch.randn(4, 32), torch.eye(32), QuantArgs(num_bits=4, strategy="group", group_size=8),
                      GPTQConfig(act_order=True, static_groups=False))
