"""Insert the online Hadamard R4 before every linear the family marks (down_proj, ViT fc2)."""

from __future__ import annotations

from torch import nn

from mquant.models.spec import ModelFamily
from mquant.runtime.online import OnlineHadamardLinear


def apply_online_hadamard(model: nn.Module, family: ModelFamily, parts: tuple[str, ...]) -> list[str]:
    """Replace each marked linear in `parts` by its OnlineHadamardLinear; returns their names."""
    done = []
    for part in family.parts:
        if part.name not in parts:
            continue
        for segment in part.segments:
            for block_name, block in segment.blocks(model):
                for name in segment.layout.online_hadamard:
                    block.set_submodule(name, OnlineHadamardLinear.fuse(block.get_submodule(name)))
                    done.append(f"{block_name}.{name}")
    return done
