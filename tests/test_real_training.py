"""What the real-weights model's training ships, on a tiny DINOv2 + Qwen2 LLaVA: adapters that merge
exactly, and the patch labels the cell loss uses."""

import pytest
import torch
from safetensors.torch import save_file

from mquant.errors import MquantError
from mquant.models.vlm import load_pretrained
from mquant.zoo.benchmark import generate
from mquant.zoo.real.build import merge_trained
from mquant.zoo.real.train import add_adapters, patch_cells


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_adapters_give_the_adapted_models_logits(tiny_dirs, tmp_path):
    adapted = load_pretrained(tiny_dirs["llava-dinov2"]).model
    plain = load_pretrained(tiny_dirs["llava-dinov2"]).model
    ids = torch.randint(0, 100, (1, 12))
    before = _logits(plain, ids)
    torch.manual_seed(0)
    adapters = add_adapters(adapted.model.language_model, rank=4, scale=2.0)
    assert adapters and all(name.startswith("language_model.layers.") for name in adapters)
    for adapter in adapters.values():
        adapter.lora_B.data.normal_(std=0.05)  # trained adapters are not zero
    projector = adapted.model.multi_modal_projector
    for p in projector.parameters():
        p.data.add_(0.01)
    state = {f"multi_modal_projector.{k}": v for k, v in projector.state_dict().items()}
    for name, a in adapters.items():
        state[f"{name}.lora_A"], state[f"{name}.lora_B"] = a.lora_A.data, a.lora_B.data
    save_file(state, tmp_path / "trained.safetensors", metadata={"lora_scale": "2.0"})
    merge_trained(plain, tmp_path / "trained.safetensors")
    expected, merged = _logits(adapted, ids), _logits(plain, ids)
    assert (expected - before).abs().max() > 1e-2  # the adapters do change the model ...
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)  # ... and the merge keeps that
    torch.testing.assert_close(plain.model.multi_modal_projector.linear_1.weight, projector.linear_1.weight)


def test_merge_refuses_tensors_it_does_not_know(tiny_dirs, tmp_path):
    model = load_pretrained(tiny_dirs["llava-dinov2"]).model
    state = {f"multi_modal_projector.{k}": v for k, v in model.model.multi_modal_projector.state_dict().items()}
    save_file({**state, "something.else": torch.zeros(1)}, tmp_path / "t.safetensors")
    with pytest.raises(MquantError, match="unexpected tensors"):
        merge_trained(model, tmp_path / "t.safetensors")


def test_patch_cells_label_each_patch_with_its_cell():
    sample = generate("digits", "train", 1)[0]
    cells = sample.meta["cells"][0]  # 4 x 4 cells of 28 px
    patches = patch_cells([sample])[0].meta["cells"][0]  # 8 x 8 patches of 14 px
    assert len(cells) == 16 and len(patches) == 64
    for r in range(8):
        for c in range(8):
            assert patches[r * 8 + c] == cells[(r // 2) * 4 + c // 2]
