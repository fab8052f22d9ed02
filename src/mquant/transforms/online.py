"""Insert the online Hadamard R4 before every linear the family marks (down_proj, ViT fc2)."""

from __future__ import annotations

from torch import nn

from mquant.models.spec import ModelFamily
from mquant.runtime.online import OnlineHadamardLinear


def apply_online_hadamard(model: nn.Module, family: ModelFamily, parts: tuple[str, ...]) -> list[str]:
    """Replace each marked linear in `parts` by its OnlineHadamardLinear; returns their names."""
    done = []
    for layout, block_name, block in family.blocks(model, parts):
        for name in layout.online_hadamard:
            block.set_submodule(name, OnlineHadamardLinear.fuse(block.get_submodule(name)))
            done.append(f"{block_name}.{name}")
    return done
