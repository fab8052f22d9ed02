"""Capture the inputs of a block with a forward pre-hook, and replay the block on them.

FX tracing is brittle on VLMs (ALGORITHMS.md §2.5); a pre-hook with kwargs sees exactly what the
model passes: hidden states plus every keyword argument (masks, rotary tables, cu_seqlens, ...).
Captured tensors live on CPU; a replay moves them to the block's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from transformers.cache_utils import Cache

from mquant.errors import MquantError

_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


class _Captured(Exception):
    """Raised by the hook to stop the model's forward once the block input is stored."""


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


@dataclass
class BlockCall:
    """One call of a block: positional args and keyword args, hidden states first."""

    args: tuple
    kwargs: dict

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> "BlockCall":
        if self.args:
            return BlockCall((hidden, *self.args[1:]), self.kwargs)
        return BlockCall(self.args, {**self.kwargs, "hidden_states": hidden})


def _store(args: tuple, kwargs: dict) -> BlockCall:
    # Replay runs each block standalone: no KV cache, whatever the argument is called (transformers
    # 5.x passes `cache=`, 4.x `past_key_values=`). A cache kept here would grow with every replay,
    # and the causal mask (aligned to the cache's start) would feed each later replay the keys and
    # values of the first one: stale, float ones, for every group after q/k/v.
    kwargs = {k: None if isinstance(v, Cache) or k in _CACHE_ARGUMENTS else v for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    to_cpu = lambda t: t.detach().to("cpu")  # noqa: E731
    return BlockCall(_map_tensors(args, to_cpu), _map_tensors(kwargs, to_cpu))


@torch.no_grad()
def capture_block_inputs(
    run_model: Callable[[dict], Any], block: nn.Module, batches: Iterable[dict]
) -> list[BlockCall]:
    """Run the model on each batch until `block` is entered; return what it was called with.

    Batches that never reach the block (text-only samples, for a vision block) are skipped."""
    calls: list[BlockCall] = []

    def hook(_module, args, kwargs):
        calls.append(_store(args, kwargs))
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                run_model(batch)
            except _Captured:
                continue
    finally:
        handle.remove()
    if not calls:
        raise MquantError(f"{type(block).__name__} was never called on the calibration data: it needs samples "
                          "that reach it (images, for the vision side)")
    return calls


def block_output(out: Any) -> torch.Tensor:
    """Hidden states out of a block, whatever it returns (tensor, tuple or ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out[0] if hasattr(out, "__getitem__") else out.last_hidden_state


@torch.no_grad()
def replay(block: nn.Module, call: BlockCall, device: torch.device | str) -> torch.Tensor:
    to_dev = lambda t: t.to(device)  # noqa: E731
    return block_output(block(*_map_tensors(call.args, to_dev), **_map_tensors(call.kwargs, to_dev)))
