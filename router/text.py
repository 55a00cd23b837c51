"""Text for the router, without torch: the checkpoint's tokenizer.json (the `tokenizers` library),
its chat template (Jinja, sandboxed) and incremental detokenization with stop strings.

The offline API uses the same `Detokenizer` over its transformers tokenizer; both decode identically for
a tokenizer.json checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from splitserve.engine.errors import CheckpointError, InvalidRequest
from splitserve.engine.sampling_params import SamplingParams


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


class TextCodec:
    """Text ↔ token ids and chat formatting for one checkpoint directory."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"no tokenizer.json in {path}")
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        config_path = path / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}
        template = config.get("chat_template")
        self._template = None
        if template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(template)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequest(f"a prompt must be a string, got {type(text).__name__}")
        return self.tokenizer.encode(text).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        if self._template is None:
            raise InvalidRequest("this checkpoint's tokenizer has no chat template")
        for m in messages:
            fields = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
            if not all(isinstance(f, str) for f in fields):
                raise InvalidRequest("a chat message is {'role': str, 'content': str}")
        return self._template.render(messages=messages, add_generation_prompt=True, **self.special)


def _token_text(token) -> str:
    return token.get("content", "") if isinstance(token, dict) else (token or "")


def _raise(message: str):
    raise InvalidRequest(f"chat template: {message}")


class Detokenizer:
    """The text of one request's output so far, cut at the first stop string; incremental, O(new tokens)
    a step.

    Offsets into the output's tokens, as vLLM keeps them: `text` holds the decoding of tokens [0, read);
    each update decodes only the window [prefix, end) and appends what it adds to the decoding of
    [prefix, read) — the window starts a token back, so a tokenizer that drops a word's leading space at
    the start of a decode keeps it. While the window's text ends in an incomplete UTF-8 character (a byte-
    level token split it), nothing is appended; the final update (`final`) appends whatever is left, so
    the finished text equals decoding the whole output at once.
    """

    def __init__(self, tokenizer: Decoder, params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids: list[int] = []
        self.text = ""
        self.stop_string: str | None = None
        self._longest_stop = max((len(s) for s in params.stop), default=0)
        self._prefix = self._read = 0  # token offsets: the window's start, the end of what `text` holds

    def add(self, token_ids: tuple[int, ...] | list[int], final: bool = False) -> bool:
        """Append tokens (`final`: the request's last); True when a stop string has just been found."""
        if self.stop_string is not None:
            return False
        self.token_ids.extend(token_ids)
        previous_len = len(self.text)
        skip = self.params.skip_special_tokens
        done = self.tokenizer.decode(self.token_ids[self._prefix : self._read], skip)
        window = self.tokenizer.decode(self.token_ids[self._prefix :], skip)
        if final or (len(window) > len(done) and not window.endswith("\ufffd")):
            self.text += window[len(done) :]
            self._prefix, self._read = self._read, len(self.token_ids)
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
