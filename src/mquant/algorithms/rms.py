"""RMS, Rotation Magnitude Suppression (ALGORITHMS.md §6): which online-Hadamard layers to split.

An exact Hadamard H (first column 1/sqrt(n)) sends the mean of a row into channel 0:
(aH)_0 = sqrt(n)·mean(a) and (BH)_{r,0} = sqrt(n)·mean(B_r). When the mean is large against the
spread of the other channels, channel 0 is an outlier that sets the per-tensor activation scale and
the per-row weight scales. RMS computes channel 0 as its own rank-1 branch
y = x'_0·W'_{:,0} + Q(x'_{1:})·Q(W'_{:,1:})ᵀ + b, so the quantized main path never sees it.

Detection, on the rotated weight W' = BH and rotated activations x' = aH:
- weight test: more than `threshold` of the rows have |W'_{r,0}| > σ_r·sqrt(2 ln n), where σ_r is
  the std of W'_{r,1:} (the expected maximum of n-1 such Gaussians);
- activation test: the 99.9th percentile of |x'_0| exceeds the largest per-channel 99.9th
  percentile over channels j >= 1 (estimated per calibration sample and averaged, so memory stays
  bounded on long sequences).
"""

from __future__ import annotations

import math

import torch

PERCENTILE = 0.999


def weight_outlier_fraction(w_rot: torch.Tensor) -> float:
    """Fraction of rows whose rotated channel-0 entry exceeds sigma_r·sqrt(2 ln n)."""
    w = w_rot.double()
    n = w.shape[1]
    sigma = w[:, 1:].std(dim=1)
    return float((w[:, 0].abs() > sigma * math.sqrt(2 * math.log(n))).double().mean())


class ChannelZeroStats:
    """Streaming comparison of |x'_0| with the other channels' magnitudes (the activation test)."""

    def __init__(self) -> None:
        self.channel0 = 0.0
        self.others = 0.0
        self.samples = 0

    def observe(self, x_rot: torch.Tensor) -> None:
        x = x_rot.detach().float().reshape(-1, x_rot.shape[-1]).abs()
        if x.shape[0] == 0:
            return
        k = max(1, math.ceil(PERCENTILE * x.shape[0]))
        per_channel = x.kthvalue(k, dim=0).values
        self.channel0 += float(per_channel[0])
        self.others += float(per_channel[1:].max())
        self.samples += 1

    def outlier(self) -> bool:
        return self.samples > 0 and self.channel0 > self.others

    def summary(self) -> dict:
        n = max(self.samples, 1)
        return {"channel0_p999": self.channel0 / n, "others_max_p999": self.others / n}


def should_split(w_rot: torch.Tensor, stats: ChannelZeroStats | None, threshold: float) -> tuple[bool, dict]:
    """The detection rule of the module docstring; returns (split?, the evidence for the report)."""
    fraction = weight_outlier_fraction(w_rot)
    evidence = {"weight_outlier_rows": round(fraction, 4)}
    activation = False
    if stats is not None:
        activation = stats.outlier()
        evidence.update({k: round(v, 4) for k, v in stats.summary().items()})
    return fraction > threshold or activation, evidence
