"""Known architecture families, looked up from a checkpoint's config or a family name."""

from __future__ import annotations

from typing import Any

from mquant.errors import MquantError
from mquant.models import FAMILY_NAMES, llava, qwen2_vl
from mquant.models.pieces import Composition, config_value
from mquant.models.spec import ModelFamily

FAMILIES: dict[str, Composition] = {f.name: f for f in (qwen2_vl.COMPOSITION, llava.COMPOSITION)}
assert tuple(FAMILIES) == FAMILY_NAMES, "keep mquant.models.FAMILY_NAMES in sync"


def supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.architectures)})" for f in FAMILIES.values())


def family_by_name(name: str) -> Composition:
    if name not in FAMILIES:
        raise MquantError(f"unknown model family '{name}'; supported families: {supported()}")
    return FAMILIES[name]


def composition_for_architectures(architectures: list[str] | None) -> Composition:
    for family in FAMILIES.values():
        if any(a in family.architectures for a in architectures or ()):
            return family
    raise MquantError(f"unsupported architecture {architectures or 'unknown'}; supported families: {supported()}")


def family_for_config(config: Any) -> ModelFamily:
    """The family of a checkpoint from its config (a `PretrainedConfig` or the config.json dict):
    the architecture picks the composition, the vision/text model types its tower and decoder."""
    return composition_for_architectures(config_value(config, "architectures")).resolve(config)
