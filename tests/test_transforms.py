"""Function-preserving transforms: checked against the original model's logits and generations."""

import torch

from mquant.models.vlm import load_pretrained
from mquant.pipeline.calib import synthetic_samples
from mquant.transforms.fuse_norms import fold_norm_gains, is_rms_norm


def _assert_same_function(a, b, samples):
    for s in samples:
        la, lb = a.logits(s, with_answer=True), b.logits(s, with_answer=True)
        assert ((la - lb).abs().max() / la.abs().max()).item() <= 1e-4
    assert a.generate(samples, 6) == b.generate(samples, 6)


def test_folding_rms_norm_gains_preserves_the_model(tiny_dirs, family):
    reference = load_pretrained(tiny_dirs[family])
    folded = load_pretrained(tiny_dirs[family])
    n = fold_norm_gains(folded.model, folded.family)
    layers = len(folded.family.part("language").segments[0].blocks(folded.model))
    assert n == 2 * layers + 1
    for name, module in folded.model.named_modules():
        if is_rms_norm(module) and "language_model" in name:
            assert torch.all(module.weight == 1)
    _assert_same_function(reference, folded, synthetic_samples(4, 5))


def test_tied_head_is_untied_before_folding(tiny_dirs):
    vlm = load_pretrained(tiny_dirs["qwen2_vl"])
    embed = vlm.model.get_input_embeddings()
    vlm.model.lm_head.weight = embed.weight  # tie, as Qwen2-VL-2B does
    before = embed.weight.detach().clone()
    reference_logits = vlm.logits(synthetic_samples(1, 2)[0])
    fold_norm_gains(vlm.model, vlm.family)
    assert torch.equal(embed.weight, before)  # the embedding itself is untouched
    assert vlm.model.lm_head.weight is not embed.weight
    after = vlm.logits(synthetic_samples(1, 2)[0])
    assert ((after - reference_logits).abs().max() / reference_logits.abs().max()).item() <= 1e-4


def test_language_rotation_preserves_the_model(tiny_dirs, family):
    from mquant.transforms.rotate import random_hadamard, rotate_stream

    reference = load_pretrained(tiny_dirs[family])
    rotated = load_pretrained(tiny_dirs[family])
    fold_norm_gains(rotated.model, rotated.family)
    hidden = rotated.config.text_config.hidden_size
    Q = random_hadamard(hidden, seed=42)
    assert torch.allclose(Q @ Q.T, torch.eye(hidden, dtype=torch.float64), atol=1e-12)
    before = rotated.model.lm_head.weight.detach().clone()
    rotate_stream(rotated.model, rotated.family, "language", Q)
    assert not torch.allclose(before, rotated.model.lm_head.weight)  # the weights really moved
    _assert_same_function(reference, rotated, synthetic_samples(4, 6))


def test_rotation_requires_folded_norms(tiny_dirs):
    import pytest

    from mquant.transforms.rotate import random_hadamard, rotate_stream

    vlm = load_pretrained(tiny_dirs["llava"])
    with pytest.raises(ValueError, match="fold norm gains"):
        rotate_stream(vlm.model, vlm.family, "language", random_hadamard(vlm.config.text_config.hidden_size, 0))


def test_per_head_value_output_rotation_preserves_the_model(tiny_dirs, family):
    from mquant.transforms.rotate import rotate_language_heads

    reference = load_pretrained(tiny_dirs[family])
    rotated = load_pretrained(tiny_dirs[family])
    layer = rotated.model.model.language_model.layers[0]
    before = layer.self_attn.v_proj.weight.detach().clone()
    rotate_language_heads(rotated.model, rotated.family, seed=None)  # exact Hadamard of head_dim (GQA)
    assert not torch.allclose(before, layer.self_attn.v_proj.weight)
    _assert_same_function(reference, rotated, synthetic_samples(4, 8))


