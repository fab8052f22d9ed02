"""LLaVA as a composition: every described vision tower x every described decoder, end to end.

Each tiny model is written once per module. The transforms are checked for exactness on every
combination; the two stream declarations that DINOv2 adds (layer scales, stream embeddings) are
checked by negative controls: remove the declaration and the same transforms must break the model.
"""

import dataclasses
import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import mquant
from mquant.errors import MquantError
from mquant.models.tiny import write_tiny
from mquant.models.vlm import load_pretrained
from mquant.pipeline.calib import synthetic_samples
from mquant.runtime.qlinear import QuantLinear
from mquant.transforms.fuse_norms import fold_layer_scales
from mquant.transforms.ln2rn import ln2rn_vision
from mquant.transforms.rotate import centred_random_hadamard, rotate_stream
from mquant.transforms.verify import verify_transforms

TOWERS = ["clip", "siglip", "dinov2", "dinov2-registers"]
DECODERS = ["llama", "qwen2", "mistral"]
ALL_TRANSFORMS = "ln2rn,rotate,online_hadamard,rms,aifs"

# What each tower is in transformers, and the tokens it puts beside the patches (known here, not
# read from mquant's descriptions, so that a wrong description shows up as a wrong count).
TOWER_CLASSES = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel", "dinov2": "Dinov2Model",
                 "dinov2-registers": "Dinov2WithRegistersModel"}
TOWER_MODEL_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model", "dinov2": "dinov2",
                     "dinov2-registers": "dinov2_with_registers"}
