"""The built-in benchmark: deterministic, disjoint splits, sensible samples."""

import pytest

from mquant.eval.registry import BENCHMARK, TASKS, calibration_source
from mquant.zoo import benchmark


@pytest.mark.parametrize("task", BENCHMARK)
def test_generation_is_deterministic(task):
    a, b = benchmark.generate(task, "test", 6), benchmark.generate(task, "test", 6)
    assert [s.fingerprint() for s in a] == [s.fingerprint() for s in b]
    assert [s.answers for s in a] == [s.answers for s in b]


def test_calibration_and_test_splits_are_disjoint():
    test = {s.fingerprint() for t in BENCHMARK for s in TASKS[t].make_samples(TASKS[t].default_limit)}
    calib = calibration_source("builtin", 256, 0)
    assert calib.source == "builtin:calib" and len(calib.samples) == 256
    assert not test & set(calib.fingerprints())
    train = {s.fingerprint() for t in BENCHMARK for s in benchmark.generate(t, "train", 300)}
    assert not test & train


def test_digit_pools_are_disjoint_real_images():
    pools = benchmark._digit_pools()
    assert not set(pools["train"]) & set(pools["test"]) and not set(pools["calib"]) & set(pools["test"])
    used = {s.meta["pool_index"] for s in benchmark.generate("digits", "test", 200)}
    assert used <= set(pools["test"])


def test_yesno_pairs_and_two_image_prompts():
    pairs = benchmark.generate("yesno", "test", 20)
    assert [s.answers[0] for s in pairs] == ["yes", "no"] * 10
    assert all(pairs[2 * k].images[0] is pairs[2 * k + 1].images[0] for k in range(10))
    compare = benchmark.generate("compare", "test", 10)
    assert all(len(s.images) == 2 and s.text.count("<image>") == 2 for s in compare)
    assert all(s.answers[0] == ("first" if s.meta["counts"][0] > s.meta["counts"][1] else "second") for s in compare)


def test_answers_are_balanced():
    choice = [s.answers[0] for s in benchmark.generate("choice", "test", 200)]
    assert all(choice.count(letter) > 25 for letter in "ABCD")
    compare = [s.answers[0] for s in benchmark.generate("compare", "test", 200)]
    assert 60 < compare.count("first") < 140


@pytest.mark.parametrize("task", BENCHMARK)
def test_every_image_has_cell_labels_and_a_caption(task):
    for sample in benchmark.generate(task, "train", 8):
        cells = sample.meta["cells"]
        assert len(cells) == len(sample.images) and all(len(c) == 16 and all(c) for c in cells)
        assert sample.meta["caption"]
        companion = benchmark.caption_sample(sample)
        assert companion.images == sample.images and companion.meta["cells"] == cells
        assert companion.text.count("<image>") == len(sample.images)


def test_choice_and_yes_no_are_trained_on_answers_their_parsers_read():
    from mquant.eval.metrics import parse_option, parse_option_letter, parse_yes_no

    for sample in benchmark.generate("choice", "train", 20):
        trained = benchmark.training_form(sample)
        assert trained.answers[0] == sample.meta["choices"][sample.answers[0]]  # the option's text
        assert parse_option_letter(trained.answers[0]) is None  # no letter: read by its text
        assert parse_option(trained.answers[0], sample.meta["choices"]) == sample.answers[0]
        assert (trained.text, trained.images) == (sample.text, sample.images)
    for sample in benchmark.generate("yesno", "train", 40):
        trained = benchmark.training_form(sample).answers[0]
        assert parse_yes_no(trained) == sample.answers[0] and trained.endswith(", so " + sample.answers[0])
    other = benchmark.generate("digits", "train", 1)[0]
    assert benchmark.training_form(other) is other


def test_yes_no_training_answers_say_what_the_scene_shows():
    """The shapes in reading order, the true count, or the shape that really is closest to the top (alone
    in its row of cells); a position question asks about a colour or shape, the wrong one that of
    another shape where the scene has one."""
    import re

    kinds = set()
    for sample in benchmark.generate("yesno", "train", 160):
        shapes = re.findall(r"(\w+) (\w+) at (\d) (\d)", sample.meta["caption"])  # reading order
        trained, truth = benchmark.training_form(sample).answers[0], sample.answers[0]
        if "closest to the top" in sample.text:
            top = shapes[0]
            assert sum(s[2] == top[2] for s in shapes) == 1  # decided between rows
            assert trained == f"the shape closest to the top is the {top[0]} {top[1]}, so {truth}"
            asked = re.search(r"closest to the top (?:an? )?(\w+)\?", sample.text).group(1)
            assert (asked in top[:2]) == (truth == "yes")
            kinds.add("position")
        elif "exactly" in sample.text:
            assert trained == f"there are {len(shapes)} shapes, so {truth}"
            kinds.add("count")
        else:
            assert trained == ", ".join(f"{c} {k}" for c, k, _, _ in shapes) + f", so {truth}"
            asked = tuple(re.search(r"Is there an? (\w+) (\w+)\?", sample.text).groups())
            assert (asked in [s[:2] for s in shapes]) == (truth == "yes")
            kinds.add("exist")
    assert kinds == {"position", "count", "exist"}


def test_cell_labels_name_what_the_cell_shows():
    for s in benchmark.generate("digits", "train", 5):
        assert [s.meta["cells"][0][k] for k in (5, 6, 9, 10)] == [[s.answers[0]]] * 4
    for s in benchmark.generate("textread", "train", 20):
        labels = {label for cell in s.meta["cells"][0] for label in cell}
        text = s.answers[0]
        assert (text in labels) if text.isalpha() else set(text) <= labels
    for s in benchmark.generate("yesno", "train", 10):
        labelled = [c for c in s.meta["cells"][0] if c != ["empty"]]
        assert all(len(c) == 2 and c[0] in benchmark.COLORS and c[1] in benchmark.SHAPES for c in labelled)
    for s in benchmark.generate("compare", "train", 10):
        counts = [sum(c == [c[0], "circle"] for c in cells) for cells in s.meta["cells"]]
        assert counts == s.meta["counts"]
