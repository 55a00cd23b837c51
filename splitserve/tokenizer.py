"""Text ↔ token ids for a checkpoint, and incremental detokenization with stop strings.

Owns everything textual: the engine itself only sees token ids. Wraps the checkpoint's Hugging Face
tokenizer (tokenizer.json / tokenizer_config.json, never a pickled file).
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from splitserve.engine.errors import CheckpointError, InvalidRequest
from splitserve.router.text import Detokenizer

__all__ = ["Detokenizer", "Tokenizer"]


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise CheckpointError(f"no tokenizer files (tokenizer.json) in {path}")
        self.hf: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(path))

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequest(f"a prompt must be a string, got {type(text).__name__}")
        return self.hf.encode(text)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        if not self.hf.chat_template:
            raise InvalidRequest("this checkpoint's tokenizer has no chat template")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
