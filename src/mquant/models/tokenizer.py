"""An offline character-level tokenizer for the tiny and embedded models.

Every printable ASCII character is one token, plus the family's special tokens. It is built from a
vocabulary in code (no download) and saved as a standard `tokenizer.json` that `AutoTokenizer` loads.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mquant.models.spec import ModelFamily

CHARACTERS = list(string.printable[:-2])  # digits, letters, punctuation, space, \t, \n, \r


def build_tokenizer(family: ModelFamily) -> PreTrainedTokenizerFast:
    special = list(family.special_tokens)
    vocab = {token: i for i, token in enumerate(special + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # "." would not split newlines
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(special)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=family.eos_token, pad_token=family.pad_token)
    fast.chat_template = family.default_chat_template
    return fast


def token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = dict(tokenizer.get_vocab())
    ids["vocab_size"] = len(tokenizer)
    return ids
