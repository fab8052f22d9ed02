"""RMS (ALGORITHMS.md §6): the channel-0 outlier an exact Hadamard creates, its detection, the split."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from mquant.algorithms.rms import ChannelZeroStats, should_split, weight_outlier_fraction
from mquant.models.vlm import load_pretrained
from mquant.numerics.args import QuantArgs
from mquant.numerics.observers import ActivationObserver
from mquant.pipeline.calib import synthetic_samples
from mquant.runtime.online import OnlineHadamardLinear
from mquant.runtime.patches import linear_input, weight_2d


def _fc2(n: int = 448, out: int = 96, seed: int = 0) -> OnlineHadamardLinear:
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(n, out)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out, n, generator=g) * 0.05)
    return OnlineHadamardLinear.fuse(linear)


def test_gelu_mean_becomes_a_channel0_outlier_that_the_split_removes_from_the_range():
    n = 448  # 28·16: Paley II K = 28, as in Qwen2-7B's hidden size
    module = _fc2(n)
    x = F.gelu(torch.randn(512, n, generator=torch.Generator().manual_seed(1)))  # mean ≈ 0.28 > 0
    rotated = module.input_transform(x)
    assert rotated[:, 0].abs().mean() > 2.5 * rotated[:, 1:].abs().amax(dim=1).mean()
    assert torch.allclose(rotated[:, 0], x.sum(dim=1) / math.sqrt(n), atol=1e-4)  # sqrt(n)·mean
    stats = ChannelZeroStats()
    stats.observe(rotated)
    assert stats.outlier()

    args = QuantArgs(num_bits=8)
    full = ActivationObserver(args)
    full.observe(rotated)
    module.split_channel0 = True
    main = ActivationObserver(args)
    main.observe(linear_input(module, x))
    assert linear_input(module, x).shape[1] == weight_2d(module).shape[1] == n - 1
    # Without channel 0 the per-tensor range shrinks at least two-fold: the step the other channels get.
    assert main.compute()[0] * 2 < full.compute()[0]


def test_split_is_the_same_function():
    module = _fc2()
    x = F.gelu(torch.randn(7, 448))
    y = module(x)
    module.split_channel0 = True
    assert torch.allclose(module(x), y, atol=1e-5)


def test_weight_test_fires_on_nonzero_mean_rows_only():
    g = torch.Generator().manual_seed(0)
    n = 4096
    biased = torch.randn(64, n, generator=g) * 0.02 + 0.01  # the §6.1 illustration
    centred = torch.randn(64, n, generator=g) * 0.02
    H = OnlineHadamardLinear.fuse(torch.nn.Linear(n, 64, bias=False)).input_transform
    assert weight_outlier_fraction(H(biased)) > 0.9
    assert weight_outlier_fraction(H(centred)) < 0.05
    assert should_split(H(biased), None, 0.05)[0] and not should_split(H(centred), None, 0.05)[0]


@pytest.mark.parametrize("channel0", ["fp", "int8"])
def test_rms_recipe_splits_vision_layers_and_checkpoints_round_trip(tiny_dirs, tmp_path, channel0):
    import mquant
    from mquant.recipe import PRESETS, TransformScheme

    base = PRESETS["quarot-w4a8"]
    transforms = TransformScheme(**{**base.transforms.model_dump(), "rms": True, "rms_channel0": channel0})
    recipe = base.model_copy(update={"transforms": transforms, "name": "rms"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vlm = mquant.quantize(load_pretrained(tiny_dirs["qwen2_vl"]), recipe, "synthetic", num_samples=4,
                              progress=False)
    report = vlm.quant_info["report"]
    split = {l["name"] for l in report["layers"] if l["rms_split"]}
    vision_fc2 = {l["name"] for l in report["layers"] if l["part"] == "vision" and l["online_hadamard"]}
    assert vision_fc2 and vision_fc2 <= split
    assert set(report["transforms"]["rms"]) == {l["name"] for l in report["layers"] if l["online_hadamard"]}
    fc2 = vlm.model.model.visual.blocks[0].mlp.fc2
    assert fc2.channel0 == channel0 and fc2.in_features == fc2.input_transform.spec.order - 1
    mquant.save(vlm, tmp_path / "q")
    loaded = mquant.load(tmp_path / "q")
    sample = synthetic_samples(1, 3)[0]
    assert torch.equal(vlm.logits(sample), loaded.logits(sample))


def test_rms_requires_the_online_hadamard():
    from mquant.errors import MquantError
    from mquant.recipe import Recipe

    with pytest.raises(MquantError, match="rms .* needs online_hadamard"):
        Recipe.from_dict({"transforms": {"rms": True}})
