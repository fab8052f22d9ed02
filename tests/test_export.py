"""Exports: compressed-tensors reloaded by plain transformers, and the native format."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import mquant
from mquant.errors import MquantError
from mquant.export.compressed import export_compressed, pack_int32, scheme_model
from mquant.models.vlm import load_pretrained
from mquant.pipeline.calib import synthetic_samples
from mquant.recipe import PRESETS

# Runs in a fresh interpreter that never imports mquant: what a serving user has.
RELOAD = """
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText
out, inputs, result = sys.argv[1:]
model = AutoModelForImageTextToText.from_pretrained(out).eval()
with torch.no_grad():
    logits = model(**load_file(inputs)).logits
assert not any(name.split(".")[0] == "mquant" for name in sys.modules), "mquant was imported"
save_file({"logits": logits.contiguous()}, result)
"""

MSQ_NO_TRANSFORMS = PRESETS["gptq-w4a8"].model_copy(update={
    "name": "gptq-w4a8-msq",
    "language": PRESETS["gptq-w4a8"].language.model_copy(update={"modality_scales": True})})


def _checkpoint(path, recipe, out):
    vlm = load_pretrained(path)
    mquant.quantize(vlm, recipe, "synthetic", num_samples=4, progress=False)
    return mquant.save(vlm, out)


CASES = [("qwen2_vl", "gptq-w4a8", "w8a8-static"), ("qwen2_vl", "gptq-w4a8", "w4a8-dynamic"),
         ("qwen2_vl", "gptq-w4a8", "w4a16"), ("qwen2_vl", "msq", "w8a8-static"),
         ("llava", "gptq-w4a8", "w8a8-static"), ("embedded", "gptq-w4a8", "w8a8-static"),
         # Structural transforms undone in floating point (online Hadamard, RMS, the rotated vision stream)
         ("qwen2_vl", "mquant-w4a8", "w8a8-static"), ("qwen2_vl", "quarot-w4a8", "w4a16"),
         ("embedded", "mquant-w4a8", "w8a8-static"),
         # Open vision streams rotated back: CLIP's (a stream-start norm) and DINOv2's (layer scales,
         # class token and position table)
         ("llava", "mquant-w4a8", "w8a8-static"), ("llava-dinov2", "mquant-w4a8", "w8a8-static"),
         ("qwen2_vl", "mquant-w8a8-w4a8", "w8a8-static")]  # two weight grids: two config groups


@pytest.mark.parametrize("model, recipe, scheme", CASES)
def test_transformers_reload_matches_the_exported_scheme(model_dirs, tmp_path, model, recipe, scheme):
    pytest.importorskip("compressed_tensors")
    ckpt = _checkpoint(model_dirs[model], MSQ_NO_TRANSFORMS if recipe == "msq" else recipe, tmp_path / "q")
    out = tmp_path / "ct"
    report = export_compressed(ckpt, out, scheme)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == report["format"]
    if recipe == "msq":
        assert any("MSQ" in w for w in report["warnings"])
    reference = scheme_model(ckpt, scheme)
    samples = [s for s in synthetic_samples(4, 9) if s.images][:1] + synthetic_samples(4, 9)[:1]
    for i, sample in enumerate(samples):
        batch = reference.encode([sample])
        save_file({k: v.contiguous() for k, v in batch.items()}, str(tmp_path / "inputs.safetensors"))
        proc = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(tmp_path / "inputs.safetensors"),
                               str(tmp_path / "logits.safetensors")], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        theirs = load_file(str(tmp_path / "logits.safetensors"))["logits"]
        with torch.no_grad():
            ours = reference.model(**batch).logits
        # One rounding boundary crossed by float noise moves one code step; hence a tolerance.
        assert (theirs - ours).abs().max() <= 2e-3 * ours.abs().max(), (i, (theirs - ours).abs().max())
    reloaded = mquant.load(out)  # mquant reads its exports too, as transformers runs them
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(**batch).logits, theirs, rtol=0, atol=1e-5)
    assert len(reloaded.generate(samples[:1], 3)) == 1  # generate works (decompressed before the vision call)


def test_pack_int32_is_offset_binary_lowest_bits_first():
    codes = torch.tensor([[-8, -7, 0, 7, 1, 2, 3, 4, -1]])
    packed = pack_int32(codes)
    assert packed.shape == (1, 2) and packed.dtype == torch.int32
    word = packed[0, 0].item() & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [0, 1, 8, 15, 9, 10, 11, 12]
    assert packed[0, 1].item() == 7 | (8 << 4) | (8 << 8) | (8 << 12) | (8 << 16) | (8 << 20) | (8 << 24) | (8 << 28) - 2**32


def test_unknown_scheme_is_refused_in_one_line(tiny_dirs, tmp_path):
    ckpt = _checkpoint(tiny_dirs["llava"], "gptq-w4a8", tmp_path / "q")
    with pytest.raises(MquantError, match="unknown scheme") as info:
        export_compressed(ckpt, tmp_path / "ct", "w2a2")
    assert "\n" not in str(info.value) and not (tmp_path / "ct").exists()


def test_undone_transforms_leave_the_quantized_set_and_stay_exact(tiny_dirs, tmp_path):
    from mquant.export.plain import unfused_weight
    from mquant.transforms.hadamard import dense_hadamard, hadamard_spec

    for n in (96, 80, 269):  # 269 is zero-padded to 272
        spec = hadamard_spec(n)
        w = torch.randn(5, spec.order, dtype=torch.float64)
        m = torch.tensor(dense_hadamard(spec), dtype=torch.float64) / spec.order**0.5
        torch.testing.assert_close(unfused_weight(w, spec), (w @ m.T)[:, :n])
    ckpt = _checkpoint(tiny_dirs["qwen2_vl"], "mquant-w4a8", tmp_path / "q")
    plain = scheme_model(ckpt, "w8a8-static")
    assert any(n.endswith("mlp.down_proj") for n in plain.floated)
    assert any(n.startswith("model.visual.blocks") for n in plain.floated)
    assert "model.visual.merger.mlp.2" not in plain.floated  # its weights do not see the vision stream
    fp_model = load_pretrained(tiny_dirs["qwen2_vl"]).model
    assert {type(m) for m in plain.model.modules()} <= {type(m) for m in fp_model.modules()} | {
        type(m) for m in plain.model.modules() if type(m).__name__ == "QuantLinear"}


def test_native_export_reproduces_outputs_and_rejects_damage(tiny_dirs, tmp_path):
    from mquant.cli import main

    ckpt = _checkpoint(tiny_dirs["qwen2_vl"], "mquant-w4a8", tmp_path / "q")
    assert main(["export", str(ckpt), "--format", "native", "--out", str(tmp_path / "n")]) == 0
    sample = synthetic_samples(3, 4)[1]
    assert torch.equal(mquant.load(ckpt).logits(sample), mquant.load(tmp_path / "n").logits(sample))
    weights = tmp_path / "n" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped bit pattern inside a tensor: the header still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(MquantError, match="corrupted") as info:
        mquant.load(tmp_path / "n")
    assert "\n" not in str(info.value)


def test_native_w4a8_checkpoint_is_small(model_dirs, tmp_path):
    from mquant.export.compressed import size_mb

    ckpt = _checkpoint(model_dirs["embedded"], "mquant-w4a8", tmp_path / "q")
    assert size_mb(ckpt) <= 0.30 * size_mb(model_dirs["embedded"])
