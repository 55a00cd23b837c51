"""The byte-level BPE tokenizer of tiny checkpoints: training on the bundled corpus, and its files.

Owns the special tokens, the ChatML chat template and the tokenizer files a checkpoint directory holds
(tokenizer.json, tokenizer_config.json, special_tokens_map.json). Deterministic: the same vocab size
always gives the same tokenizer. `tiny_model` uses it; nothing here knows about weights.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Qwen-style special tokens. The trainer gives them ids 0, 1, 2 in this order.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
NUM_BYTE_TOKENS = 256

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CORPUS = "assets/tokenizer_corpus.txt"


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Train the byte-level BPE tokenizer on the bundled corpus; deterministic for a given vocab_size.

    The full 256-byte alphabet is always in the vocabulary, so any text (any bytes) round-trips. The
    result may be smaller than vocab_size when the corpus runs out of pairs worth merging.
    """
    minimum = NUM_BYTE_TOKENS + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < minimum:
        raise ValueError(f"tokenizer_vocab_size must be an integer >= {minimum}, got {vocab_size!r}")
    corpus = resources.files("splitserve").joinpath(_CORPUS).read_text(encoding="utf-8")
    tokenizer = Tokenizer(models.BPE())
    # No normalizer: NFC or similar would change some inputs and break exact round-trips.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # One document: the pre-tokenizer splits it, and runs like "\n\n" stay mergeable.
    tokenizer.train_from_iterator([corpus], trainer=trainer)
    return tokenizer


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    missing = [token for token, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer lacks special tokens {missing}")
    return ids


def write_tokenizer_files(
    out: Path, tokenizer: Tokenizer, ids: dict[str, int], *, model_max_length: int
) -> None:
    # Written directly rather than through transformers' save_pretrained, whose file set changes between
    # versions (5.x drops special_tokens_map.json and moves the chat template to chat_template.jinja).
    tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    added = {
        str(ids[token]): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in SPECIAL_TOKENS
    }
    extra = [IM_START, IM_END]
    write_json(
        out / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": extra,
            "bos_token": ENDOFTEXT,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": IM_END,
            "errors": "replace",
            "model_max_length": model_max_length,
            "pad_token": ENDOFTEXT,
            "split_special_tokens": False,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": None,
        },
    )
    write_json(
        out / "special_tokens_map.json",
        {
            "additional_special_tokens": extra,
            "bos_token": ENDOFTEXT,
            "eos_token": IM_END,
            "pad_token": ENDOFTEXT,
        },
    )


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
