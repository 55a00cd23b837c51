"""The offline API: `LLM(model=DIR).generate(prompts, sampling_params)` in one process, no cluster.

Mirrors vLLM's offline interface. Owns tokenization around the engine and stop strings; the engine does
the rest. The same engine runs inside the prefill and decode workers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from splitserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from splitserve.engine.engine import Engine
from splitserve.engine.errors import InvalidRequest
from splitserve.engine.outputs import CompletionOutput, FinishReason, Logprob, RequestOutput, TokenLogprob
from splitserve.engine.sampling_params import SamplingParams
from splitserve.tokenizer import Detokenizer, Tokenizer

Prompt = str | dict[str, Any]


class LLM:
    """An engine plus the checkpoint's tokenizer.

    Keyword options are those of `EngineConfig`, `CacheConfig` and `SchedulerConfig` (e.g. `dtype`,
    `block_size`, `num_blocks`, `max_num_seqs`, `enable_prefix_caching`, `enable_chunked_prefill`).
    """

    def __init__(self, model: str, **options: Any) -> None:
        self.config = build_engine_config(model, **options)
        self.engine = Engine(self.config)
        self.tokenizer = Tokenizer(model)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        A prompt is a string or `{"prompt_token_ids": [...]}`. Raises `InvalidRequest` (and runs
        nothing) if any prompt or parameter set is invalid.
        """
        prompt_list = [prompts] if isinstance(prompts, str | dict) else list(prompts)
        params_list = _broadcast(sampling_params, len(prompt_list))
        requests = [self._tokenize(p) for p in prompt_list]
        ids = [f"offline-{next(self._ids)}" for _ in requests]
        try:
            for request_id, (_, token_ids), params in zip(ids, requests, params_list, strict=True):
                self.engine.add_request(request_id, token_ids, params)
        except InvalidRequest:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(ids, requests, params_list)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Apply the checkpoint's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c) for c in conversations]
        return self.generate(prompts, sampling_params)

    def _logprob_entry(self, lp: TokenLogprob) -> dict[int, Logprob]:
        """vLLM's per-token logprobs dict: the sampled token's, then the most likely tokens'."""
        entry = {lp.token_id: Logprob(lp.logprob, lp.rank, self._token_text(lp.token_id))}
        for rank, (token_id, logprob) in enumerate(lp.top, start=1):
            entry.setdefault(token_id, Logprob(logprob, rank, self._token_text(token_id)))
        return entry

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise InvalidRequest("a dict prompt must have 'prompt_token_ids'")
            return None, list(prompt["prompt_token_ids"])
        return prompt, self.tokenizer.encode(prompt)

    def _run(self, ids: list[str], requests, params_list: list[SamplingParams]) -> list[RequestOutput]:
        detoks = {rid: Detokenizer(self.tokenizer, p) for rid, p in zip(ids, params_list, strict=True)}
        results: dict[str, CompletionOutput] = {}
        cached: dict[str, int] = {}
        asked = [rid for rid, p in zip(ids, params_list, strict=True) if p.logprobs is not None]
        logprobs: dict[str, list[dict[int, Logprob]]] = {rid: [] for rid in asked}
        while len(results) < len(ids):
            for out in self.engine.step():
                detok = detoks[out.request_id]
                cached[out.request_id] = out.num_cached_tokens
                if out.logprobs:
                    logprobs[out.request_id] += [self._logprob_entry(lp) for lp in out.logprobs]
                reason, stop_reason = out.finish_reason, None
                if detok.add(out.new_token_ids, final=out.finished):
                    self.engine.abort_request(out.request_id)
                    reason, stop_reason = FinishReason.STOP, detok.stop_string
                elif reason is FinishReason.STOP and out.new_token_ids[-1] in detok.params.stop_token_ids:
                    stop_reason = out.new_token_ids[-1]
                if reason is not None:
                    done = CompletionOutput(0, detok.text, list(detok.token_ids), reason, stop_reason)
                    if out.request_id in logprobs:
                        done.logprobs = logprobs[out.request_id][: len(done.token_ids)]
                        done.cumulative_logprob = sum(
                            entry[t].logprob for entry, t in zip(done.logprobs, done.token_ids, strict=False))
                    results[out.request_id] = done
        return [
            RequestOutput(rid, prompt, token_ids, [results[rid]], cached.get(rid, 0), finished=True)
            for rid, (prompt, token_ids) in zip(ids, requests, strict=True)
        ]


def _broadcast(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise InvalidRequest(f"got {len(params)} sampling params for {n} prompts")
    return params


_CACHE_FIELDS = set(CacheConfig.__dataclass_fields__)
_SCHEDULER_FIELDS = set(SchedulerConfig.__dataclass_fields__)


def build_engine_config(model: str, **options: Any) -> EngineConfig:
    """An `EngineConfig` from flat keyword options (vLLM style); unknown names raise `ValueError`."""
    cache = {k: options.pop(k) for k in list(options) if k in _CACHE_FIELDS}
    sched = {k: options.pop(k) for k in list(options) if k in _SCHEDULER_FIELDS}
    unknown = set(options) - set(EngineConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
    return EngineConfig(
        model=model, cache=CacheConfig(**cache), scheduler=SchedulerConfig(**sched), **options
    )
