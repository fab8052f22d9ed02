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
