"""Metrics against hand-computed values."""

import base64
import io

import pytest
from PIL import Image

from mquant.errors import MquantError
from mquant.eval import metrics as m
from mquant.eval.tsv import tsv_task


def test_vqa_normalize():
    assert m.vqa_normalize("The Two dogs!") == "2 dogs"
    assert m.vqa_normalize("It's 3.5 m.") == "its 3.5 m"  # decimal point kept, final period dropped
    assert m.vqa_normalize("dont") == m.vqa_normalize("don't") == "don't"
    assert m.vqa_normalize("  A  cat\n") == "cat"


def test_vqa_accuracy_hand_computed():
    # 10 answers, 2 of them "cat": each leave-one-out subset has 1 or 2 matches.
    answers = ["cat"] * 2 + ["dog"] * 8
    # subsets dropping a "cat" (2 of them): 1 match -> 1/3; dropping a "dog" (8): 2 matches -> 2/3
    assert m.vqa_accuracy("cat", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert m.vqa_accuracy("Dog.", answers) == pytest.approx(1.0)  # >= 3 matches everywhere
    assert m.vqa_accuracy("cow", answers) == 0.0
    assert m.vqa_accuracy("two", ["2"] * 10) == 1.0
    # exactly 3 matching answers: dropping one of them leaves 2 -> 2/3, otherwise 1.
    assert m.vqa_accuracy("x", ["x"] * 3 + ["y"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)


def test_anls_hand_computed():
    assert m.anls("paris", ["Paris"]) == 1.0
    assert m.anls("pariss", ["paris"]) == pytest.approx(1 - 1 / 6)
    assert m.anls("abcd", ["abxy"]) == 0.0  # distance 2/4 = 0.5 is not below the threshold
    assert m.anls("abcx", ["abcd"]) == pytest.approx(0.75)
    assert m.anls("", ["abc"]) == 0.0
    assert m.anls("  Two   words ", ["two words"]) == 1.0
    assert m.anls("rome", ["paris", "roma"]) == pytest.approx(0.75)  # best over answers
    assert m.levenshtein("kitten", "sitting") == 3


def test_exact_match_and_ocrbench():
    assert m.exact_match(" Yes. ", ["yes"]) == 1.0
    assert m.exact_match("yes it is", ["yes"]) == 0.0
    assert m.ocrbench_match("The sign says OPEN now", ["open"]) == 1.0
    assert m.ocrbench_match("clos", ["closed"]) == 0.0
    assert m.ocrbench_match("x^2 + 1", ["x^2+1"], math_mode=True) == 1.0
    assert m.ocrbench_match("X^2+1", ["x^2+1"], math_mode=True) == 0.0


def test_mme_acc_and_acc_plus():
    preds = ["yes", "no", "Yes, there is.", "yes", "maybe", "no"]
    answers = ["yes", "no", "yes", "no", "yes", "no"]
    images = [0, 0, 1, 1, 2, 2]
    s = m.mme_scores(preds, answers, images)
    assert s["acc"] == pytest.approx(4 / 6)  # "maybe" does not parse: wrong
    assert s["acc_plus"] == pytest.approx(1 / 3)  # only image 0 has both right


@pytest.mark.parametrize("text,answer", [
    ("yes", "yes"), ("No.", "no"), ("the red circle is at 1 3, so yes", "yes"),
    ("there is no red circle, so no", "no"), ("yes and no", None), ("not sure", None), ("", None),
    ("nothing", None),  # "no" must be a word, not a prefix
])
def test_yes_no_parse_needs_exactly_one_of_the_two_words(text, answer):
    assert m.parse_yes_no(text) == answer


@pytest.mark.parametrize("text,letter", [
    ("B", "B"), ("b", "B"), ("C.", "C"), ("A) blue", "A"), ("(D) four", "D"),
    ("The answer is C.", "C"), ("the answer is: b", "B"), ("blue", None), ("", None), ("E", None),
    ("I think A or B", None),
])
def test_option_letter_parsing(text, letter):
    assert m.parse_option_letter(text) == letter


def test_failed_parse_counts_as_wrong():
    assert m.option_accuracy("no idea", ["A"]) == 0.0
    assert m.option_accuracy("A.", ["A"]) == 1.0


CHOICES = {"A": "red circle", "B": "blue circle", "C": "3", "D": "Yellow"}


@pytest.mark.parametrize("text,letter", [
    ("red circle", "A"), ("It is the Blue Circle.", "B"), ("3", "C"), ("yellow", "D"),
    ("a red circle", "A"),  # the article is not the letter A
    ("B", "B"),  # a letter wins over texts
    ("circle", None),  # no option's whole text
    ("33", None), ("yellowish", None),  # whole words only
    ("red circle and blue circle", None),  # two options
    ("3 " * 40, None),  # longer than twice the options' text together (VLMEvalKit's guard)
])
def test_option_parse_falls_back_to_the_one_option_text_in_the_answer(text, letter):
    assert m.parse_option(text, CHOICES) == letter


def _b64_png(color):
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_tsv_loader(tmp_path):
    path = tmp_path / "mc.tsv"
    rows = ["index\timage\tquestion\tanswer\tA\tB",
            f"1\t{_b64_png('red')}\tWhat color?\tA\tred\tblue",
            "2\t1\tSame image, other question?\tB\tyes\tno"]
    path.write_text("\n".join(rows) + "\n")
    task = tsv_task(str(path))
    samples = task.make_samples(10)
    assert task.metric == "option_accuracy" and len(samples) == 2
    assert samples[1].images[0].getpixel((0, 0)) == (255, 0, 0)  # shared by index
    assert "A. red" in samples[0].text and "Answer with the option's letter" in samples[0].text
    assert task.aggregate(["A", "nonsense"], samples)["score"] == 0.5  # "nonsense" is not the option "no"
    assert task.aggregate(["red", "no"], samples)["score"] == 1.0  # option texts, read as VLMEvalKit does

    vqa = tmp_path / "vqa.tsv"
    vqa.write_text("index\timage\tquestion\tanswer\n" + f"1\t{_b64_png('blue')}\tWord?\t['stop', 'stop', 'halt']\n")
    t = tsv_task(str(vqa))
    assert t.metric == "vqa_accuracy" and t.make_samples(5)[0].answers == ["stop", "stop", "halt"]
    assert tsv_task(f"{vqa}#anls").metric == "anls"


def test_tsv_missing_column_names_it(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("index\timage\tanswer\n1\txx\ty\n")
    with pytest.raises(MquantError, match="missing required column 'question'"):
        tsv_task(str(path))
    with pytest.raises(MquantError, match="no such file"):
        tsv_task(str(tmp_path / "nope.tsv"))
    with pytest.raises(MquantError, match="unknown metric"):
        ok = tmp_path / "ok.tsv"
        ok.write_text(f"index\timage\tquestion\tanswer\n1\t{_b64_png('red')}\tq\ta\n")
        tsv_task(f"{ok}#bleu")
