"""Incremental detokenization equals decoding the whole output at once, on awkward byte sequences
(multi-byte characters split across byte-level tokens, invalid UTF-8 from random tokens, special tokens),
emits only text that stays, and decodes a bounded window per token (O(new tokens), not O(output))."""

from __future__ import annotations

import random

import pytest

from splitserve import SamplingParams
from splitserve.router.text import Detokenizer, TextCodec

AWKWARD = [
    "héllo wörld",
    "世界和平 🎉🎉 ok",
    "a\u0301 e\u0308 \U0001f468\u200d\U0001f469\u200d\U0001f467",
    "tab\tnew\nline  two  spaces",
]


class Counting:
    """A decoder that records how many tokens each call decoded."""

    def __init__(self, codec: TextCodec) -> None:
        self.codec, self.sizes = codec, []

    def decode(self, token_ids, skip_special_tokens=True):
        self.sizes.append(len(token_ids))
        return self.codec.decode(token_ids, skip_special_tokens)


@pytest.fixture(scope="module")
def codec(tiny_model):
    return TextCodec(tiny_model("llama"))


def feed(decoder, tokens, params=None, chunk=1):
    detok = Detokenizer(decoder, params or SamplingParams())
    seen = []
    for i in range(0, len(tokens), chunk):
        detok.add(tokens[i : i + chunk], final=i + chunk >= len(tokens))
        seen.append(detok.text)
    return detok, seen


@pytest.mark.parametrize("text", AWKWARD)
def test_text_split_into_tokens_comes_back_whole(codec, text):
    tokens = codec.encode(text)
    for chunk in (1, 2, 3):
        detok, seen = feed(codec, tokens, chunk=chunk)
        assert detok.text == codec.decode(tokens) == text
        assert all(detok.text.startswith(s) for s in seen)  # nothing emitted was taken back
        assert all("\ufffd" not in s for s in seen)  # no half character shown on the way


def test_random_tokens_decode_as_a_whole_and_each_call_reads_a_short_window(codec):
    rng = random.Random(0)
    vocab = codec.tokenizer.get_vocab_size()
    for trial in range(30):
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 120))]
        counting = Counting(codec)
        detok, seen = feed(counting, tokens, SamplingParams(skip_special_tokens=trial % 2 == 0))
        assert detok.text == codec.decode(tokens, skip_special_tokens=trial % 2 == 0), tokens
        assert all(detok.text.startswith(s) for s in seen)
    text_tokens = codec.encode(" ".join(AWKWARD) * 20)  # ~2k tokens of well-formed text
    counting = Counting(codec)
    detok, _ = feed(counting, text_tokens)
    assert detok.text == codec.decode(text_tokens)
    assert max(counting.sizes) <= 8  # a window of a few tokens, whatever the output's length


def test_stop_strings_still_cut_the_text(codec):
    tokens = codec.encode("one two STOP three")
    detok, _ = feed(codec, tokens, SamplingParams(stop=["STOP"]))
    assert detok.stop_string == "STOP" and detok.text == "one two "
