"""Patch convolutions (kernel == stride) viewed as linear layers on unfolded patches.

The vision patch embedding of Qwen2-VL (Conv3d over 2x14x14 patches) and CLIP (Conv2d) are linear
maps of non-overlapping patches; quantizing them means quantizing that linear map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from mquant.errors import MquantError


@dataclass(frozen=True)
class PatchGeometry:
    kernel: tuple[int, ...]

    @classmethod
    def of(cls, conv: nn.Module) -> "PatchGeometry":
        k, s = tuple(conv.kernel_size), tuple(conv.stride)
        # "valid" (SigLIP) is PyTorch's name for no padding.
        padding = (0,) if conv.padding == "valid" else tuple(conv.padding)
        if k != s or any(padding) or any(d != 1 for d in conv.dilation) or conv.groups != 1:
            raise MquantError(f"only patch convolutions (kernel == stride, no padding) can be quantized, got {conv}")
        return cls(k)

    def to_json(self) -> dict:
        return {"kernel": list(self.kernel)}

    def unfold(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """[B, C, *S] -> ([B, *n, C*prod(k)], n) with the channel-major order of weight.view(out, -1)."""
        dims = len(self.kernel)
        for d, k in enumerate(self.kernel):
            x = x.unfold(2 + d, k, k)  # [B, C, n_1.., k_1..]
        grid = tuple(x.shape[2 : 2 + dims])
        order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
        x = x.permute(order)
        return x.reshape(*x.shape[: 1 + dims], -1), grid

    @staticmethod
    def fold(y: torch.Tensor) -> torch.Tensor:
        """[B, *n, out] -> [B, out, *n]."""
        return y.movedim(-1, 1)


def transformed_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The full 2-D [rows, width] input a linear or patch conv multiplies with its weight, after
    any online input transform (for an RMS-split layer this still includes channel 0)."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        x, _ = PatchGeometry.of(module).unfold(x)
    transform = getattr(module, "input_transform", None)
    if transform is not None:
        x = transform(x)
    return x.reshape(-1, x.shape[-1])


def splits_channel0(module: nn.Module) -> bool:
    """Whether channel 0 of the (rotated) input runs on its own RMS branch (ALGORITHMS.md §6)."""
    return bool(getattr(module, "split_channel0", False))


def main_path(module: nn.Module, transformed: torch.Tensor) -> torch.Tensor:
    """The columns of a transformed input that the quantized main path multiplies: what GPTQ and
    the activation observers must see (all but channel 0 when RMS splits it off)."""
    return transformed[:, 1:] if splits_channel0(module) else transformed


def linear_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The main path's 2-D input for a raw module input `x`."""
    return main_path(module, transformed_input(module, x))


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The main path's [out, in] weight (without column 0 when RMS splits it off)."""
    w = module.weight.detach().reshape(module.weight.shape[0], -1)
    return w[:, 1:] if splits_channel0(module) else w


@torch.no_grad()
def observe_inputs(model: nn.Module, callbacks: dict[nn.Module, Callable[[torch.Tensor], None]],
                   batches: Iterable[dict], before_batch: Callable[[dict], None] | None = None) -> None:
    """Run `model` on every batch, handing each watched module's 2-D transformed input to its
    callback (statistics passes: SmoothQuant ranges, the RMS test, diagnostics)."""
    handles = [m.register_forward_pre_hook(lambda mod, args, fn=fn: fn(transformed_input(mod, args[0])))
               for m, fn in callbacks.items()]
    try:
        for batch in batches:
            if before_batch is not None:
                before_batch(batch)
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
