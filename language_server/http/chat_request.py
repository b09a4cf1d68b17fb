"""Parsing an OpenAI chat-completions body (untrusted) into a validated ``ChatRequest``.

Every field we read is checked for type and range, and every rejection is a ``ValueError``
(-> HTTP 400) whose message starts with the field's name. Fields that would change the answer
but that this server does not implement (``logprobs``, ``tools``, ``response_format``, ``n > 1``,
penalties, ...) are refused unless they hold their neutral value; fields that change nothing
(``user``, ``metadata``, ...) and unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import protocol as P
from language_server.engines.base import SamplingParams
from protocol.chat import (
    ImageSourcePolicy,
    VideoSource,
    check_text,
    sampling_fps,
    sampling_max_frames,
    to_turns,
)

INT64 = (-(1 << 63), (1 << 63) - 1)
MAX_STOPS, MAX_STOP_CHARS = 4, 256
DEFAULT_MAX_TOKENS = 256
GREEDY_BELOW = 1e-5  # a smaller temperature samples greedily (as vLLM does): logits / 1e-300
# would overflow to inf and NaN probabilities


@dataclass
class ChatRequest:
    rid: str
    turns: list[P.ChatTurn]
    images: list[bytes | VideoSource]  # visual items in prompt order: images and videos
    params: SamplingParams
    stream: bool
    stop: tuple[str, ...] = ()
    include_usage: bool = False
    add_generation_prompt: bool = True
    model: str | None = None  # as the client named it (None: the default model)
    prompt: Any = None  # language_server.prompt.PreparedPrompt, once built
    created: float = field(default_factory=time.time)
    marks: dict[str, float] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)  # seconds, counts, finish_reason


def _number_is(default: float) -> Callable[[Any], bool]:
    return lambda v: _is_number(v) and v == default


def _empty(v: Any) -> bool:
    return v in ([], {}, "")


# field -> whether its value is the neutral one (what we do anyway); None always is.
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "logprobs": lambda v: v is False,
    "top_logprobs": _number_is(0),
    "prompt_logprobs": _number_is(0),
    "tools": _empty,
    "tool_choice": lambda v: v in ("none", "auto"),  # with no tools, both mean none
    "functions": _empty,
    "function_call": lambda v: v == "none",
    "response_format": lambda v: v == {"type": "text"},
    "logit_bias": _empty,
    "presence_penalty": _number_is(0),
    "frequency_penalty": _number_is(0),
    "repetition_penalty": _number_is(1),
    "min_p": _number_is(0),
    "min_tokens": _number_is(0),
    "best_of": _number_is(1),
    "echo": lambda v: v is False,
    "continue_final_message": lambda v: v is False,
    "modalities": lambda v: v == ["text"],
    "audio": lambda v: False,
    "prediction": lambda v: False,
    "guided_json": lambda v: False,
    "guided_regex": lambda v: False,
    "guided_choice": lambda v: False,
    "guided_grammar": lambda v: False,
    "structured_outputs": lambda v: False,
    "chat_template": lambda v: False,
    "chat_template_kwargs": _empty,
}


def parse_chat_request(
    body: Any, policy: ImageSourcePolicy, max_new_tokens: int, stop_ids: tuple[int, ...]
) -> ChatRequest:
    """Validate an OpenAI chat-completions body. ValueError (-> 400) on anything wrong."""
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    _refuse_unsupported(body)
    model = _optional(body, "model", str)
    if model is not None:
        check_text(model, "model")
    turns, images = to_turns(body.get("messages"), policy)
    images = _video_defaults(body, images)
    params = SamplingParams(
        max_new_tokens=_max_tokens(body, max_new_tokens),
        temperature=_temperature(body),
        top_p=_float(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_top_k(body),
        seed=_int(body, "seed", None, *INT64),
        stop_token_ids=() if _flag(body, "ignore_eos", False) else stop_ids,
    )
    options = _optional(body, "stream_options", dict) or {}
    return ChatRequest(
        rid=f"chatcmpl-{uuid.uuid4().hex}", turns=turns, images=images, params=params,
        stream=_flag(body, "stream", False), stop=_stop(body.get("stop")),
        include_usage=_flag(options, "include_usage", False, "stream_options.include_usage"),
        add_generation_prompt=_flag(body, "add_generation_prompt", True), model=model,
    )  # fmt: skip


def _video_defaults(
    body: dict[str, Any], images: list[bytes | VideoSource]
) -> list[bytes | VideoSource]:
    """Videos' sampling options from ``mm_processor_kwargs`` (as vLLM names it) where a video
    part did not set its own."""
    kwargs = _optional(body, "mm_processor_kwargs", dict) or {}
    unknown = sorted(set(kwargs) - {"fps", "max_frames"})
    if unknown:
        raise ValueError(f"mm_processor_kwargs: only fps and max_frames are supported, got "
                         f"{_show(unknown)}")  # fmt: skip
    fps = sampling_fps(kwargs.get("fps"), "mm_processor_kwargs.fps")
    most = sampling_max_frames(kwargs.get("max_frames"), "mm_processor_kwargs.max_frames")
    return [
        replace(item, fps=item.fps if item.fps is not None else fps,
                max_frames=item.max_frames if item.max_frames is not None else most)
        if isinstance(item, VideoSource) else item
        for item in images
    ]  # fmt: skip


def _refuse_unsupported(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and not (_is_int(n) and n == 1):
        raise ValueError(f"n: only n=1 is supported, got {_show(n)}")
    for name, neutral in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not neutral(value):
            raise ValueError(f"{name} is not supported by this server (got {_show(value)})")


def _max_tokens(body: dict[str, Any], limit: int) -> int:
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    value = _int(body, name, min(DEFAULT_MAX_TOKENS, limit), 1, limit)
    assert value is not None
    return value


def _temperature(body: dict[str, Any]) -> float:
    value = _float(body, "temperature", 1.0, 0.0, 100.0)
    return 0.0 if value < GREEDY_BELOW else value


def _top_k(body: dict[str, Any]) -> int:
    value = _int(body, "top_k", 0, -1, (1 << 31) - 1)
    return 0 if value is None or value == -1 else value  # -1: no filtering, as in vLLM


def _stop(value: Any) -> tuple[str, ...]:
    stops = () if value is None else (value,) if isinstance(value, str) else value
    ok = isinstance(stops, (list, tuple)) and len(stops) <= MAX_STOPS
    if not ok or not all(isinstance(s, str) and 1 <= len(s) <= MAX_STOP_CHARS for s in stops):
        raise ValueError(f"stop must be a string or a list of at most {MAX_STOPS} strings of "
                         f"1..{MAX_STOP_CHARS} characters, got {_show(value)}")  # fmt: skip
    return tuple(check_text(s, f"stop[{i}]") for i, s in enumerate(stops))


def _optional(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"{key} must be {_KINDS[kind]}, got {_show(value)}")
    return value


def _flag(body: dict[str, Any], key: str, default: bool, name: str = "") -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{name or key} must be a boolean, got {_show(value)}")
    return value


def _int(body: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if _is_number(value) and isinstance(value, float) and value.is_integer():
        value = int(value)  # 8.0 is 8, as pydantic reads it
    if not _is_int(value) or not low <= value <= high:
        raise ValueError(f"{key} must be an integer in {low}..{high}, got {_show(value)}")
    return value


def _float(body: dict[str, Any], key: str, default: float, low: float, high: float,
           low_open: bool = False) -> float:  # fmt: skip
    value = body.get(key)
    if value is None:
        return default
    in_range = _is_number(value) and (low < value if low_open else low <= value) and value <= high
    if not in_range or not math.isfinite(value):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{key} must be a number in {bounds}, got {_show(value)}")
    return float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_KINDS: dict[type, str] = {str: "a string", dict: "an object", list: "a list"}


def _show(value: Any) -> str:
    """A short, ASCII-only rendering of a client's value for an error message."""
    try:
        text = ascii(value)
    except ValueError:  # an int too long for repr
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return tuple(sorted(i for i in ids if isinstance(i, int) and i >= 0))
