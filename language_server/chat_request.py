"""Parsing an OpenAI chat-completions body (untrusted) into a validated ``ChatRequest``."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import protocol as P
from language_server.generate import SamplingParams
from protocol.chat import ImageSourcePolicy, to_turns


@dataclass
class ChatRequest:
    rid: str
    turns: list[P.ChatTurn]
    images: list[bytes]
    params: SamplingParams
    stream: bool
    stop: tuple[str, ...] = ()
    include_usage: bool = False
    add_generation_prompt: bool = True
    prompt: Any = None  # language_server.prompt.PreparedPrompt, once built
    created: float = field(default_factory=time.time)
    marks: dict[str, float] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)  # seconds, counts, finish_reason


def parse_chat_request(
    body: Any, policy: ImageSourcePolicy, max_new_tokens: int, stop_ids: tuple[int, ...]
) -> ChatRequest:
    """Validate an OpenAI chat-completions body. ValueError (-> 400) on anything wrong."""
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    turns, images = to_turns(body.get("messages"), policy)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 256))
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_new_tokens:
        raise ValueError(f"max_tokens must be an integer in 1..{max_new_tokens}")
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=int(_number(body, "top_k", 0)),
        seed=body.get("seed") if isinstance(body.get("seed"), int) else None,
        stop_token_ids=() if body.get("ignore_eos") is True else stop_ids,
    )
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ValueError("stop must be a string or a list of at most 4 non-empty strings")
    if body.get("n", 1) != 1:
        raise ValueError("only n=1 is supported")
    options = body.get("stream_options") or {}
    add_generation_prompt = body.get("add_generation_prompt", True)
    if not isinstance(add_generation_prompt, bool):
        raise ValueError("add_generation_prompt must be a boolean")
    return ChatRequest(
        rid=f"chatcmpl-{uuid.uuid4().hex}", turns=turns, images=images, params=params,
        stream=body.get("stream") is True, stop=stop,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        add_generation_prompt=add_generation_prompt,
    )  # fmt: skip


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number")
    return float(value)


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return tuple(sorted(i for i in ids if isinstance(i, int) and i >= 0))
