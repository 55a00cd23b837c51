"""Text ↔ token ids for a checkpoint, and incremental detokenization with stop strings.

Owns everything textual: the engine itself only sees token ids. Wraps the checkpoint's Hugging Face
tokenizer (tokenizer.json / tokenizer_config.json, never a pickled file).
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from splitserve.engine.errors import CheckpointError, InvalidRequest
from splitserve.engine.sampling_params import SamplingParams


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


class Detokenizer:
    """The text of one request's output so far, cut at the first stop string.

    Re-decodes the whole output on each update, which keeps byte-level BPE merges and multi-byte
    characters right; output lengths here make that cheaper than bookkeeping offsets.
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids: list[int] = []
        self.text = ""
        self.stop_string: str | None = None
        self._longest_stop = max((len(s) for s in params.stop), default=0)

    def add(self, token_ids: tuple[int, ...] | list[int]) -> bool:
        """Append tokens; returns True when a stop string has just been found."""
        if self.stop_string is not None:
            return False
        self.token_ids.extend(token_ids)
        previous_len = len(self.text)
        self.text = self.tokenizer.decode(self.token_ids, self.params.skip_special_tokens)
        if not self.params.stop:
            return False
        search_from = max(0, previous_len - self._longest_stop + 1)
        hits = [(self.text.find(s, search_from), s) for s in self.params.stop]
        hits = [(at, s) for at, s in hits if at >= 0]
        if not hits:
            return False
        at, stop = min(hits)
        self.stop_string = stop
        self.text = self.text[: at + len(stop)] if self.params.include_stop_str_in_output else self.text[:at]
        return True
