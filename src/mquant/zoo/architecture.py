"""The embedded model's architecture: a small Qwen2-VL with non-power-of-two widths.

Widths are chosen so that later rotation work meets the Hadamard sizes real models have:
language hidden 192 = 12·16, MLP 448 = 28·16 (Qwen2-VL-7B's hidden is 28·128), vision width
96 = 12·8, vision MLP 384 = 12·32, vision head 24 = 12·2, language head 32.
"""

from __future__ import annotations

from transformers import Qwen2VLConfig

from mquant.models.qwen2_vl import FAMILY, small_config
from mquant.models.tokenizer import build_subword_tokenizer, token_ids
from mquant.samples import IMAGE_MARKER

# Benchmark images are 112 x 112 (16 visual tokens); other images are resized to 56²..224² pixels.
MIN_SIDE, MAX_SIDE = 56, 224


# M-RoPE gives the language model a visual token's row and column through the rotation frequencies
# of its height and width sections, and the sections take the frequencies in order, t the highest
# and w the lowest (inv_freq_j = theta^(-j/16) for pair j of a 32-wide head). With Qwen2-VL's
# proportions ([4, 6, 6] here) a column turns a query by at most 0.003 rad, and the model could not
# tell columns apart (it named every object's colour and shape but put it at a random column, and
# answered position questions at chance). With [1, 1, 14] rows turn pair 1 by 0.56 rad and columns
# pairs 2-4 by 0.32, 0.18 and 0.1 rad, while ten pairs stay almost still over the whole prompt
# (under 0.06 rad per token), which content-based attention from the answer to the image needs:
# a small theta instead (every pair turning fast) left the model unable to read a digit.
MROPE_SECTION = [1, 1, 14]


def embedded_config(ids: dict[str, int]) -> Qwen2VLConfig:
    return small_config(ids, hidden=192, intermediate=448, layers=6, heads=6, kv_heads=2, mrope_section=MROPE_SECTION,
                        vision=dict(depth=4, embed_dim=96, num_heads=4, mlp_ratio=4), tie_embeddings=True)


VOCAB_SIZE = 768
CORPUS_ITEMS = 200  # per task, from the train split


def tokenizer_corpus() -> list[str]:
    """Question and answer text of the benchmark's train split, plus the chat template's words.

    Each text also comes as one word per line, so that a word is a token both with its leading space
    (inside a sentence) and without (first in an answer, or a cell label of the training probe)."""
    from mquant.zoo import benchmark

    texts = ["system user assistant You are a helpful assistant. Describe the image. empty"]
    for task in benchmark.GENERATORS:
        for sample in benchmark.generate(task, "train", CORPUS_ITEMS):
            texts.append(sample.text.replace(IMAGE_MARKER, " "))
            texts += [benchmark.training_form(sample).answers[0], sample.meta["caption"]]
    return texts + ["\n".join(text.split()) for text in texts]


def build_components():
    """(config, tokenizer, image processor) of the embedded model, built offline."""
    tokenizer = build_subword_tokenizer(FAMILY.chat, tokenizer_corpus(), VOCAB_SIZE)
    processor = FAMILY.images.make_processor(MIN_SIDE, MAX_SIDE)
    return embedded_config(token_ids(tokenizer)), tokenizer, processor
