"""Known architecture families, looked up from a config's `architectures` or a family name."""

from __future__ import annotations

from mquant.errors import MquantError
from mquant.models import FAMILY_NAMES, llava, qwen2_vl
from mquant.models.spec import ModelFamily

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (qwen2_vl.FAMILY, llava.FAMILY)}
assert tuple(FAMILIES) == FAMILY_NAMES, "keep mquant.models.FAMILY_NAMES in sync"


def supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.architectures)})" for f in FAMILIES.values())


def family_by_name(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise MquantError(f"unknown model family '{name}'; supported families: {supported()}")
    return FAMILIES[name]


def family_for_architectures(architectures: list[str] | None) -> ModelFamily:
    for family in FAMILIES.values():
        if any(a in family.architectures for a in architectures or ()):
            return family
    raise MquantError(f"unsupported architecture {architectures or 'unknown'}; supported families: {supported()}")
