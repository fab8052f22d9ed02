"""VLMEvalKit-format TSV benchmarks: `mquant eval MODEL --tasks tsv:PATH[#METRIC]`.

Required columns: `index`, `image` (base64, or the `index` of another row whose image it shares),
`question`, `answer`. Optional: `hint`, option columns `A`, `B`, `C`, ... (a multiple-choice task),
`category`. The metric is `option_accuracy` when options exist, `vqa_accuracy` when answers are
lists (e.g. `['a', 'b']`), else `exact_match`; `#anls`, `#vqa_accuracy`, ... overrides it.
"""

from __future__ import annotations

import ast
import base64
import csv
import io
import sys
from pathlib import Path

from PIL import Image

from mquant.errors import MquantError
from mquant.eval.tasks import METRICS, Task
from mquant.samples import IMAGE_MARKER, Sample

REQUIRED = ("index", "image", "question", "answer")
OPTION_LETTERS = "ABCDEFGHIJ"
MC_PROMPT = "Answer with the option's letter from the given choices directly."


def read_tsv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise MquantError(f"tsv:{path}: no such file")
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = reader.fieldnames or []
        for col in REQUIRED:
            if col not in columns:
                raise MquantError(f"tsv:{path}: missing required column '{col}' (has: {', '.join(columns)})")
        return list(reader)


def _decode_image(value: str, by_index: dict[str, str], where: str) -> Image.Image:
    if value in by_index and len(value) < 32:  # a reference to another row's image
        value = by_index[value]
    try:
        return Image.open(io.BytesIO(base64.b64decode(value, validate=True))).convert("RGB")
    except (ValueError, OSError) as exc:
        raise MquantError(f"{where}: cannot decode the base64 image ({exc})") from None


def _answers(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        try:
            parsed = ast.literal_eval(value)  # a literal list of strings, never code
        except (ValueError, SyntaxError):
            return [value]
        if isinstance(parsed, list):
            return [str(a) for a in parsed]
    return [value]


def load_tsv_samples(path: Path) -> tuple[list[Sample], bool, bool]:
    """(samples, is_multiple_choice, has_list_answers)."""
    rows = read_tsv(path)
    if not rows:
        raise MquantError(f"tsv:{path}: no rows")
    images = {r["index"]: r["image"] for r in rows if len(r["image"]) >= 32}
    letters = [c for c in OPTION_LETTERS if c in rows[0]]
    samples, list_answers = [], False
    for r in rows:
        where = f"tsv:{path} index {r['index']}"
        if not r["answer"].strip():
            raise MquantError(f"{where}: empty answer (a test split without answers cannot be scored)")
        options = [(c, r[c]) for c in letters if r.get(c, "").strip() and r[c] != "nan"]
        text = r["question"].strip()
        if r.get("hint", "").strip() and r["hint"] != "nan":
            text = f"Hint: {r['hint'].strip()}\n{text}"
        if options:
            text += "\nOptions:\n" + "\n".join(f"{c}. {o}" for c, o in options) + "\n" + MC_PROMPT
        answers = _answers(r["answer"])
        list_answers |= len(answers) > 1
        meta = {"category": r.get("category"), "choices": dict(options)}
        samples.append(Sample(f"tsv:{r['index']}", [_decode_image(r["image"], images, where)],
                              f"{IMAGE_MARKER}\n{text}", answers, meta))
    return samples, bool(letters), list_answers


def tsv_task(spec: str) -> Task:
    path_text, _, metric = spec.partition("#")
    path = Path(path_text)
    samples, multiple_choice, list_answers = load_tsv_samples(path)
    if not metric:
        metric = "option_accuracy" if multiple_choice else "vqa_accuracy" if list_answers else "exact_match"
    if metric not in METRICS:
        raise MquantError(f"tsv:{spec}: unknown metric '{metric}'; available: {', '.join(METRICS)}")
    return Task(f"tsv:{path.name}", metric, lambda limit: samples[:limit], METRICS[metric],
                max_new_tokens=16, default_limit=len(samples))
