"""Typed quantization arguments, shared by calibration, fake-quant forward, checkpoints and kernels.

Field names follow compressed-tensors (`num_bits`, `strategy`, `symmetric`, `group_size`, `dynamic`,
`observer`) so that export is a rename, not a translation.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

Strategy = Literal["tensor", "channel", "group", "token"]
Observer = Literal["minmax", "percentile", "mse"]


class StrictModel(BaseModel):
    """Base for every serialized config: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantArgs(StrictModel):
    """How one tensor (a weight or a layer input) is mapped onto an integer grid.

    - `strategy`: `tensor` (one scale), `channel` (one per output row, weights only), `group`
      (per row and `group_size` consecutive input columns, weights only), `token` (one per row,
      computed at run time, activations only).
    - `dynamic`: scales computed per call instead of fixed offline. Only per-token is dynamic.
    - `observer`: how static activation ranges are estimated (weights use `clip_search`).
    """

    num_bits: int = 8
    strategy: Strategy = "tensor"
    symmetric: bool = True
    group_size: int | None = None
    dynamic: bool = False
    observer: Observer = "minmax"
    percentile: float = 0.9999
    clip_search: bool = False

    @model_validator(mode="after")
    def _check(self) -> "QuantArgs":
        if not 2 <= self.num_bits <= 8:
            raise ValueError(f"num_bits must be between 2 and 8, got {self.num_bits}")
        if (self.strategy == "group") != (self.group_size is not None):
            raise ValueError("group_size is required with strategy 'group' and only allowed with it")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if (self.strategy == "token") != self.dynamic:
            raise ValueError("strategy 'token' is the dynamic strategy: use it with dynamic=true, and only then")
        if not 0.5 < self.percentile <= 1.0:
            raise ValueError(f"percentile must be in (0.5, 1], got {self.percentile}")
        return self

    @property
    def qmin(self) -> int:
        return -(2 ** (self.num_bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.num_bits - 1) - 1 if self.symmetric else 2**self.num_bits - 1

    def describe(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        gran = f"g{self.group_size}" if self.strategy == "group" else self.strategy
        mode = "dynamic" if self.dynamic else "static"
        return f"int{self.num_bits} {kind} {gran} {mode}"
