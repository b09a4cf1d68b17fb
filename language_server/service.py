"""One chat request from validated input to a token stream: the language server's orchestration.

``prepare`` validates the client's body (untrusted) into a ``ChatRequest``; ``start`` gets the
prompt ready (text-only prompts are tokenized here; prompts with images go to the least-loaded
encoder and arrive through the receiver) and queues it on the engine; ``tokens`` streams the
result. Errors are ``RequestError`` with the HTTP status the client should see.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

import protocol as P
from language_server.config import LanguageConfig
from language_server.encoders import EncoderPool
from language_server.engine import EngineBase, GenJob
from language_server.generate import SamplingParams
from language_server.receiver import Pending, ReceivedPrompt, Receiver, RequestError
from protocol.chat import ImageSourcePolicy, to_messages, to_turns

log = logging.getLogger("epd.language")


@dataclass
class ChatRequest:
    rid: str
    turns: list[P.ChatTurn]
    images: list[bytes]
    params: SamplingParams
    stream: bool
    stop: tuple[str, ...] = ()
    include_usage: bool = False
    created: float = field(default_factory=time.time)
    marks: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(eq=False)
class Running:
    """A request on the engine: its job and the queue its events arrive on."""

    request: ChatRequest
    job: GenJob
    events: asyncio.Queue[tuple[str, Any]]
    prompt_tokens: int


class ChatService:
    def __init__(self, config: LanguageConfig, engine: EngineBase, tokenizer: Any,
                 receiver: Receiver, encoders: EncoderPool) -> None:  # fmt: skip
        self.config, self.engine, self.tokenizer = config, engine, tokenizer
        self.receiver, self.encoders = receiver, encoders
        self.policy = ImageSourcePolicy(
            max_images=config.max_images, allow_local_files=config.allow_local_images
        )
        self.stop_ids = _stop_token_ids(tokenizer)

    # --- input ------------------------------------------------------------------------------

    def prepare(self, body: Any) -> ChatRequest:
        """Validate an OpenAI chat-completions body. ValueError (-> 400) on anything wrong."""
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        turns, images = to_turns(body.get("messages"), self.policy)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 256))
        if (
            not isinstance(max_tokens, int)
            or not 1 <= max_tokens <= self.config.max_new_tokens_limit
        ):
            raise ValueError(
                f"max_tokens must be an integer in 1..{self.config.max_new_tokens_limit}"
            )
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0),
            top_p=_number(body, "top_p", 1.0),
            top_k=int(_number(body, "top_k", 0)),
            seed=body.get("seed") if isinstance(body.get("seed"), int) else None,
            stop_token_ids=() if body.get("ignore_eos") is True else self.stop_ids,
        )
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise ValueError("stop must be a string or a list of at most 4 non-empty strings")
        if body.get("n", 1) != 1:
            raise ValueError("only n=1 is supported")
        options = body.get("stream_options") or {}
        return ChatRequest(
            rid=f"chatcmpl-{uuid.uuid4().hex}", turns=turns, images=images, params=params,
            stream=body.get("stream") is True, stop=stop,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        )  # fmt: skip

    # --- run --------------------------------------------------------------------------------

    async def start(self, req: ChatRequest) -> Running:
        """Get the prompt's inputs ready and queue it on the engine. Raises RequestError."""
        req.marks["start"] = time.perf_counter()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def emit(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        if req.images:
            job = await self._encode(req, emit)
        else:
            job = self._text_job(req, emit)
        if len(job.input_ids) > self.config.max_prompt_tokens:
            raise RequestError(400, f"prompt has {len(job.input_ids)} tokens, the limit is "
                               f"{self.config.max_prompt_tokens}")  # fmt: skip
        self.engine.submit(job)
        return Running(req, job, events, len(job.input_ids))

    def _text_job(self, req: ChatRequest, emit) -> GenJob:
        text = self.tokenizer.apply_chat_template(
            to_messages(req.turns, []), tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor(self.tokenizer(text)["input_ids"], dtype=torch.long)
        positions = torch.arange(len(ids)).expand(3, -1).contiguous()
        return self.engine.job_for_text(ids, positions, req.params, emit)

    async def _encode(self, req: ChatRequest, emit) -> GenJob:
        link = self.encoders.pick()
        if link is None:
            raise RequestError(503, "no encode server is available", retry_after_s=1.0)
        done: asyncio.Future[GenJob] = asyncio.get_running_loop().create_future()

        def on_ready(prompt: ReceivedPrompt | None, error: RequestError | None) -> None:
            if done.done():
                return
            if error is not None:
                done.set_exception(error)
                return
            assert prompt is not None
            try:
                done.set_result(self._image_job(req, prompt, emit))
            except Exception as exc:  # noqa: BLE001 - surfaces as a 500 for this request
                done.set_exception(RequestError(500, f"cannot build the prompt: {exc}"))

        pending = Pending(req.rid, link, on_ready)
        self.receiver.expect(pending)
        link.inflight.add(req.rid)
        link.send(P.EncodeRequest(rid=req.rid, turns=req.turns, images=req.images))
        try:
            return await asyncio.wait_for(done, self.config.request_timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            timed_out = isinstance(exc, TimeoutError)
            reason = "timed out waiting for the encoder" if timed_out else "client went away"
            self.receiver.fail(pending, RequestError(504, reason))
            if timed_out:
                raise RequestError(
                    504, f"{reason} ({self.config.request_timeout_s:.0f} s)"
                ) from None
            raise
        finally:
            req.marks.update(pending.marks)

    def _image_job(self, req: ChatRequest, prompt: ReceivedPrompt, emit) -> GenJob:
        """The engine copies the received rows out of the pool; the blocks are freed after."""
        t = prompt.timings
        n_vis = prompt.embeds.shape[0]
        req.timings["visual_tokens"] = n_vis
        req.timings["transfer_bytes"] = n_vis * self.receiver.buffers.bytes_per_token
        req.timings.update(queue_s=t.queue_s, preprocess_s=t.preprocess_s, vision_s=t.vision_s,
                           grant_wait_s=t.grant_wait_s, transfer_s=t.transfer_s)  # fmt: skip
        return self.engine.job_for_image(prompt, req.params, emit)

    async def tokens(self, run: Running) -> AsyncIterator[int]:
        """Yield generated token ids; sets ``run.request.timings``; cancels the job if closed."""
        req, finished = run.request, False
        try:
            while True:
                kind, value = await run.events.get()
                if kind == "token":
                    if "first_token" not in req.marks:
                        req.marks["first_token"] = time.perf_counter()
                        self._record_ttft(run)
                    yield value
                elif kind == "end":
                    finished = True
                    req.timings["finish_reason"] = value
                    return
                else:
                    finished = True
                    raise RequestError(500, f"generation failed: {value}")
        finally:
            if not finished:
                self.engine.cancel(run.job)

    def _record_ttft(self, run: Running) -> None:
        req, marks = run.request, run.job.marks
        t = req.timings
        t["ttft_s"] = req.marks["first_token"] - req.marks["start"]
        t["prefill_s"] = marks.get("first_token", 0.0) - marks.get("prefill_start", 0.0)
        parts = ("queue_s", "preprocess_s", "vision_s", "grant_wait_s", "transfer_s", "prefill_s")
        t["overhead_s"] = t["ttft_s"] - sum(t.get(k, 0.0) for k in parts)


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number")
    return float(value)


def _stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return tuple(sorted(i for i in ids if isinstance(i, int) and i >= 0))
