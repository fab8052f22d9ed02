"""Rotate a residual stream by an orthogonal Q (ALGORITHMS.md §3.1, §3.3): h -> hQ.

Exact when the stream is read only through weightless RMSNorms (fold the gains first) or linears,
and written only by linears and the embedding: readers take W ← WQ, writers W ← QᵀW and b ← Qᵀb,
the embedding E ← EQ. Which linears read and write the stream comes from the family's declarative
layouts. Fusions run in float64.
"""

from __future__ import annotations

import torch
from torch import nn

from mquant.models.spec import ModelFamily
from mquant.transforms.hadamard import dense_hadamard, hadamard_spec


def _signs_and_hadamard(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random signs s and the normalized Hadamard H/sqrt(n) of width n (float64)."""
    spec = hadamard_spec(n)
    if spec.padded:
        raise ValueError(f"width {n} has no Hadamard construction; a residual stream cannot be padded")
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1
    return signs, torch.tensor(dense_hadamard(spec), dtype=torch.float64) / n**0.5


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """Q = diag(s)·H/sqrt(n) with seeded random signs s (float64, orthogonal)."""
    signs, H = _signs_and_hadamard(n, seed)
    return signs[:, None] * H


def centred_random_hadamard(n: int, seed: int) -> torch.Tensor:
    """Q = H·diag(s)/sqrt(n) with seeded random column signs and s_0 = +1, so that the first column
    is 1/sqrt(n): the rotation an open LayerNorm stream needs (channel 0 of xQ is sqrt(n)·mean(x))."""
    signs, H = _signs_and_hadamard(n, seed)
    signs[0] = 1
    return H * signs


def vision_stream_rotation(family: ModelFamily, width: int, seed: int) -> torch.Tensor:
    """R1ᵥ: a random-sign Hadamard; an open LayerNorm stream's must keep 1/sqrt(d) as its first column."""
    return (random_hadamard if family.vision_stream_closed else centred_random_hadamard)(width, seed)


@torch.no_grad()
def rotate_reader(linear: nn.Module, Q: torch.Tensor, chunks: int = 1) -> None:
    """y = x Wᵀ reads x; with x -> xQ the weight becomes W Q (W (I_chunks ⊗ Q) for a reader of
    `chunks` stream vectors side by side)."""
    w = linear.weight.double()
    d = Q.shape[0]
    w = (w.reshape(w.shape[0], chunks, d) @ Q).reshape(w.shape)
    linear.weight.copy_(w.to(linear.weight.dtype))


@torch.no_grad()
def rotate_writer(writer: nn.Module, Q: torch.Tensor) -> None:
    """y = x Wᵀ + b is added to the stream; the stream is now yQ, so W ← QᵀW and b ← Qᵀb.
    Output channels are the first weight axis, so this covers patch convolutions too."""
    w = writer.weight.double()
    writer.weight.copy_((Q.T @ w.reshape(w.shape[0], -1)).reshape(w.shape).to(writer.weight.dtype))
    if writer.bias is not None:
        writer.bias.copy_((writer.bias.double() @ Q).to(writer.bias.dtype))


def _check_weightless(norm: nn.Module, name: str) -> None:
    weight = getattr(norm, "weight", None)
    if isinstance(norm, nn.LayerNorm) or (weight is not None and not torch.all(weight == 1)):
        raise ValueError(f"{name} still has a gain or is a LayerNorm: fold norm gains (LN2RN) before rotating")


def _readers(model: nn.Module, family: ModelFamily, part: str) -> list[tuple[nn.Module, int]]:
    """The linears (with their chunk count) behind the part's norms, which must be weightless."""
    readers = []
    for segment in family.part(part).segments:
        for block_name, block in segment.blocks(model):
            for norm, names in segment.layout.norm_readers:
                _check_weightless(block.get_submodule(norm), f"{block_name}.{norm}")
                readers += [(block.get_submodule(n), segment.layout.norm_chunks) for n in names]
    return readers


def _writers(model: nn.Module, family: ModelFamily, part: str) -> list[nn.Module]:
    return [block.get_submodule(n) for segment in family.part(part).segments
            for _, block in segment.blocks(model) for n in segment.layout.residual_writers]


@torch.no_grad()
def rotate_stream(model: nn.Module, family: ModelFamily, stream: str, Q: torch.Tensor) -> None:
    """Rotate the `language` (R1) or `vision` (R1ᵥ) residual stream by Q.

    Language: written by the embedding, the projector's output linear and the decoder layers' writers;
    read by the decoder layers' norms and the output head. Vision: written by the patch embedding,
    the additive embeddings (class token, position table: p ← pQ) and the blocks' writers; read by the
    blocks' norms, the projector's norm (token-merging readers take I_k ⊗ Q) and raw readers."""
    if stream == "language":
        readers = _readers(model, family, "language") + [(model.get_submodule(family.lm_head), 1)]
        writers = _writers(model, family, "language") + _writers(model, family, "projector")
        embed = model.get_input_embeddings()
        embed.weight.copy_((embed.weight.double() @ Q).to(embed.weight.dtype))
    elif stream == "vision":
        readers = _readers(model, family, "vision") + _readers(model, family, "projector")
        readers += [(model.get_submodule(name), chunks) for name, chunks in family.vision_raw_readers]
        writers = _writers(model, family, "vision")
        if not family.vision_stream_closed:
            start = _open_stream_start(model, family, Q)
            writers += [start] if start is not None else []
        for param in family.stream_embeddings(model, "vision"):
            param.copy_((param.double() @ Q).to(param.dtype))
    else:
        raise ValueError(f"unknown stream {stream!r}")
    for module, chunks in readers:
        rotate_reader(module, Q, chunks)
    for module in writers:
        rotate_writer(module, Q)


def _open_stream_start(model: nn.Module, family: ModelFamily, Q: torch.Tensor) -> nn.Module | None:
    """Prepare an open (centring-normed) vision stream for Q. Rotated by a Q whose first column is
    1/sqrt(d), channel 0 holds sqrt(d)·mean and its centring norms become masked RMSNorms; a stream
    already in that basis is rotated back by a Q whose first *row* is 1/sqrt(d) (the transpose of
    such a rotation), and its masked norms become centring norms again. Returns the stream-start
    writer, if the stream starts at a norm."""
    from mquant.transforms.ln2rn import CenteringNorm, MaskedRMSNorm, StreamStart

    start = model.get_submodule(family.vision_stream_start) if family.vision_stream_start else None
    if start is not None and not isinstance(start, StreamStart):
        raise ValueError("the vision stream still starts at a LayerNorm: apply LN2RN before rotating it")
    norms = [(block, name, block.get_submodule(name))
             for layout, _, block in family.blocks(model, ("vision", "projector")) for name, _ in layout.norm_readers]
    for _, name, norm in norms:
        if not isinstance(norm, (CenteringNorm, MaskedRMSNorm)):
            raise ValueError(f"{name} is a {type(norm).__name__}: apply LN2RN before rotating an open vision stream")
    d = Q.shape[0]
    uniform = torch.full((d,), d**-0.5, dtype=Q.dtype)
    masked = bool(norms) and all(isinstance(norm, MaskedRMSNorm) for _, _, norm in norms)
    if masked and torch.allclose(Q[0], uniform):
        replacement = CenteringNorm
    elif not masked and torch.allclose(Q[:, 0], uniform):
        replacement = MaskedRMSNorm
    else:
        raise ValueError("an open LayerNorm stream needs a rotation whose first column is 1/sqrt(d) "
                         "(or, to rotate it back, whose first row is)")
    for block, name, norm in norms:
        block.set_submodule(name, replacement(norm.eps))
    return start.writer if start is not None else None


def head_rotation(head_dim: int, seed: int | None) -> torch.Tensor:
    """The per-head rotation H_h: exact Walsh-Hadamard/Paley when `seed` is None, else random-sign."""
    if seed is not None:
        return random_hadamard(head_dim, seed)
    spec = hadamard_spec(head_dim)
    if spec.padded:
        raise ValueError(f"head dimension {head_dim} has no Hadamard construction")
    return torch.tensor(dense_hadamard(spec), dtype=torch.float64) / head_dim**0.5


@torch.no_grad()
def rotate_heads(block: nn.Module, layout, n_heads: int, n_kv_heads: int, H: torch.Tensor) -> None:
    """R2 (ALGORITHMS.md §3.6): every KV head's values become v·H_h and the output projection
    undoes it per query head. Softmax-weighted sums commute with H_h, so attention is unchanged;
    with GQA every head uses the same H_h."""
    d = H.shape[0]
    v = block.get_submodule(layout.v)
    rows = v.weight.shape[0]
    start = rows - n_kv_heads * d if layout.v_rows == "last-third" else 0
    w = v.weight.double()
    for g in range(n_kv_heads):
        sl = slice(start + g * d, start + (g + 1) * d)
        w[sl] = H.T @ w[sl]
        if v.bias is not None:
            v.bias[sl] = (v.bias[sl].double() @ H).to(v.bias.dtype)
    v.weight.copy_(w.to(v.weight.dtype))
    o = block.get_submodule(layout.o)
    wo = o.weight.double().reshape(o.weight.shape[0], n_heads, d) @ H
    o.weight.copy_(wo.reshape(o.weight.shape).to(o.weight.dtype))


def rotate_part_heads(model: nn.Module, family: ModelFamily, part: str, n_heads: int, n_kv_heads: int,
                      head_dim: int, seed: int | None = None) -> None:
    """R2 on every block of `part` that declares an attention layout."""
    H = head_rotation(head_dim, seed)
    for segment in family.part(part).segments:
        if segment.layout.attention is None:
            continue
        for _, block in segment.blocks(model):
            rotate_heads(block, segment.layout.attention, n_heads, n_kv_heads, H)


def rotate_language_heads(model: nn.Module, family: ModelFamily, seed: int | None = None) -> None:
    c = model.config.text_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rotate_part_heads(model, family, "language", c.num_attention_heads, c.num_key_value_heads, head_dim, seed)
