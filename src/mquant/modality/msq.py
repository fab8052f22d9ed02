"""MSQ, Modality-Specific Static Quantization (ALGORITHMS.md §7).

Every quantized linear input of the language model gets two static scales, one calibrated on the
rows of visual tokens and one on text rows; at run time each row uses its modality's scale. Visual
rows are the image-placeholder positions (filled with projector outputs); boundary markers, the
prompt and every decoded token are text. Weights are shared.

The modality of the rows in flight is kept in a `ModalityState` that a forward pre-hook on the
whole model fills from `input_ids` (prefill: the placeholders; decode: one text token per row).
Per-modality `QuantLinear`s read it; nothing is gathered or scattered, and no per-token statistic
is computed (the scale of a row is a lookup).
"""

from __future__ import annotations

import torch
from torch import nn

from mquant.errors import MquantError


class ModalityState:
    """Which rows of the current forward are visual: a bool mask over the leading dims [B, L]."""

    def __init__(self, image_token_id: int) -> None:
        self.image_token_id = image_token_id
        self._visual: torch.Tensor | None = None
        self._layout: tuple | None = None
        # Set by AIFS for the prefill it reorders: the flattened rows [start, stop) are all the
        # visual rows (None when a batch leaves several blocks).
        self.visual_span: tuple[int, int] | None = None

    @property
    def visual(self) -> torch.Tensor | None:
        return self._visual

    @visual.setter
    def visual(self, mask: torch.Tensor | None) -> None:
        self._visual, self._layout, self.visual_span = mask, None, None

    def set_from_input_ids(self, input_ids: torch.Tensor | None) -> None:
        self.visual = None if input_ids is None else input_ids == self.image_token_id

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The visual mask for the rows of `x` ([..., d]), as a [..., 1] bool tensor."""
        lead = x.shape[:-1]
        self._check_covers(lead.numel())
        return self.visual.to(x.device).reshape(*lead, 1)

    def _check_covers(self, rows: int) -> None:
        if self._visual is None:
            raise MquantError("per-modality activation scales need the token modality: run the model with input_ids")
        if self._visual.numel() != rows:
            raise MquantError(f"modality mask of shape {tuple(self._visual.shape)} does not cover {rows} rows")

    def row_layout(self, rows: int) -> tuple:
        """How the integer runtime lays the two scales over `rows` flattened rows (computed once per
        forward): ("text",) when no row is visual, ("block", start, stop) when the visual rows are
        one contiguous block (AIFS made them one, or a single image's tokens already are), otherwise
        ("rows", [rows, 1] bool mask)."""
        if self._layout is None or self._layout[0] != rows:
            self._check_covers(rows)
            span = self.visual_span or contiguous_span(self._visual)
            if span == (0, 0):
                layout = ("text",)
            elif span is not None:
                layout = ("block", *span)
            else:
                layout = ("rows", self._visual.reshape(rows, 1))
            self._layout = (rows, layout)
        return self._layout[1]


def contiguous_span(mask: torch.Tensor) -> tuple[int, int] | None:
    """(start, stop) when the True entries of the flattened `mask` are one contiguous run."""
    flat = mask.reshape(-1)
    idx = flat.nonzero().flatten()
    if idx.numel() == 0:
        return (0, 0)
    start, stop = int(idx[0]), int(idx[-1]) + 1
    return (start, stop) if stop - start == idx.numel() else None


def visual_rows(batch: dict, image_token_id: int) -> torch.Tensor:
    """The flattened visual-row mask of a batch (rows in [B·L] order, as a block sees them)."""
    return (batch["input_ids"] == image_token_id).reshape(-1)


def modality_state(model: nn.Module, image_token_id: int) -> ModalityState:
    """The model's modality state, created on first use with a pre-hook that fills it from the
    `input_ids` of every forward (prefill: the placeholders; decode: text)."""
    state = getattr(model, "_mquant_modality_state", None)
    if state is None:
        state = ModalityState(image_token_id)

        def hook(_module, args, kwargs):
            state.set_from_input_ids(kwargs.get("input_ids", args[0] if args else None))

        model.register_forward_pre_hook(hook, with_kwargs=True)
        model._mquant_modality_state = state
    return state


def attach_modality_state(model: nn.Module, image_token_id: int, layers: list[nn.Module]) -> ModalityState | None:
    """Give every per-modality layer in `layers` the model's state. Returns it (None without layers)."""
    if not layers:
        return None
    state = modality_state(model, image_token_id)
    for layer in layers:
        layer.modality = state
    return state


def per_modality_layers(model: nn.Module) -> list[nn.Module]:
    from mquant.runtime.qlinear import quant_linears

    return [m for _, m in quant_linears(model) if m.per_modality]
