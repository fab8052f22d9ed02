"""Offline tokenizers: character-level for the tiny test models, subword (BPE) for the embedded model.

Both are built without a download and saved as a standard `tokenizer.json` that `AutoTokenizer`
loads. The subword one is trained on a corpus the caller gives (the benchmark's `train` text), so
that common words are single tokens as in real VLM tokenizers; digits always stay single characters
(as in Qwen2's tokenizer), so numbers are read digit by digit.
"""

from __future__ import annotations

import string
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mquant.models.spec import ChatFormat

CHARACTERS = list(string.printable[:-2])  # digits, letters, punctuation, space, \t, \n, \r


def build_tokenizer(chat: ChatFormat) -> PreTrainedTokenizerFast:
    """Every printable ASCII character is one token, plus the family's special tokens."""
    special = list(chat.special_tokens)
    vocab = {token: i for i, token in enumerate(special + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # "." would not split newlines
    return _wrap(tok, chat)


# Pieces BPE merges within, as in Qwen2's tokenizer: a word with its leading space, a single digit,
# a punctuation mark with its leading space, any other whitespace character on its own.
PIECES = r" ?[A-Za-z]+|[0-9]| ?[^\sA-Za-z0-9]|\s"


def build_subword_tokenizer(chat: ChatFormat, corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """BPE over `PIECES`, trained on `corpus`.

    A word and the space before it become one token (" red"), as in real VLM tokenizers, so prompts
    are shorter than with spaces as tokens of their own. Digits always stay single characters (as in
    Qwen2's tokenizer), so numbers are read digit by digit. Every printable character is in the
    initial alphabet, so any ASCII text still encodes, and tokens are literal text, so decoding is
    plain concatenation. Training is deterministic for the same corpus.
    """
    special = list(chat.special_tokens)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior="isolated")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=CHARACTERS,
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return _wrap(tok, chat)


def _wrap(tok: Tokenizer, chat: ChatFormat) -> PreTrainedTokenizerFast:
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(chat.special_tokens))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=chat.eos_token, pad_token=chat.pad_token)
    fast.chat_template = chat.default_chat_template
    return fast


def token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = dict(tokenizer.get_vocab())
    ids["vocab_size"] = len(tokenizer)
    return ids
