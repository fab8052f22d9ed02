"""Answer metrics of the benchmarks the MQuant paper reports (ALGORITHMS.md §12).

Each per-question metric maps (prediction, reference answers) to a score in [0, 1].
"""

from __future__ import annotations

import re

# -- VQA accuracy (TextVQA) ---------------------------------------------------------------------------
_CONTRACTIONS = {
    "dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
    "wont": "won't", "didnt": "didn't", "im": "i'm", "ive": "i've", "youre": "you're", "thats": "that's",
    "whats": "what's", "wasnt": "wasn't", "werent": "weren't", "couldnt": "couldn't", "shouldnt": "shouldn't",
    "wouldnt": "wouldn't", "hasnt": "hasn't", "havent": "haven't", "hes": "he's", "shes": "she's",
    "theyre": "they're", "lets": "let's",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = ";/[]\"{}()=+\\_-><@`,?!*#%^&$:'"


def vqa_normalize(text: str) -> str:
    """The standard VQA answer processor: lower-case, punctuation stripped (decimals kept), number
    words to digits, articles dropped, contractions normalised."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in _PUNCT:
        # A punctuation mark between spaces/ends is removed; inside a word (e.g. "x-ray") it becomes
        # nothing as well, except that commas inside numbers ("1,000") are dropped too.
        text = text.replace(p, "" if p in "'," else " ")
    text = re.sub(r"(?<!\d)\.(?!\d)", "", text)  # periods that are not decimal points
    words = []
    for w in text.split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """mean over the 10 leave-one-out subsets of min(1, #matches / 3) (ALGORITHMS.md §12)."""
    if not answers:
        raise ValueError("VQA accuracy needs reference answers")
    pred = vqa_normalize(prediction)
    gts = [vqa_normalize(a) for a in answers]
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        scores.append(min(1.0, sum(g == pred for g in others) / 3))
    return sum(scores) / len(scores)


# -- ANLS (DocVQA) ------------------------------------------------------------------------------------
def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """1 - normalised Levenshtein distance to the closest answer, 0 when that distance is >= 0.5."""
    norm = lambda s: " ".join(s.strip().lower().split())  # noqa: E731
    pred = norm(prediction)
    best = 1.0
    for answer in answers:
        gt = norm(answer)
        length = max(len(gt), len(pred))
        best = min(best, levenshtein(gt, pred) / length if length else 0.0)
    return 1.0 - best if best < threshold else 0.0


# -- exact match, OCRBench -----------------------------------------------------------------------------
def normalize(text: str) -> str:
    """Lower-case, trim, collapse whitespace and drop a trailing period."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


def exact_match(prediction: str, answers: list[str]) -> float:
    p = normalize(prediction)
    return float(any(p == normalize(a) for a in answers))


def ocrbench_match(prediction: str, answers: list[str], math_mode: bool = False) -> float:
    """1 if any answer is a substring of the prediction (lower-cased, newlines as spaces); for
    handwritten math expressions, spaces are removed and case is kept."""
    if math_mode:
        pred = prediction.replace(" ", "").replace("\n", "")
        return float(any(a.replace(" ", "") in pred for a in answers))
    pred = prediction.lower().replace("\n", " ").strip()
    return float(any(a.lower().replace("\n", " ").strip() in pred for a in answers))


# -- yes/no (MME) ---------------------------------------------------------------------------------------
def parse_yes_no(prediction: str) -> str | None:
    """"yes" or "no" when the answer has exactly one of the two words (VLMEvalKit's rule for MME, so
    "the red circle is at 1 3, so yes" reads as yes); None when it has both or neither."""
    words = set(re.findall(r"[a-z]+", prediction.lower()))
    found = words & {"yes", "no"}
    return found.pop() if len(found) == 1 else None


def mme_scores(predictions: list[str], answers: list[str], image_ids: list) -> dict[str, float]:
    """acc: fraction of questions right; acc+: fraction of images with every question right."""
    right = [parse_yes_no(p) == a.lower() for p, a in zip(predictions, answers)]
    per_image: dict = {}
    for image, ok in zip(image_ids, right):
        per_image[image] = per_image.get(image, True) and ok
    return {"acc": sum(right) / len(right), "acc_plus": sum(per_image.values()) / len(per_image)}


# -- multiple choice (ScienceQA, MMBench, MMMU) -------------------------------------------------------------
def parse_option_letter(prediction: str, letters: str = "ABCD") -> str | None:
    """An exact letter, an 'X.' / 'X)' prefix or 'The answer is X'; anything else is None."""
    text = prediction.strip()
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    m = re.match(rf"^\(?([{letters}])[\.\):](\s|$)", text)
    if m:
        return m.group(1)
    m = re.search(rf"answer is:?\s*\(?([{letters}])\b", text, flags=re.IGNORECASE)
    if m:
        return m.group(1).upper()
    return None


def parse_option(prediction: str, choices: dict[str, str] | None = None) -> str | None:
    """The option an answer picks: its letter (`parse_option_letter`), else the one option whose text
    the answer contains (VLMEvalKit's `can_infer_text`: case-insensitive, exactly one option, and an
    answer no longer than twice the options' text together; here as whole words, where VLMEvalKit
    matches substrings and reads "nonsense" as the option "no"). None when neither decides: a failed
    parse counts as wrong, never as a random guess."""
    letters = "".join(choices) if choices else "ABCD"
    letter = parse_option_letter(prediction, letters)
    if letter is not None or not choices:
        return letter
    answer = prediction.strip().lower()
    if not answer or len(answer) > 2 * sum(len(text) for text in choices.values()):
        return None
    found = [k for k, text in choices.items()
             if re.search(rf"(?<!\w){re.escape(str(text).strip().lower())}(?!\w)", answer)]
    return found[0] if len(found) == 1 else None


def option_accuracy(prediction: str, answers: list[str], choices: dict[str, str] | None = None) -> float:
    letter = parse_option(prediction, choices)
    return float(letter is not None and letter == answers[0].strip().upper())
