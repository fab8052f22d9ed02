"""The embedded model's training script: cell targets line up with visual tokens; runs are seeded."""

import pytest
import torch

from mquant.models.qwen2_vl import FAMILY
from mquant.models.vlm import VLM
from mquant.samples import Sample
from mquant.zoo import train
from mquant.zoo.architecture import build_components


def test_cell_targets_line_up_with_the_visual_tokens_of_a_mixed_batch():
    config, tokenizer, processor = build_components()
    model = FAMILY.model_class(config).eval()
    vlm = VLM(model, tokenizer, processor, FAMILY, "embedded")
    samples = next(train.training_batches(seed=0, batch_size=24))
    assert {s.id.split(":")[0] for s in samples} == set(train.benchmark.GENERATORS)
    assert any(s.id.endswith(":caption") for s in samples) and any(len(s.images) == 2 for s in samples)
    captured = []
    model.model.visual.merger.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        model(**vlm.encode(samples, with_answer=True))
    probe = train.CellProbe(tokenizer, config.text_config.hidden_size)
    targets = probe.targets(samples, config.text_config.vocab_size)
    assert targets.shape[0] == captured[0].shape[0] == 16 * sum(len(s.images) for s in samples)
    assert torch.allclose(targets.sum(-1), torch.ones(targets.shape[0]))
    empty = probe.label_ids("empty")
    assert len(empty) == 2  # "empty" and " empty"
    assert (targets[:, empty].sum(-1) == 1).float().mean() > 0.3  # most cells of a scene are empty


def test_cell_targets_weigh_a_numbers_characters_by_their_order():
    config, tokenizer, _ = build_components()
    probe = train.CellProbe(tokenizer, config.text_config.hidden_size)
    number = Sample("n", [], "", [""], {"cells": [[["4", "7", "2"]]]})
    scene = Sample("s", [], "", [""], {"cells": [[["red", "circle"]]]})
    targets = probe.targets([number, scene], len(tokenizer))
    digits = [targets[0, probe.label_ids(ch)].sum().item() for ch in "472"]
    assert digits == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    words = [targets[1, probe.label_ids(word)].sum().item() for word in ("red", "circle")]
    assert words == pytest.approx([0.5, 0.5])


def test_character_slots_keep_order_and_repeats_and_skip_other_cells():
    probe = train.CharacterSlotProbe(8)
    cells = [["4", "7", "2"], ["red", "circle"], ["1", "1"], ["empty"], ["total", "5"]]
    targets = probe.targets([Sample("n", [], "", [""], {"cells": [cells]})])
    none, index = len(probe.ALPHABET), probe.ALPHABET.index
    assert targets.tolist() == [[index("4"), index("7"), index("2"), none], [-100] * 4,
                                [index("1"), index("1"), none, none], [-100] * 4, [index("5"), none, none, none]]
    tokens = torch.randn(len(cells), 8, requires_grad=True)
    probe.loss(tokens, [Sample("n", [], "", [""], {"cells": [cells]})]).backward()
    assert tokens.grad[1].abs().sum() == 0 and tokens.grad[0].abs().sum() > 0  # scene cells not supervised


def test_comparison_drills_are_text_only_yes_no_items_scored_on_the_decision_alone():
    config, tokenizer, processor = build_components()
    vlm = VLM(FAMILY.model_class(config).eval(), tokenizer, processor, FAMILY, "embedded")
    drills = next(train.comparison_drills(seed=0, batch_size=24))
    assert len(drills) == 24 and all(not s.images and "<image>" not in s.text for s in drills)
    assert {s.answers[0].rsplit(" ", 1)[1] for s in drills} == {"yes", "no"}
    assert all(any(words in s.text for s in drills) for words in ("Is there", "exactly", "closest to the top"))
    with torch.no_grad():
        loss = train.answer_loss(vlm, drills[:3], decision_only=True)
        by_hand = []
        for sample in drills[:3]:  # one at a time: no padding; ... decision, <|im_end|>, newline
            batch = vlm.encode([sample], with_answer=True)
            ids, logits = batch["input_ids"][0], vlm.model(**batch).logits[0]
            by_hand.append(torch.nn.functional.cross_entropy(logits[-4:-3], ids[-3:-2]))
            assert tokenizer.decode(ids[-3:-2]).strip() == sample.answers[0].rsplit(" ", 1)[1]
    assert loss.item() == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-4)


def test_training_fast_paths_compute_the_same_function():
    config, tokenizer, processor = build_components()
    model = FAMILY.model_class(config).eval()
    batch = VLM(model, tokenizer, processor, FAMILY, "embedded").encode(
        next(train.training_batches(seed=1, batch_size=12)), with_answer=True)
    with torch.no_grad():
        reference = model(**batch).logits
        with train.training_fast_paths(model):
            fast = model(**batch).logits
    assert torch.allclose(fast, reference, atol=1e-5, rtol=1e-5)
    assert all("forward" not in vars(block.attn) for block in model.model.visual.blocks)  # restored
    assert "forward" not in vars(model.model.visual.patch_embed)


def test_mrope_sections_let_the_language_model_tell_rows_and_columns_apart():
    """Rows and columns must each turn some rotary pair by a clearly visible angle per step, and a
    good share of pairs must stay almost still over a prompt for content-based attention."""
    from mquant.zoo.architecture import MROPE_SECTION

    config, _, _ = build_components()
    inv_freq = FAMILY.model_class(config).model.language_model.rotary_emb.inv_freq
    t, h, _ = MROPE_SECTION
    assert inv_freq[t : t + h].max() > 0.3 and inv_freq[t + h :].max() > 0.3
    assert (inv_freq < 0.06).sum() >= 8


def _train_tiny_run(out, monkeypatch):
    monkeypatch.setattr(train, "quick_eval", lambda vlm: {})  # the calib check generates; not needed here
    return train.train(out, steps=2, batch_size=4, lr=1e-4, seed=3, eval_every=0, vision_steps=2, drills=2)


def test_training_is_seeded_and_writes_a_loadable_model(tmp_path, monkeypatch):
    from mquant.api import load

    log = _train_tiny_run(tmp_path / "a", monkeypatch)
    assert len(log["vision_loss"]) == 1 and torch.isfinite(torch.tensor(log["loss"][0][1]))
    _train_tiny_run(tmp_path / "b", monkeypatch)
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    vlm = load(tmp_path / "a")
    assert vlm.model.lm_head.weight is vlm.model.get_input_embeddings().weight  # tied, as trained
