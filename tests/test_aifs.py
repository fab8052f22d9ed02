"""AIFS (ALGORITHMS.md §8): visual tokens first at prefill, same function, same generations."""

import warnings

import pytest
import torch

import mquant
from mquant.modality.aifs import aifs_permutation, disable_aifs, enable_aifs, permuted_causal_mask
from mquant.models.vlm import load_pretrained
from mquant.pipeline.calib import synthetic_samples
from mquant.samples import IMAGE_MARKER, Sample


def test_permutation_and_mask_of_the_worked_example():
    # [t0, v1, v2, t3] -> [v1, v2, t0, t3]: π = (1, 2, 0, 3); rows are queries, columns keys.
    visual = torch.tensor([[False, True, True, False]])
    perm = aifs_permutation(visual, torch.ones_like(visual))
    assert perm.tolist() == [[1, 2, 0, 3]]
    allowed = permuted_causal_mask(perm, torch.ones_like(visual), torch.float32)[0, 0] == 0
    assert allowed.int().tolist() == [[1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 1, 0], [1, 1, 1, 1]]


def test_padding_stays_first_and_is_never_attended():
    visual = torch.tensor([[False, False, True, False, True]])
    valid = torch.tensor([[False, True, True, True, True]])
    perm = aifs_permutation(visual, valid)
    assert perm.tolist() == [[0, 2, 4, 1, 3]]
    allowed = permuted_causal_mask(perm, valid, torch.float32)[0, 0] == 0
    assert not allowed[1:, 0].any() and allowed[0, 0]  # the pad query sees only itself


def _prompts():
    single = synthetic_samples(2, 31)
    images = synthetic_samples(2, 32)
    two = Sample("two-images", [images[0].images[0], images[1].images[0]],
                 f"First: {IMAGE_MARKER} and then {IMAGE_MARKER}\nWhich has more shapes?", ["first"])
    return single + [two]


def _assert_same(reference: list, other: list, masks: list):
    for a, b, m in zip(reference, other, masks):
        diff = ((a - b) * m[..., None]).abs().max() / a.abs().max()
        assert diff.item() <= 1e-4


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "embedded"])
def test_aifs_preserves_logits_and_generations(model_dirs, family):
    vlm = load_pretrained(model_dirs[family])
    prompts = _prompts()
    batches = [vlm.encode([p], with_answer=True) for p in prompts] + [vlm.encode(prompts)]  # last: padded batch
    reference = [vlm.model(**b).logits for b in batches]
    generations = vlm.generate(prompts, 6)
    hooks = enable_aifs(vlm.model, vlm.family.language_model, vlm.image_token_id)
    permuted = [vlm.model(**b).logits for b in batches]
    # The single-image prompts' visual tokens are one block already: only the two-image prompt and
    # the padded batch are reordered.
    assert hooks.prefills == 2 and hooks.in_order == len(batches) - 2
    _assert_same(reference, permuted, [b["attention_mask"] for b in batches])
    assert vlm.generate(prompts, 6) == generations
    # Visual tokens sit in the middle of the text (chat template before, question after), and the
    # two-image prompt interleaves them: the permutation really moves rows.
    ids = batches[2]["input_ids"][0]
    assert aifs_permutation(ids[None] == vlm.image_token_id, torch.ones_like(ids[None], dtype=torch.bool)).ne(
        torch.arange(len(ids))).any()


def test_quantized_aifs_equals_the_per_row_lookup(tiny_dirs, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vlm = mquant.quantize(load_pretrained(tiny_dirs["qwen2_vl"]), "mquant-w4a8", "synthetic", num_samples=4,
                              progress=False)
    assert vlm.quant_info["report"]["transforms"]["aifs"]
    prompts = _prompts()
    batch = vlm.encode(prompts)
    with_aifs = vlm.model(**batch).logits
    generations = vlm.generate(prompts, 4)
    disable_aifs(vlm.model, vlm.family.language_model)
    lookup = vlm.model(**batch).logits
    _assert_same([lookup], [with_aifs], [batch["attention_mask"]])
    assert vlm.generate(prompts, 4) == generations
    mquant.save(vlm, tmp_path / "q")
    loaded = mquant.load(tmp_path / "q")  # AIFS comes back on with the recipe
    assert loaded.model.get_submodule(loaded.family.language_model)._mquant_aifs is not None
    assert torch.allclose(loaded.model(**batch).logits, with_aifs, atol=1e-5)
