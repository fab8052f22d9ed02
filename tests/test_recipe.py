import json

import pytest

from mquant.errors import MquantError
from mquant.recipe import PRESETS, Recipe, load_recipe


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_yaml_and_json(name, tmp_path):
    recipe = PRESETS[name]
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe.to_dict()))
    assert load_recipe(path) == recipe
    yaml_path = tmp_path / "r.yaml"
    yaml_path.write_text(recipe.to_yaml())
    assert load_recipe(yaml_path) == recipe


def test_required_presets_exist():
    for name in ("rtn-w4a8", "smoothquant-w4a8", "gptq-w4a16", "gptq-w4a8", "gptq-w4a8-dynamic",
                 "gptq-w8a8", "gptq-w4a4"):
        assert name in PRESETS
    r = PRESETS["gptq-w4a8"]
    for part in ("vision", "projector", "language"):
        s = r.part(part)
        assert s.weights.num_bits == 4 and s.input_activations.num_bits == 8
        assert s.input_activations.strategy == "tensor" and not s.input_activations.dynamic
    assert PRESETS["gptq-w4a8-dynamic"].language.input_activations.strategy == "token"


def test_unknown_key_is_a_one_line_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nlanguage:\n  weights:\n    num_bitz: 4\n")
    with pytest.raises(MquantError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert "unknown key 'language.weights.num_bitz'" in msg and "\n" not in msg


@pytest.mark.parametrize("text,needle", [
    ("language:\n  weights:\n    num_bits: 12\n", "num_bits must be between 2 and 8"),
    ("language:\n  input_activations:\n    strategy: channel\n", "per tensor"),
    ("version: 7\n", "unsupported recipe version"),
    ("- a list\n", "must be a mapping"),
    ("language: [\n", "not valid YAML"),
])
def test_invalid_recipes(text, needle):
    with pytest.raises(MquantError, match=needle):
        Recipe.from_yaml(text)


def test_unknown_recipe_name():
    with pytest.raises(MquantError, match="unknown recipe 'nope'"):
        load_recipe("nope")