EXTRA_TOKENS = {"clip": 1, "siglip": 0, "dinov2": 1, "dinov2-registers": 1 + 2}  # class (+ 2 registers)
DECODER_CLASSES = {"llama": "LlamaModel", "qwen2": "Qwen2Model", "mistral": "MistralModel"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models are tiny: one intra-op thread is as fast, and immune to the OpenMP spin-waiting
    that makes small kernels crawl when other processes share the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """Every tower x decoder tiny LLaVA, written once: {(tower, decoder): path}."""
    root = tmp_path_factory.mktemp("compositions")
    dirs = {(t, d): write_tiny("llava", root / f"{t}-{d}", seed=0, tower=t, decoder=d)
            for t in TOWERS for d in DECODERS}
    return dirs


def test_tiny_register_tokens_are_not_zero(composed):
    """A zero token is unchanged by any rotation: `write_tiny` gives DINOv2's register tokens (zero
    at initialisation) values, so that forgetting to rotate them shows in the tests below."""
    vlm = load_pretrained(composed["dinov2-registers", "llama"])
    assert vlm.model.model.vision_tower.embeddings.register_tokens.abs().min() > 0


def _rel_diff(reference, vlm, samples) -> float:
    worst = 0.0
    for s in samples:
        ref, out = reference.logits(s, with_answer=True), vlm.logits(s, with_answer=True)
        worst = max(worst, ((out - ref).abs().max() / ref.abs().max()).item())
    return worst


def _with_vision_layout(family, segment_suffix: str, **changes):
    """`family` with the layout of its vision segment whose path ends in `segment_suffix` changed."""
    parts, hits = [], 0
    for part in family.parts:
        if part.name == "vision":
            segments = []
            for s in part.segments:
                if s.path.endswith(segment_suffix):
                    s = dataclasses.replace(s, layout=dataclasses.replace(s.layout, **changes))
                    hits += 1
                segments.append(s)
            part = dataclasses.replace(part, segments=tuple(segments))
        parts.append(part)
    assert hits == 1, f"no single vision segment ending in {segment_suffix!r}"
    return dataclasses.replace(family, parts=tuple(parts))


def _ln2rn_and_rotate_vision(vlm, family, seed=7):
    ln2rn_vision(vlm.model, family)
    width = vlm.config.vision_config.hidden_size
    rotate_stream(vlm.model, family, "vision", centred_random_hadamard(width, seed))


# -- 1. every combination loads, encodes and keeps its function under every transform ----------------

@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("tower", TOWERS)
def test_every_composition_loads_encodes_and_verifies(composed, tower, decoder):
    path = composed[tower, decoder]
    vlm = load_pretrained(path)
    assert vlm.family.pieces == f"{tower} + llava-mlp + {decoder}"
    assert type(vlm.model.model.vision_tower).__name__ == TOWER_CLASSES[tower]
    assert type(vlm.model.model.language_model).__name__ == DECODER_CLASSES[decoder]
    assert vlm.config.vision_config.model_type == TOWER_MODEL_TYPES[tower]
    assert vlm.config.text_config.model_type == decoder

    vc = vlm.config.vision_config
    single, double = synthetic_samples(4, 21)[0], synthetic_samples(4, 21)[3]
    assert len(single.images) == 1 and len(double.images) == 2
    for sample in (single, double):
        batch = vlm.encode([sample])
        height, width = batch["pixel_values"].shape[-2:]
        patches = (height // vc.patch_size) * (width // vc.patch_size)
        features = patches + EXTRA_TOKENS[tower] - (vlm.config.vision_feature_select_strategy == "default")
        placeholders = int((batch["input_ids"] == vlm.image_token_id).sum())
        assert placeholders == features * len(sample.images)
        with torch.no_grad():
            image_features = vlm.model.get_image_features(
                pixel_values=batch["pixel_values"], vision_feature_layer=vlm.config.vision_feature_layer,
                vision_feature_select_strategy=vlm.config.vision_feature_select_strategy).pooler_output
        assert sum(f.shape[0] for f in image_features) == placeholders
        logits = vlm.logits(sample)  # LLaVA itself checks placeholders against features here
        assert logits.shape[0] == batch["input_ids"].shape[1] and torch.isfinite(logits).all()

    result = verify_transforms(str(path), ALL_TRANSFORMS, synthetic_samples(3, 1), progress=False)
    assert result["transforms"] == ALL_TRANSFORMS.split(",")
    assert result["preserved"], result["steps"]
    assert result["max_rel_logit_diff"] <= 1e-4
    assert result["generation_identical"]
    assert all(step["max_rel_logit_diff"] <= 1e-4 and step["generation_identical"] for step in result["steps"])
    details = result["details"]
    assert "vision" in details["rotated_streams"] and "language" in details["rotated_streams"]
    assert details["ln2rn"] and not details["warnings"]
    assert any(name.startswith("model.vision_tower.") for name in details["online_hadamard"])


# -- 2. every tower quantizes end to end through the same engine --------------------------------------

def _assert_vision_quantized(vlm):
    online = 0
    for segment in vlm.family.part("vision").segments:
        for block_name, block in segment.blocks(vlm.model):
            for name in segment.layout.linears:
                module = block.get_submodule(name)
                assert isinstance(module, QuantLinear), f"{block_name}.{name} is a {type(module).__name__}"
                assert module.weight_args is not None and module.weight_args.num_bits == 4
                if name in segment.layout.online_hadamard:
                    assert module.input_transform is not None, f"{block_name}.{name} lost its online Hadamard"
                    online += 1
    assert online == vlm.config.vision_config.num_hidden_layers  # every block's fc2


def _assert_reloads_identically(vlm, out):
    mquant.save(vlm, out)
    loaded = mquant.load(out)
    _assert_vision_quantized(loaded)
    samples = synthetic_samples(4, 31)
    for sample in (samples[0], samples[3]):
        assert torch.equal(vlm.logits(sample), loaded.logits(sample))
    assert vlm.generate(samples[:2], 4) == loaded.generate(samples[:2], 4)


@pytest.mark.parametrize("tower", TOWERS)
def test_every_tower_quantizes_with_mquant_w4a8_and_reloads(composed, tower, tmp_path):
    path = composed[tower, "llama"]
    fp = load_pretrained(path)
    vlm = load_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mquant.quantize(vlm, "mquant-w4a8", "synthetic", num_samples=4, progress=False)
    report = vlm.quant_info["report"]
    assert report["transforms"]["rotated_streams"] == ["language", "vision"]
    vision_layers = [l for l in report["layers"] if l["part"] == "vision"]
    assert vision_layers and all(l["rotated"] and (l["w_bits"], l["a_bits"]) == (4, 8) for l in vision_layers)
    assert sum(l["online_hadamard"] for l in vision_layers) == vlm.config.vision_config.num_hidden_layers
    _assert_vision_quantized(vlm)
    sample = synthetic_samples(1, 32)[0]
    assert not torch.equal(vlm.logits(sample), fp.logits(sample))  # the quantizers really run
    _assert_reloads_identically(vlm, tmp_path / "q")


@pytest.mark.parametrize(("tower", "decoder"), [("dinov2", "qwen2"), ("siglip", "mistral"),
                                                ("dinov2-registers", "mistral"), ("clip", "qwen2")])
def test_other_decoders_quantize_with_gptq_w4a8_and_reload(composed, tower, decoder, tmp_path):
    vlm = mquant.quantize(load_pretrained(composed[tower, decoder]), "gptq-w4a8", "synthetic", num_samples=4,
                          progress=False)
    layers = vlm.quant_info["report"]["layers"]
    assert {l["part"] for l in layers} == {"vision", "projector", "language"}
    for segment in vlm.family.part("vision").segments:
        for block_name, block in segment.blocks(vlm.model):
            for name in segment.layout.linears:
                assert isinstance(block.get_submodule(name), QuantLinear), f"{block_name}.{name}"
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert isinstance(vlm.model.model.language_model.layers[0].self_attn.get_submodule(name), QuantLinear)
    mquant.save(vlm, tmp_path / "q")
    loaded = mquant.load(tmp_path / "q")
    assert type(loaded.model.model.language_model).__name__ == DECODER_CLASSES[decoder]
    for sample in synthetic_samples(2, 33):
        assert torch.equal(vlm.logits(sample), loaded.logits(sample))


# -- 3. DINOv2 layer scales ------------------------------------------------------------------------

@pytest.mark.parametrize("tower", ["dinov2", "dinov2-registers"])
def test_layer_scale_folding_is_exact_and_necessary(composed, tower):
    path = composed[tower, "llama"]
    samples = synthetic_samples(3, 41)
    reference = load_pretrained(path)
    layers = reference.model.model.vision_tower.encoder.layer
    scales = [s for layer in layers for s in (layer.layer_scale1.lambda1, layer.layer_scale2.lambda1)]
    assert all(not torch.allclose(s, torch.ones_like(s), atol=1e-2) for s in scales)  # not trivially 1

    folded = load_pretrained(path)
    fc2 = folded.model.model.vision_tower.encoder.layer[0].mlp.fc2.weight.detach().clone()
    assert fold_layer_scales(folded.model, folded.family) == 2 * len(layers)
    for layer in folded.model.model.vision_tower.encoder.layer:
        assert torch.all(layer.layer_scale1.lambda1 == 1) and torch.all(layer.layer_scale2.lambda1 == 1)
    assert not torch.allclose(fc2, folded.model.model.vision_tower.encoder.layer[0].mlp.fc2.weight)
    assert _rel_diff(reference, folded, samples) <= 1e-4

    # With the real family, LN2RN (which folds the scales first) and the vision rotation are exact ...
    exact = load_pretrained(path)
    _ln2rn_and_rotate_vision(exact, exact.family)
    assert _rel_diff(reference, exact, samples) <= 1e-4
    # ... and without the layer-scale declaration the very same transforms change the model.
    undeclared = load_pretrained(path)
    assert undeclared.family.part("vision").segments[1].layout.layer_scales
    family = _with_vision_layout(undeclared.family, "encoder.layer", layer_scales=())
    _ln2rn_and_rotate_vision(undeclared, family)
    assert not torch.all(undeclared.model.model.vision_tower.encoder.layer[0].layer_scale1.lambda1 == 1)
    assert _rel_diff(reference, undeclared, samples) > 1e-3  # > 10x the tolerance


# -- 4. DINOv2's stream embeddings (class/register tokens, interpolated position table) ---------------

@pytest.mark.parametrize("tower", ["dinov2", "dinov2-registers"])
def test_stream_embeddings_must_be_rotated(composed, tower):
    path = composed[tower, "llama"]
    samples = synthetic_samples(3, 51)
    reference = load_pretrained(path)
    vc = reference.config.vision_config
    embeddings = reference.model.model.vision_tower.embeddings
    # The tiny model's position table is for 3x3 patches; its images are 2x2: interpolation runs.
    assert (vc.image_size, vc.patch_size) == (42, 14)
    assert embeddings.position_embeddings.shape == (1, 1 + 9, vc.hidden_size)
    pixel_values = reference.encode([samples[0]])["pixel_values"]
    assert pixel_values.shape[-2:] == (28, 28)
    seen = []
    original = embeddings.interpolate_pos_encoding

    def spy(x, height, width):
        out = original(x, height, width)
        seen.append(out.shape)
        return out

    embeddings.interpolate_pos_encoding = spy
    try:
        reference.logits(samples[0])
    finally:
        del embeddings.interpolate_pos_encoding
    assert seen == [(1, 1 + 4, vc.hidden_size)]

    exact = load_pretrained(path)
    declared = exact.family.part("vision").segments[0].layout.stream_embeddings
    assert "position_embeddings" in declared and "cls_token" in declared
    assert ("register_tokens" in declared) == (tower == "dinov2-registers")
    table = exact.model.model.vision_tower.embeddings.position_embeddings.detach().clone()
    _ln2rn_and_rotate_vision(exact, exact.family)
    assert not torch.allclose(table, exact.model.model.vision_tower.embeddings.position_embeddings)
    assert _rel_diff(reference, exact, samples) <= 1e-4

    broken = load_pretrained(path)
    family = _with_vision_layout(broken.family, "embeddings", stream_embeddings=())
    assert family.stream_embeddings(broken.model, "vision") == []
    _ln2rn_and_rotate_vision(broken, family)
    assert torch.equal(table, broken.model.model.vision_tower.embeddings.position_embeddings)
    assert _rel_diff(reference, broken, samples) > 1e-3


def test_register_tokens_must_be_rotated(composed):
    """Dropping only `register_tokens` from the declaration breaks the rotated DINOv2-registers."""
    path = composed["dinov2-registers", "llama"]
    samples = synthetic_samples(3, 52)
    reference = load_pretrained(path)
    registers = reference.model.model.vision_tower.embeddings.register_tokens
    assert registers.shape == (1, 2, reference.config.vision_config.hidden_size) and registers.abs().min() > 0
    broken = load_pretrained(path)
    declared = broken.family.part("vision").segments[0].layout.stream_embeddings
    family = _with_vision_layout(broken.family, "embeddings",
                                 stream_embeddings=tuple(n for n in declared if n != "register_tokens"))
    assert len(family.stream_embeddings(broken.model, "vision")) == len(declared) - 1
    _ln2rn_and_rotate_vision(broken, family)
    assert _rel_diff(reference, broken, samples) > 1e-3


# -- 5. undescribed pieces are one-line errors ------------------------------------------------------

def _edit_config(src, dst, edit):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _unknown_tower(config):
    config["vision_config"]["model_type"] = "beit"


def _unknown_decoder(config):
    config["text_config"]["model_type"] = "gpt2"


def _swiglu(config):
    config["vision_config"]["use_swiglu_ffn"] = True


BAD_CONFIGS = {
    # name: (source model, edit, what the message must contain)
    "beit": (("clip", "llama"), _unknown_tower,
             ["vision tower", "'beit'", "clip_vision_model", "siglip_vision_model", "dinov2", "dinov2_with_registers"]),
    "gpt2": (("siglip", "qwen2"), _unknown_decoder, ["decoder", "'gpt2'", "llama", "qwen2", "mistral"]),
    "swiglu": (("dinov2", "llama"), _swiglu, ["dinov2", "SwiGLU"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_undescribed_pieces_are_one_line_errors(composed, case, tmp_path):
    source, edit, needles = BAD_CONFIGS[case]
    bad = _edit_config(composed[source], tmp_path / case, edit)
    with pytest.raises(MquantError) as caught:
        load_pretrained(bad)
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_undescribed_pieces_by_name_are_one_line_errors(tmp_path):
    for kwargs, needles in (({"tower": "beit"}, ["beit", *TOWERS]), ({"decoder": "gpt2"}, ["gpt2", *DECODERS])):
        with pytest.raises(MquantError) as caught:
            write_tiny("llava", tmp_path / "x", **kwargs)
        assert "\n" not in str(caught.value) and all(n in str(caught.value) for n in needles), str(caught.value)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_cli_quantize_reports_undescribed_pieces_in_one_line(composed, case, tmp_path):
    source, edit, needles = BAD_CONFIGS[case]
    bad = _edit_config(composed[source], tmp_path / case, edit)
    proc = subprocess.run([sys.executable, "-m", "mquant", "quantize", str(bad), "--recipe", "gptq-w4a8",
                           "--out", str(tmp_path / "out"), "--num-calib", "2"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "it/s]" not in l]
    assert len(lines) == 1 and lines[0].startswith("mquant: error:"), proc.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
