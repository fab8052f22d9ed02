"""AIFS, Attention-Invariant Flexible Switching (ALGORITHMS.md §8).

At prefill every sequence is reordered once, before the first language-model layer: padding first
(left padding stays left), then all visual tokens, then all text tokens, each in its original
order (a stable partition π). Every token keeps its original position id (M-RoPE triples move with
their token) and the causal mask is permuted with it: M'_ij = [π(j) <= π(i)] and j is not padding.
Attention, norms and MLPs then compute P times the original hidden states, so the model's function
is unchanged, while every language-model linear sees its visual rows as one contiguous block and
its text rows as another: two static scales and a boundary index instead of a per-row lookup.

A prefill whose visual tokens already form one block (one sequence with one image) is left in its
order: the integer runtime lays the two scales over that block directly, and attention keeps its
causal fast path instead of the permuted dense mask (`in_order` counts these).

The KV cache stays in permuted order; decode tokens are text and come last, attend to every cached
entry and need no change. The final hidden states are put back in the original order (one gather),
so logits, losses and `generate` read the same positions as without AIFS.

Hooks on the declared language model do the work; `mquant.modality.msq.ModalityState` supplies the
visual rows (and, during the permuted prefill, is permuted too, for the MSQ layers).
"""

from __future__ import annotations

import torch
from torch import nn

from mquant.errors import MquantError
from mquant.modality.msq import ModalityState, contiguous_span, modality_state


def aifs_permutation(visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """π as a [B, L] index (new position i holds original token π[b, i]): padding, visual, text."""
    key = torch.where(~valid, 0, torch.where(visual, 1, 2))
    return torch.sort(key, dim=1, stable=True).indices


def permuted_causal_mask(perm: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive [B, 1, L, L] mask M' (0 where attention is allowed, dtype-min elsewhere)."""
    rows, cols = perm[:, :, None], perm[:, None, :]
    key_valid = valid.gather(1, perm)[:, None, :]
    allowed = (cols <= rows) & key_valid
    # A padding query may see itself only (its output is never used), so no row is fully masked.
    eye = torch.eye(perm.shape[1], dtype=torch.bool, device=perm.device)
    allowed |= eye & ~key_valid.transpose(1, 2)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=perm.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, i]] along dim 1 for x of shape [B, L, ...]."""
    return x.gather(1, index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:]))


class AIFSHooks:
    """The pre/post forward hooks on a language model that run its prefill in AIFS order."""

    def __init__(self, state: ModalityState) -> None:
        self.state = state
        self.perm: torch.Tensor | None = None
        self.original_visual: torch.Tensor | None = None
        self.prefills = 0  # how many forwards ran permuted (the tests read it)
        self.in_order = 0  # how many prefills needed no reordering

    def before(self, _module, args, kwargs):
        embeds, cache = kwargs.get("inputs_embeds"), kwargs.get("cache", kwargs.get("past_key_values"))
        self.perm = None
        if embeds is None or embeds.shape[1] < 2 or (cache is not None and cache.get_seq_length() > 0):
            return None  # decode, or a text-only call by ids: nothing to reorder
        batch, length = embeds.shape[:2]
        visual = self.state.visual
        if visual is None or visual.numel() != batch * length:
            raise MquantError("AIFS needs the visual-token mask of the prefill (run the model with input_ids)")
        visual = visual.reshape(batch, length).to(embeds.device)
        if not visual.any():
            return None
        if contiguous_span(visual) is not None:  # one block already: nothing to reorder
            self.in_order += 1
            return None
        mask = kwargs.get("attention_mask")
        if mask is None:
            valid = torch.ones_like(visual)
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape == visual.shape:
            valid = mask.bool()
        else:
            raise MquantError("AIFS builds its own attention mask; it accepts only a 2-D padding mask")
        perm = aifs_permutation(visual, valid)
        positions = kwargs.get("position_ids")
        if positions is None:  # what the text model would have used: 0..L-1 for every row
            positions = torch.arange(length, device=embeds.device).expand(batch, length)
        index = perm.expand(*positions.shape[:-2], batch, length)
        kwargs = {**kwargs, "inputs_embeds": _gather_rows(embeds, perm),
                  "position_ids": positions.gather(-1, index),
                  "attention_mask": permuted_causal_mask(perm, valid, embeds.dtype)}
        self.perm, self.original_visual = perm, self.state.visual
        self.state.visual = visual.gather(1, perm)
        self.state.visual_span = contiguous_span(self.state.visual)
        self.prefills += 1
        return args, kwargs

    def after(self, _module, args, kwargs, output):
        if self.perm is None:
            return output
        inverse = torch.argsort(self.perm, dim=1)
        output.last_hidden_state = _gather_rows(output.last_hidden_state, inverse)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(_gather_rows(h, inverse) for h in output.hidden_states)
        self.state.visual, self.perm = self.original_visual, None
        return output


def enable_aifs(model: nn.Module, language_model: str, image_token_id: int) -> AIFSHooks:
    """Run the prefill of `model`'s language model (a module path) in AIFS order. Idempotent."""
    lm = model.get_submodule(language_model)
    hooks = getattr(lm, "_mquant_aifs", None)
    if hooks is None:
        hooks = AIFSHooks(modality_state(model, image_token_id))
        hooks.handles = (lm.register_forward_pre_hook(hooks.before, with_kwargs=True),
                         lm.register_forward_hook(hooks.after, with_kwargs=True))
        lm._mquant_aifs = hooks
    return hooks


def disable_aifs(model: nn.Module, language_model: str) -> None:
    lm = model.get_submodule(language_model)
    hooks = getattr(lm, "_mquant_aifs", None)
    if hooks is not None:
        for handle in hooks.handles:
            handle.remove()
        del lm._mquant_aifs
