"""Connectors from a vision tower into a decoder, each described once (paths relative to their module)."""

from __future__ import annotations

from mquant.models.pieces import Connector, config_value
from mquant.models.spec import BlockLayout, Segment


def _llava_raw_readers(config) -> tuple[tuple[str, int], ...]:
    """LLaVA's projector reads tower hidden state(s) with no norm between (several, concatenated,
    when `vision_feature_layer` is a list)."""
    layers = config_value(config, "vision_feature_layer", -2)
    return (("linear_1", len(layers) if isinstance(layers, (list, tuple)) else 1),)


LLAVA_MLP = Connector(
    name="llava-mlp",
    segments=(Segment("", BlockLayout(groups=(("linear_1",), ("linear_2",)), residual_writers=("linear_2",)),
                      repeated=False),),
    raw_readers=_llava_raw_readers,
)

# Qwen2-VL's merger: ln_q over each visual token, 4 merged tokens side by side into mlp.0.
QWEN2_VL_MERGER = Connector(
    name="qwen2-vl-merger",
    segments=(Segment("", BlockLayout(groups=(("mlp.0",), ("mlp.2",)), norm_readers=(("ln_q", ("mlp.0",)),),
                                      residual_writers=("mlp.2",), norm_chunks=4), repeated=False),),
)
