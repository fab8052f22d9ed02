import json

import pytest
import torch
from torch import nn

import mquant
from mquant.errors import MquantError
from mquant.eval.runner import evaluate
from mquant.eval.registry import get_task
from mquant.models.vlm import load_pretrained
from mquant.pipeline.calib import synthetic_samples
from mquant.pipeline.smooth import smooth_model
from mquant.recipe import PRESETS
from mquant.runtime.guard import verify_quantized
from mquant.runtime.qlinear import QuantLinear, quant_linears

N_CALIB = 8


def _quantizable(vlm):
    """Every linear / patch conv inside the parts the family declares, by part."""
    names = {}
    for part in vlm.family.parts:
        for segment in part.segments:
            for block_name, _ in segment.blocks(vlm.model):
                for linear in segment.layout.linears:
                    names[f"{block_name}.{linear}"] = part.name
    return names


def _quantize(path, recipe="gptq-w4a8", n=N_CALIB):
    vlm = load_pretrained(path)
    return mquant.quantize(vlm, recipe, "synthetic", num_samples=n, progress=False)


def test_declared_linears_cover_the_model(tiny_vlm):
    declared = set(_quantizable(tiny_vlm))
    actual = {n for n, m in tiny_vlm.model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)) and n != "lm_head"}
    assert declared == actual


def test_report_lists_every_quantized_linear(tiny_dirs, family):
    fp = load_pretrained(tiny_dirs[family])
    expected = _quantizable(fp)
    q = _quantize(tiny_dirs[family])
    report = q.quant_info["report"]
    layers = {l["name"]: l for l in report["layers"]}
    assert set(layers) == set(expected)
    for name, layer in layers.items():
        assert layer["part"] == expected[name]
        assert (layer["w_bits"], layer["a_bits"], layer["dynamic"]) == (4, 8, False)
        assert layer["a_scales"]["visual"] > 0
        assert (layer["a_scales"]["text"] is None) == (layer["part"] != "language")
        assert 0 <= layer["weight_error"] < 0.5
        assert isinstance(q.model.get_submodule(name), QuantLinear)
    assert {l["part"] for l in layers.values()} == {"vision", "projector", "language"}
    assert report["calibration"]["num_samples"] == N_CALIB
    assert report["calibration"]["disjoint_from_eval"] is True
    json.dumps(report)  # serializable


def test_quantized_logits_differ_but_stay_close(tiny_dirs, family):
    fp = load_pretrained(tiny_dirs[family])
    samples = get_task("digits").make_samples(3)
    ref = [fp.logits(s) for s in samples]

    def rel_error(recipe):
        q = _quantize(tiny_dirs[family], recipe)
        return sum(((r - q.logits(s)).norm() / r.norm()).item() for r, s in zip(ref, samples)) / len(samples)

    w4a8, w8a8, rtn = rel_error("gptq-w4a8"), rel_error("gptq-w8a8"), rel_error("rtn-w4a8")
    assert 0 < w4a8 < 0.15
    assert 0 < w8a8 < w4a8  # more bits, closer to FP
    assert w4a8 < rtn  # GPTQ beats RTN end to end too


@pytest.mark.parametrize("recipe", sorted(PRESETS))
def test_every_preset_runs_and_activates_quantizers(tiny_dirs, recipe):
    q = _quantize(tiny_dirs["qwen2_vl"], recipe, n=4)
    layers = quant_linears(q.model)
    assert layers and all(m.act_quant_enabled for _, m in layers)
    scheme = PRESETS[recipe].language
    sample = get_task("digits").make_samples(1)[0]
    for _, m in layers:
        m.calls = 0
    q.logits(sample)
    assert all(m.calls > 0 for _, m in layers)
    if scheme.input_activations is None:
        assert all(m.act_args is None for _, m in layers)


