"""Recipes: what to quantize, with which bits, granularity and algorithm — typed and serializable.

A recipe names a scheme per model part (vision encoder, projector, language model). A part set to
`null` stays in floating point. Recipes round-trip through YAML/JSON; unknown keys are errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import ValidationError, model_validator

from mquant.algorithms.gptq import GPTQConfig
from mquant.errors import MquantError
from mquant.numerics.args import QuantArgs, StrictModel

PARTS = ("vision", "projector", "language")


class WeightScheme(QuantArgs):
    """Weight quantization: integer grid (per-channel by default) plus the algorithm that fills it."""

    strategy: Literal["tensor", "channel", "group"] = "channel"
    num_bits: int = 4
    clip_search: bool = True
    algorithm: Literal["rtn", "gptq"] = "gptq"
    gptq: GPTQConfig = GPTQConfig()

    @model_validator(mode="after")
    def _weights_only(self) -> "WeightScheme":
        if self.dynamic:
            raise ValueError("weights cannot be dynamic")
        if self.strategy == "group" and self.algorithm == "gptq" and self.gptq.act_order and not self.gptq.static_groups:
            raise ValueError("act_order with groups requires gptq.static_groups=true")
        return self

    def grid(self) -> QuantArgs:
        """The bare integer-grid arguments (what a checkpoint or kernel needs to know)."""
        return QuantArgs(**{k: getattr(self, k) for k in QuantArgs.model_fields})


class PartScheme(StrictModel):
    """Scheme of one model part. `None` weights or activations mean floating point.

    `modality_scales` (MSQ, language model only): two static activation scales per layer input,
    one calibrated on visual-token rows and one on text rows.
    """

    weights: WeightScheme | None = None
    input_activations: QuantArgs | None = None
    modality_scales: bool = False

    @model_validator(mode="after")
    def _static_is_per_tensor(self) -> "PartScheme":
        a = self.input_activations
        if a is not None and not a.dynamic and a.strategy != "tensor":
            raise ValueError("static activation scales are per tensor (strategy 'tensor')")
        if a is not None and a.strategy in ("channel", "group"):
            raise ValueError("activations are quantized per tensor (static) or per token (dynamic)")
        if self.modality_scales and (a is None or a.dynamic):
            raise ValueError("modality_scales are static activation scales: they need static input_activations")
        return self


class TransformScheme(StrictModel):
    """Function-preserving transforms applied before quantization (all off by default).

    `ln2rn`: vision LayerNorms -> RMSNorms (needed to rotate the vision stream); `rotate`: fold norm
    gains, random-sign Hadamard R1 on the language stream and R1ᵥ on the vision stream, per-head R2;
    `online_hadamard`: R4 before down_proj and the vision MLP's second linear. `seed` picks the signs.
    `rms`: split channel 0 of the online-Hadamard input off the quantized path (every vision layer;
    language layers where the outlier test of ALGORITHMS.md §6.3 fires, with `rms_threshold` the
    fraction of outlier weight rows); `rms_channel0` says how that branch runs (`fp` or `int8`).
    `aifs`: at run time, reorder each prefill so visual tokens come first (same function; every
    language linear sees two contiguous row blocks).
    """

    ln2rn: bool = False
    rotate: bool = False
    online_hadamard: bool = False
    rms: bool = False
    rms_channel0: Literal["fp", "int8"] = "fp"
    rms_threshold: float = 0.05
    aifs: bool = False
    seed: int = 42

    @model_validator(mode="after")
    def _rms_needs_online_hadamard(self) -> "TransformScheme":
        if self.rms and not self.online_hadamard:
            raise ValueError("rms splits channel 0 of the online Hadamard: it needs online_hadamard=true")
        return self

    @property
    def any(self) -> bool:
        return self.ln2rn or self.rotate or self.online_hadamard or self.aifs


class SmoothQuantConfig(StrictModel):
    alpha: float = 0.5


class Recipe(StrictModel):
    name: str = "custom"
    description: str = ""
    version: int = 1
    vision: PartScheme | None = None
    projector: PartScheme | None = None
    language: PartScheme | None = None
    smoothquant: SmoothQuantConfig | None = None
    transforms: TransformScheme = TransformScheme()
    # Fake-quantize activations while propagating calibration data through already-quantized
    # blocks. Off by default, as in the reference GPTQ/MQuant code (ALGORITHMS.md §2.4).
    propagate_activation_quant: bool = False
    seed: int = 42

    @model_validator(mode="after")
    def _known_version(self) -> "Recipe":
        if self.version != 1:
            raise ValueError(f"unsupported recipe version {self.version} (this mquant reads version 1)")
        for part in ("vision", "projector"):
            if (scheme := getattr(self, part)) is not None and scheme.modality_scales:
                raise ValueError(f"{part}.modality_scales: only the language model sees two modalities")
        if self.smoothquant is not None and self.transforms.rotate:
            # Folding gains before rotating cancels the smoothing (ALGORITHMS.md §11.2).
            raise ValueError("smoothquant and transforms.rotate do not compose; choose one")
        return self

    def part(self, name: str) -> PartScheme | None:
        return getattr(self, name)

    def bits_label(self, part: str) -> str:
        scheme = self.part(part)
        if scheme is None:
            return "FP"
        w = f"W{scheme.weights.num_bits}" if scheme.weights else "W16"
        a = f"A{scheme.input_activations.num_bits}" if scheme.input_activations else "A16"
        return w + a

    # -- serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict, source: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise MquantError(f"{source}: a recipe must be a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise MquantError(f"{source}: {_one_line(exc)}") from None

    @classmethod
    def from_yaml(cls, text: str, source: str = "recipe") -> "Recipe":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise MquantError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
        return cls.from_dict(data, source)


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "recipe"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{where}'")
        else:
            parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


# -- presets ------------------------------------------------------------------------------------
def _w(bits: int, algorithm: str = "gptq") -> WeightScheme:
    return WeightScheme(num_bits=bits, algorithm=algorithm)


def _a_static(bits: int, observer: str = "minmax") -> QuantArgs:
    return QuantArgs(num_bits=bits, strategy="tensor", observer=observer)


def _a_dynamic(bits: int) -> QuantArgs:
    return QuantArgs(num_bits=bits, strategy="token", dynamic=True)


def _everywhere(name: str, description: str, weights, acts, **extra) -> Recipe:
    scheme = PartScheme(weights=weights, input_activations=acts)
    return Recipe(name=name, description=description, vision=scheme, projector=scheme, language=scheme, **extra)


_QUAROT = TransformScheme(ln2rn=True, rotate=True, online_hadamard=True)
_MQUANT = TransformScheme(ln2rn=True, rotate=True, online_hadamard=True, rms=True, aifs=True)


def _mquant(name: str, description: str, vision_bits: tuple[int, int], language_bits: tuple[int, int]) -> Recipe:
    """MQuant: LN2RN, rotations, online Hadamard, RMS, GPTQ, static activations with per-modality
    (MSQ) scales in the language model. A4 grids use the MSE clip search per modality."""
    def acts(bits: int) -> QuantArgs:
        return _a_static(bits, "mse" if bits <= 4 else "minmax")

    vision = PartScheme(weights=_w(vision_bits[0]), input_activations=acts(vision_bits[1]))
    language = PartScheme(weights=_w(language_bits[0]), input_activations=acts(language_bits[1]),
                          modality_scales=True)
    return Recipe(name=name, description=description, vision=vision, projector=vision, language=language,
                  transforms=_MQUANT)


def _build_presets() -> dict[str, Recipe]:
    presets = [
        _everywhere("rtn-w4a8", "RTN int4 per-channel weights, static per-tensor int8 activations",
                    _w(4, "rtn"), _a_static(8)),
        _everywhere("smoothquant-w4a8", "SmoothQuant (alpha 0.5) + RTN int4 weights, static int8 activations",
                    _w(4, "rtn"), _a_static(8), smoothquant=SmoothQuantConfig(alpha=0.5)),
        _everywhere("gptq-w4a16", "GPTQ int4 per-channel weights, floating-point activations", _w(4), None),
        _everywhere("gptq-w4a8", "GPTQ int4 weights, static per-tensor int8 activations", _w(4), _a_static(8)),
        _everywhere("gptq-w4a8-dynamic", "GPTQ int4 weights, dynamic per-token int8 activations",
                    _w(4), _a_dynamic(8)),
        _everywhere("gptq-w8a8", "GPTQ int8 weights, static per-tensor int8 activations", _w(8), _a_static(8)),
        _everywhere("gptq-w4a4", "GPTQ int4 weights, static per-tensor int4 activations (MSE clip)",
                    _w(4), _a_static(4, "mse")),
        _everywhere("quarot-w4a8", "Hadamard rotations + online Hadamard + GPTQ int4, one static int8 scale "
                    "per linear (the paper's static baseline)", _w(4), _a_static(8), transforms=_QUAROT),
        _everywhere("quarot-w4a8-dynamic", "Hadamard rotations + online Hadamard + GPTQ int4, dynamic "
                    "per-token int8 activations (QuaRot as published)", _w(4), _a_dynamic(8), transforms=_QUAROT),
        _everywhere("quarot-w4a4", "Hadamard rotations + online Hadamard + GPTQ int4, static int4 "
                    "activations (MSE clip)", _w(4), _a_static(4, "mse"), transforms=_QUAROT),
        _mquant("mquant-w4a8", "MQuant: LN2RN + rotations + online Hadamard + RMS + GPTQ int4, static int8 "
                "activations with per-modality scales in the language model", (4, 8), (4, 8)),
        _mquant("mquant-w8a8-w4a8", "MQuant with a W8A8 vision encoder and projector, W4A8 language model",
                (8, 8), (4, 8)),
        _mquant("mquant-w8a8", "MQuant at W8A8 everywhere", (8, 8), (8, 8)),
        _mquant("mquant-w4a4", "MQuant at W4A4: static int4 activations, MSE clip per modality", (4, 4), (4, 4)),
    ]
    return {r.name: r for r in presets}


PRESETS: dict[str, Recipe] = _build_presets()


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A preset by name, or a recipe file (.yaml/.yml/.json)."""
    key = str(name_or_path)
    if key in PRESETS:
        return PRESETS[key]
    path = Path(key)
    if not path.exists():
        raise MquantError(f"unknown recipe '{key}': not a preset ({', '.join(PRESETS)}) and no such file")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MquantError(f"{path}: not valid JSON ({exc})") from None
        return Recipe.from_dict(data, str(path))
    return Recipe.from_yaml(text, str(path))
