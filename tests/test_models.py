import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer

from mquant.errors import MquantError
from mquant.eval.registry import get_task
from mquant.models.registry import composition_for_architectures
from mquant.models.vlm import load_pretrained
from mquant.pipeline.calib import synthetic_samples
from mquant.pipeline.capture import capture_block_inputs, replay


def test_unknown_architecture_is_a_one_line_error():
    with pytest.raises(MquantError) as info:
        composition_for_architectures(["BertForMaskedLM"])
    assert "supported families: qwen2_vl" in str(info.value) and "llava" in str(info.value)
    assert "\n" not in str(info.value)


def test_load_pretrained_rejects_unknown_config(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(MquantError, match="unsupported architecture"):
        load_pretrained(tmp_path)


def test_tiny_model_loads_with_plain_transformers(tiny_dirs, family):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dirs[family])
    tok = AutoTokenizer.from_pretrained(tiny_dirs[family])
    assert type(model).__name__ == load_pretrained(tiny_dirs[family]).family.architectures[0]
    assert tok.decode(tok("Hello\n\n42!")["input_ids"]) == "Hello\n\n42!"


def test_placeholders_expand_to_visual_token_count(tiny_vlm):
    sample = synthetic_samples(4, 0)[3]  # a two-image prompt
    assert len(sample.images) == 2
    batch = tiny_vlm.encode([sample])
    _, counts = tiny_vlm.family.images.process(tiny_vlm.image_processor, sample.images, tiny_vlm.config)
    assert int((batch["input_ids"] == tiny_vlm.image_token_id).sum()) == sum(counts) > 0
    with torch.no_grad():  # the model itself checks features against placeholders
        assert torch.isfinite(tiny_vlm.model(**batch).logits).all()


def test_mismatched_image_markers_are_rejected(tiny_vlm):
    sample = get_task("digits").make_samples(1)[0]
    sample.images = sample.images * 2
    with pytest.raises(ValueError, match="2 images"):
        tiny_vlm.encode([sample])


@pytest.mark.parametrize("part", ["vision", "language"])
def test_hook_captured_replay_reproduces_hidden_states(tiny_vlm, part):
    """Replaying block i on the captured input of block i gives the input the model feeds block i+1."""
    segment = tiny_vlm.family.part(part).segments[-1]
    blocks = segment.blocks(tiny_vlm.model)
    assert len(blocks) >= 2
    batches = [tiny_vlm.encode([s], with_answer=True) for s in synthetic_samples(3, 1)]
    run = lambda b: tiny_vlm.model(**b)  # noqa: E731
    calls0 = capture_block_inputs(run, blocks[0][1], batches)
    calls1 = capture_block_inputs(run, blocks[1][1], batches)
    for c0, c1 in zip(calls0, calls1):
        out = replay(blocks[0][1], c0, "cpu")
        assert torch.allclose(out, c1.hidden, atol=1e-5, rtol=1e-5)
    # Replays are independent: after the block changes (as quantizing a group changes it), a replay
    # gives what the model now feeds block i+1 — a KV cache kept from the capture would hand it the
    # keys and values of the first replay instead.
    with torch.no_grad():
        for module in blocks[0][1].modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(1.5)
    for c0, c1 in zip(calls0, capture_block_inputs(run, blocks[1][1], batches)):
        assert torch.allclose(replay(blocks[0][1], c0, "cpu"), c1.hidden, atol=1e-5, rtol=1e-5)


def test_subword_tokenizer_round_trips_and_keeps_digits_single():
    from mquant.models.qwen2_vl import FAMILY
    from mquant.models.tokenizer import build_subword_tokenizer

    tok = build_subword_tokenizer(FAMILY.chat, ["the red circle is left of the blue square"] * 20 + ["12345 67"], 160)
    text = "The red circle, 90210 and an unseen word: xylophone!\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(tok(" circle", add_special_tokens=False)["input_ids"]) == 1  # a word with its space
    assert len(tok("90210", add_special_tokens=False)["input_ids"]) == 5


STRING_ONLY_TEMPLATE = (  # SmolLM2-Instruct's template: `+ message['content'] +` fails on a list
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_string_only_chat_template_gets_the_image_prompt_in_its_text(tiny_dirs):
    import warnings

    vlm = load_pretrained(tiny_dirs["llava"])
    vlm.tokenizer.chat_template = STRING_ONLY_TEMPLATE
    sample = get_task("digits").make_samples(1)[0]
    with pytest.warns(UserWarning, match="does not take image content"):
        ids = vlm.prompt_ids(sample, with_answer=False)
    text = vlm.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\n<image>\nWhich digit") and text.endswith("<|im_start|>assistant\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not per sample
        batch = vlm.encode([sample], with_answer=True)
    with torch.no_grad():
        assert torch.isfinite(vlm.model(**batch).logits).all()


def test_unusable_chat_template_falls_back_to_the_family_template(tiny_dirs):
    vlm = load_pretrained(tiny_dirs["llava"])
    vlm.tokenizer.chat_template = "{{ messages[0]['content'] + 1 }}"  # fails on any content
    sample = get_task("digits").make_samples(1)[0]
    with pytest.warns(UserWarning, match="using mquant's llava template"):
        ids = vlm.prompt_ids(sample, with_answer=False)
    assert vlm.tokenizer.decode(ids).startswith("USER: <image>\n\nWhich digit")