def test_online_hadamard_preserves_the_model_and_quantizes(tiny_dirs, family, tmp_path):
    import mquant
    from mquant.runtime.online import OnlineHadamardLinear
    from mquant.runtime.qlinear import QuantLinear
    from mquant.transforms.online import apply_online_hadamard

    reference = load_pretrained(tiny_dirs[family])
    vlm = load_pretrained(tiny_dirs[family])
    names = apply_online_hadamard(vlm.model, vlm.family, ("vision", "language"))
    assert len(names) == 4 and all(isinstance(vlm.model.get_submodule(n), OnlineHadamardLinear) for n in names)
    _assert_same_function(reference, vlm, synthetic_samples(4, 9))
    # GPTQ and the observers see the transformed input; the checkpoint keeps the transform.
    mquant.quantize(vlm, "gptq-w4a8", "synthetic", num_samples=4, progress=False)
    q = vlm.model.get_submodule(names[-1])
    assert isinstance(q, QuantLinear) and q.input_transform is not None
    mquant.save(vlm, tmp_path / "q")
    loaded = mquant.load(tmp_path / "q")
    sample = synthetic_samples(1, 10)[0]
    assert torch.equal(vlm.logits(sample), loaded.logits(sample))


def test_ln2rn_makes_the_vision_encoder_rms_normed_exactly(tiny_dirs):
    from mquant.transforms.ln2rn import WeightlessRMSNorm, ln2rn_vision

    reference = load_pretrained(tiny_dirs["qwen2_vl"])
    vlm = load_pretrained(tiny_dirs["qwen2_vl"])
    replaced = ln2rn_vision(vlm.model, vlm.family)
    blocks = len(vlm.model.model.visual.blocks)
    assert replaced == 2 * blocks + 1  # norm1, norm2 per block, and the merger's ln_q (chunk-wise)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in vlm.model.model.visual.modules())
    assert isinstance(vlm.model.model.visual.merger.ln_q, WeightlessRMSNorm)
    _assert_same_function(reference, vlm, synthetic_samples(4, 11))


def test_ln2rn_refuses_towers_it_cannot_transform_exactly(tiny_dirs):
    import dataclasses

    import pytest

    from mquant.transforms.ln2rn import ln2rn_vision

    vlm = load_pretrained(tiny_dirs["llava"])
    undeclared = dataclasses.replace(vlm.family, vision_stream_start=None)
    with pytest.raises(NotImplementedError, match="llava"):
        ln2rn_vision(vlm.model, undeclared)


def test_open_clip_stream_ln2rn_and_rotation_are_exact(tiny_dirs):
    """CLIP: the stream starts at pre_layrnorm and LLaVA's projector reads a hidden state raw
    (ALGORITHMS.md §5.3-5.4): centring norms, an FP stream-start writer, then masked RMSNorms."""
    import pytest

    from mquant.transforms.ln2rn import CenteringNorm, MaskedRMSNorm, StreamStart, ln2rn_vision
    from mquant.transforms.rotate import centred_random_hadamard, random_hadamard, rotate_stream

    reference = load_pretrained(tiny_dirs["llava"])
    vlm = load_pretrained(tiny_dirs["llava"])
    tower = vlm.model.model.vision_tower
    assert ln2rn_vision(vlm.model, vlm.family) == 2 * len(tower.encoder.layers)
    assert isinstance(tower.pre_layrnorm, StreamStart)
    assert isinstance(tower.encoder.layers[0].layer_norm1, CenteringNorm)
    _assert_same_function(reference, vlm, synthetic_samples(3, 16))
    width = vlm.config.vision_config.hidden_size
    with pytest.raises(ValueError, match="first column"):
        rotate_stream(vlm.model, vlm.family, "vision", random_hadamard(width, 5))
    Q = centred_random_hadamard(width, 5)
    assert torch.allclose(Q @ Q.T, torch.eye(width, dtype=torch.float64), atol=1e-12)
    before = vlm.model.model.multi_modal_projector.linear_1.weight.detach().clone()
    rotate_stream(vlm.model, vlm.family, "vision", Q)
    assert isinstance(tower.encoder.layers[0].layer_norm1, MaskedRMSNorm)
    assert not torch.allclose(before, vlm.model.model.multi_modal_projector.linear_1.weight)  # raw reader moved
    _assert_same_function(reference, vlm, synthetic_samples(3, 17))