def test_dynamic_activations_differ_from_static(tiny_dirs):
    sample = get_task("digits").make_samples(1)[0]
    static = _quantize(tiny_dirs["llava"], "gptq-w4a8").logits(sample)
    dynamic = _quantize(tiny_dirs["llava"], "gptq-w4a8-dynamic").logits(sample)
    assert not torch.equal(static, dynamic)


def test_same_seed_gives_bit_identical_checkpoints(tiny_dirs, family, tmp_path):
    for run in ("a", "b"):
        mquant.save(_quantize(tiny_dirs[family]), tmp_path / run)
    a, b = ((tmp_path / r / "model.safetensors").read_bytes() for r in "ab")
    assert a == b


def test_checkpoint_reload_reproduces_outputs(tiny_dirs, family, tmp_path):
    q = _quantize(tiny_dirs[family])
    mquant.save(q, tmp_path / "q")
    loaded = mquant.load(tmp_path / "q")
    sample = synthetic_samples(4, 7)[3]
    assert torch.equal(q.logits(sample), loaded.logits(sample))
    assert q.generate([sample], 4) == loaded.generate([sample], 4)
    packed = [k for k in __import__("safetensors.torch").torch.load_file(str(tmp_path / "q/model.safetensors"))
              if k.endswith("weight_packed")]
    assert len(packed) == len(quant_linears(q.model))


def test_checkpoint_errors_are_one_line(tiny_dirs, tmp_path):
    mquant.save(_quantize(tiny_dirs["qwen2_vl"], n=2), tmp_path / "q")
    ckpt = tmp_path / "q"
    manifest = json.loads((ckpt / "mquant_checkpoint.json").read_text())

    (ckpt / "mquant_checkpoint.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(MquantError, match="unsupported checkpoint version 99"):
        mquant.load(ckpt)
    (ckpt / "mquant_checkpoint.json").write_text(json.dumps(manifest))

    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MquantError, match="truncated") as info:
        mquant.load(ckpt)
    assert "\n" not in str(info.value)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(MquantError, match="missing model.safetensors"):
        mquant.load(ckpt)


def test_smoothquant_preserves_the_fp_function(tiny_dirs, family):
    fp = load_pretrained(tiny_dirs[family])
    smoothed = load_pretrained(tiny_dirs[family])
    samples = synthetic_samples(4, 3)
    batches = [smoothed.encode([s], with_answer=True) for s in samples]
    assert smooth_model(smoothed, batches, 0.5, ["vision", "projector", "language"]) > 0
    for s in samples:
        a, b = fp.logits(s, True), smoothed.logits(s, True)
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_guard_rejects_inactive_quantization(tiny_dirs):
    q = _quantize(tiny_dirs["qwen2_vl"], n=2)
    batch = q.encode(get_task("digits").make_samples(1))
    logits = q.model(**batch).logits
    with pytest.raises(MquantError, match="bit for bit"):
        verify_quantized(q.model, batch, logits)
    with pytest.raises(MquantError, match="no quantized layers"):
        fp = load_pretrained(tiny_dirs["qwen2_vl"])
        verify_quantized(fp.model, batch, logits)


def test_evaluation_refuses_calibration_samples(tiny_dirs, tmp_path):
    samples = get_task("digits").make_samples(3)
    lines = []
    for s in samples:
        s.images[0].save(tmp_path / f"{s.id.replace(':', '_')}.png")
        lines.append(json.dumps({"image": f"{s.id.replace(':', '_')}.png", "text": s.text, "answer": s.answers[0]}))
    (tmp_path / "calib.jsonl").write_text("\n".join(lines))
    q = mquant.quantize(load_pretrained(tiny_dirs["qwen2_vl"]), "gptq-w4a8", str(tmp_path), num_samples=3,
                        progress=False)
    assert q.quant_info["report"]["calibration"]["source"] == str(tmp_path)
    with pytest.raises(MquantError, match="used for calibration"):
        evaluate(q, ["digits"], limit=5, progress=False)
