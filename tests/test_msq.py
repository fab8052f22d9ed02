"""MSQ (ALGORITHMS.md §7): two static activation scales per language-model input, by modality."""

import warnings

import pytest
import torch

import mquant
from mquant.errors import MquantError
from mquant.models.vlm import load_pretrained
from mquant.modality.msq import ModalityState
from mquant.numerics.args import QuantArgs
from mquant.numerics.grid import fake_quantize
from mquant.pipeline.calib import synthetic_samples
from mquant.recipe import Recipe
from mquant.runtime.qlinear import QuantLinear
from mquant.samples import Sample


def _quantize(path, recipe="mquant-w4a8", samples=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mquant.quantize(load_pretrained(path), recipe, samples or "synthetic", num_samples=4, progress=False)


def test_each_row_uses_its_modality_scale():
    torch.manual_seed(0)
    args = QuantArgs(num_bits=8)
    layer = QuantLinear.from_float(torch.nn.Linear(6, 3), None, args, (torch.tensor([0.01]), None),
                                   visual_qparams=(torch.tensor([0.2]), None))
    ids = torch.tensor([[5, 9, 9, 5, 9]])  # token 9 is the image placeholder
    layer.modality = ModalityState(image_token_id=9)
    layer.modality.set_from_input_ids(ids)
    x = torch.randn(1, 5, 6) * 3
    visual = (ids == 9)[..., None]
    expected = torch.where(visual, fake_quantize(x, torch.tensor([0.2]), None, args),
                           fake_quantize(x, torch.tensor([0.01]), None, args))
    assert torch.equal(layer.quantize_input(x), expected)
    layer.modality.set_from_input_ids(torch.tensor([[5]]))  # a decode step: one text token
    y = torch.randn(1, 1, 6)
    assert torch.equal(layer.quantize_input(y), fake_quantize(y, torch.tensor([0.01]), None, args))
    layer.modality.set_from_input_ids(ids)
    with pytest.raises(MquantError, match="does not cover"):
        layer.quantize_input(torch.randn(1, 4, 6))


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_mquant_recipe_reports_both_scales_and_reloads(tiny_dirs, family, tmp_path):
    vlm = _quantize(tiny_dirs[family])
    layers = vlm.quant_info["report"]["layers"]
    language = [l for l in layers if l["part"] == "language"]
    assert language and all(l["a_scales"]["visual"] > 0 and l["a_scales"]["text"] > 0 for l in language)
    assert any(l["a_scales"]["visual"] != l["a_scales"]["text"] for l in language)
    assert all(l["a_scales"]["text"] is None for l in layers if l["part"] != "language")
    mquant.save(vlm, tmp_path / "q")
    loaded = mquant.load(tmp_path / "q")
    samples = synthetic_samples(2, 21)
    assert torch.equal(vlm.logits(samples[0]), loaded.logits(samples[0]))
    assert vlm.generate(samples, 4) == loaded.generate(samples, 4)


def test_msq_differs_from_one_scale_per_layer(tiny_dirs):
    sample = synthetic_samples(1, 22)[0]
    msq = _quantize(tiny_dirs["qwen2_vl"]).logits(sample)
    single = Recipe.from_dict({**mquant.recipe.PRESETS["mquant-w4a8"].to_dict(), "name": "single",
                               "language": {**mquant.recipe.PRESETS["mquant-w4a8"].language.model_dump(),
                                            "modality_scales": False}})
    assert not torch.equal(msq, _quantize(tiny_dirs["qwen2_vl"], single).logits(sample))


def test_text_only_calibration_cannot_give_visual_scales(tiny_dirs):
    text_only = [Sample(f"t{i}", [], f"Say {i}.", [str(i)]) for i in range(3)]
    with pytest.raises(MquantError, match="never called on the calibration data"):
        _quantize(tiny_dirs["qwen2_vl"], samples=text_only)
    language_only = mquant.recipe.PRESETS["mquant-w4a8"].model_copy(update={"vision": None, "projector": None})
    with pytest.raises(MquantError, match="no visual rows"):
        _quantize(tiny_dirs["qwen2_vl"], language_only, samples=text_only)


@pytest.mark.parametrize("data, needle", [
    ({"vision": {"input_activations": {"num_bits": 8}, "modality_scales": True}}, "only the language model"),
    ({"language": {"input_activations": {"num_bits": 8, "strategy": "token", "dynamic": True},
                   "modality_scales": True}}, "need static input_activations"),
])
def test_invalid_modality_recipes(data, needle):
    with pytest.raises(MquantError, match=needle):
        Recipe.from_dict(data)