def test_vision_rotation_after_ln2rn_preserves_the_model(tiny_dirs):
    from mquant.transforms.ln2rn import ln2rn_vision
    from mquant.transforms.rotate import random_hadamard, rotate_part_heads, rotate_stream

    reference = load_pretrained(tiny_dirs["qwen2_vl"])
    vlm = load_pretrained(tiny_dirs["qwen2_vl"])
    vc = vlm.config.vision_config
    with __import__("pytest").raises(ValueError, match="LN2RN"):
        rotate_stream(vlm.model, vlm.family, "vision", random_hadamard(vc.embed_dim, 1))
    ln2rn_vision(vlm.model, vlm.family)
    rotate_stream(vlm.model, vlm.family, "vision", random_hadamard(vc.embed_dim, 1))
    rotate_part_heads(vlm.model, vlm.family, "vision", vc.num_heads, vc.num_heads, vc.embed_dim // vc.num_heads, seed=2)
    fold_norm_gains(vlm.model, vlm.family)
    from mquant.transforms.rotate import rotate_language_heads

    rotate_stream(vlm.model, vlm.family, "language", random_hadamard(vlm.config.text_config.hidden_size, 3))
    rotate_language_heads(vlm.model, vlm.family)
    _assert_same_function(reference, vlm, synthetic_samples(4, 12))


def test_all_transforms_preserve_the_model(tiny_dirs, family):
    import warnings

    from mquant.recipe import TransformScheme
    from mquant.transforms.apply import apply_transforms

    reference = load_pretrained(tiny_dirs[family])
    vlm = load_pretrained(tiny_dirs[family])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = apply_transforms(vlm, TransformScheme(ln2rn=True, rotate=True, online_hadamard=True))
    assert info["rotated_streams"] == ["language", "vision"] and len(info["online_hadamard"]) == 4
    assert not caught and not info["warnings"] and info["ln2rn"]
    _assert_same_function(reference, vlm, synthetic_samples(4, 13))


def test_quarot_preset_quantizes_and_reloads(tiny_dirs, family, tmp_path):
    import warnings

    import mquant

    vlm = load_pretrained(tiny_dirs[family])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mquant.quantize(vlm, "quarot-w4a8", "synthetic", num_samples=4, progress=False)
    layers = vlm.quant_info["report"]["layers"]
    assert all(l["rotated"] for l in layers if l["part"] == "language")
    assert sum(l["online_hadamard"] for l in layers) == 4
    mquant.save(vlm, tmp_path / "q")
    loaded = mquant.load(tmp_path / "q")
    sample = synthetic_samples(2, 14)[1]
    assert torch.equal(vlm.logits(sample), loaded.logits(sample))
    assert vlm.generate([sample], 4) == loaded.generate([sample], 4)


def test_fp_part_keeps_its_transforms_through_a_checkpoint(tiny_dirs, tmp_path):
    import mquant
    from mquant.recipe import PRESETS
    from mquant.runtime.online import OnlineHadamardLinear

    recipe = PRESETS["quarot-w4a8"].model_copy(update={"vision": None, "name": "language-only"})
    vlm = mquant.quantize(load_pretrained(tiny_dirs["qwen2_vl"]), recipe, "synthetic", num_samples=2, progress=False)
    fc2 = vlm.model.model.visual.blocks[0].mlp.fc2
    assert isinstance(fc2, OnlineHadamardLinear)  # vision stays FP, still transformed
    mquant.save(vlm, tmp_path / "q")
    loaded = mquant.load(tmp_path / "q")
    sample = synthetic_samples(1, 15)[0]
    assert torch.equal(vlm.logits(sample), loaded.logits(sample))
