"""Range estimation: the weight scale search and the static activation observers.

Weights: abs-max per row/group, optionally shrunk by the MSE clip search of ALGORITHMS.md §2.3
(shrink ratios p on the grid 1.00, 0.99, ..., 0.21, coarse then fine; error norm 2.4).

Activations (static): an observer sees every calibration row of one layer input and returns a scale
at freeze time. `minmax` keeps a running min/max including 0; `percentile` and `mse` keep a bounded,
deterministic subsample of values/rows and decide at the end.
"""

from __future__ import annotations

import torch

from mquant.numerics.args import QuantArgs
from mquant.numerics.grid import expand_groups, fake_quantize, qparams_from_range, range_stats, split_groups

CLIP_STEP = 0.01  # candidate shrink ratios lie on the grid 1.00, 0.99, ..., 0.21
CLIP_LOWEST = 0.21
CLIP_COARSE = 5  # searched first every 5th ratio (1.00, 0.95, ..., 0.25), then the 8 around each best
CLIP_NORM = 2.4


def weight_qparams(w: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero-points) for a 2-D weight at the granularity of `args`.

    Shapes: tensor [1]; channel [out, 1]; group [out, n_groups].
    """
    w = w.float()
    xmin, xmax = range_stats(w, args)
    if not args.clip_search:
        return qparams_from_range(xmin, xmax, args)
    if args.strategy == "group":
        rows = split_groups(w, args.group_size)  # [out, n_groups, g]
    elif args.strategy == "channel":
        rows = w.unsqueeze(1)  # [out, 1, in]
    else:
        rows = w.reshape(1, 1, -1)
    search = _ClipSearch(rows, xmin, xmax, args)
    coarse = [1.0 - k * CLIP_STEP for k in range(0, round((1.0 - CLIP_LOWEST) / CLIP_STEP) + 1, CLIP_COARSE)]
    for p in coarse:
        search.try_ratio(torch.full_like(xmin, p))
    # The error is smooth in the ratio at this scale (ALGORITHMS.md §2.3): refining around each row's
    # best coarse ratio finds what the full 80-ratio sweep finds with a third of its work.
    around = search.best_ratio.clone()
    for k in range(1, CLIP_COARSE):
        for sign in (1, -1):
            search.try_ratio((around + sign * k * CLIP_STEP).clamp(CLIP_LOWEST, 1.0))
    return search.best_scale, search.best_zp


class _ClipSearch:
    """The best (lowest |Q(w) - w|^2.4) shrink ratio so far of each row or group's range."""

    def __init__(self, rows: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, args: QuantArgs) -> None:
        self.rows, self.xmin, self.xmax, self.args = rows, xmin, xmax, args
        self.best_err = torch.full(xmin.shape, float("inf"), device=xmin.device)
        self.best_ratio = torch.ones_like(xmin)
        self.best_scale, self.best_zp = qparams_from_range(xmin, xmax, args)

    def try_ratio(self, p: torch.Tensor) -> None:
        scale, zp = qparams_from_range(p * self.xmin, p * self.xmax, self.args)
        shape = (self.rows.shape[0], self.rows.shape[1], 1)
        z3 = None if zp is None else zp.reshape(shape)
        q = fake_quantize(self.rows, scale.reshape(shape), z3, self.args)
        err = (q - self.rows).abs().pow(CLIP_NORM).sum(-1).reshape(self.xmin.shape)
        better = err < self.best_err
        self.best_err = torch.where(better, err, self.best_err)
        self.best_ratio = torch.where(better, p, self.best_ratio)
        self.best_scale = torch.where(better, scale, self.best_scale)
        if zp is not None:
            self.best_zp = torch.where(better, zp, self.best_zp)


def scale_for_columns(t: torch.Tensor | None, args: QuantArgs, cols: int) -> torch.Tensor | None:
    """Broadcastable per-element view of weight scales/zero-points for a [out, cols] weight."""
    if t is None or args.strategy != "group":
        return t
    return expand_groups(t, args.group_size, cols)


class ActivationObserver:
    """Collects statistics of one layer input over calibration data and freezes a static scale."""

    def __init__(self, args: QuantArgs, max_samples: int = 1 << 18, seed: int = 0) -> None:
        if args.dynamic:
            raise ValueError("dynamic activations have no observer")
        if args.strategy != "tensor":
            raise ValueError(f"static activation scales are per tensor, got strategy {args.strategy!r}")
        self.args = args
        self.max_samples = max_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.min = torch.zeros(1)
        self.max = torch.zeros(1)
        self.rows_seen = 0
        self._kept: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        self.rows_seen += x.shape[0]
        self.min = torch.minimum(self.min, x.amin().reshape(1))
        self.max = torch.maximum(self.max, x.amax().reshape(1))
        if self.args.observer == "minmax":
            return
        # percentile keeps values, mse keeps whole rows (it measures the row-wise error).
        kept = x.reshape(-1) if self.args.observer == "percentile" else x
        self._kept = kept if self._kept is None else torch.cat([self._kept, kept])
        limit = self.max_samples if self.args.observer == "percentile" else max(1, self.max_samples // x.shape[1])
        if self._kept.shape[0] > limit:
            idx = torch.randperm(self._kept.shape[0], generator=self.generator)[:limit]
            self._kept = self._kept[idx.sort().values]

    def compute(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Freeze: scale (shape [1]) and zero-point (None when symmetric)."""
        if self.rows_seen == 0:
            raise RuntimeError("activation observer saw no rows")
        args = self.args
        if args.observer == "minmax":
            return qparams_from_range(self.min, self.max, args)
        if args.observer == "percentile":
            vals = self._kept
            if args.symmetric:
                r = torch.quantile(vals.abs(), args.percentile).reshape(1)
                return qparams_from_range(-r, r, args)
            lo = torch.quantile(vals, 1 - args.percentile).reshape(1)
            hi = torch.quantile(vals, args.percentile).reshape(1)
            return qparams_from_range(lo, hi, args)
        return self._mse_search()

    def _mse_search(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = self._kept
        best = None
        for i in range(26):  # clip ratios 1.00, 0.98, ..., 0.50 of the observed range
            c = 1.0 - 0.02 * i
            scale, zp = qparams_from_range(c * self.min, c * self.max, self.args)
            err = (fake_quantize(rows, scale, zp, self.args) - rows).pow(2).sum().item()
            if best is None or err < best[0]:
                best = (err, scale, zp)
        return best[1], best[2]
