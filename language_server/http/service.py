"""One chat request from validated input to a token stream: the language server's orchestration.

``prepare`` validates the client's body (untrusted) into a ``ChatRequest``; ``start`` gets the
prompt ready (text-only prompts are tokenized here; prompts with images go through the
``Dispatcher`` to an encoder and come back through the receiver) and queues it on the engine;
``tokens`` streams the result. Errors are ``RequestError`` with the HTTP status the client sees.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from language_server.config import LanguageConfig
from language_server.encoders.dispatch import Dispatcher
from language_server.encoders.links import EncoderPool
from language_server.engines.base import EngineBase, GenJob
from language_server.http.chat_request import ChatRequest, parse_chat_request, stop_token_ids
from language_server.pool.leases import ReceivedPrompt, RequestError
from language_server.pool.receiver import Receiver
from language_server.prompt.builder import PromptBuilder, PromptError

log = logging.getLogger("epd.language")


@dataclass(eq=False)
class Running:
    """A request on the engine: its job and the queue its events arrive on."""

    request: ChatRequest
    job: GenJob
    events: asyncio.Queue[tuple[str, Any]]
    prompt_tokens: int


class ChatService:
    def __init__(self, config: LanguageConfig, engine: EngineBase, builder: PromptBuilder,
                 receiver: Receiver, encoders: EncoderPool) -> None:  # fmt: skip
        self.config, self.engine, self.builder = config, engine, builder
        self.tokenizer = builder.tokenizer
        self.receiver, self.encoders = receiver, encoders
        self.dispatcher = Dispatcher(receiver, encoders, config.request_timeout_s)
        self.policy = config.image_policy()  # local paths only under --allowed-local-media-path
        self.stop_ids = stop_token_ids(self.tokenizer)
        self._active: set[str] = set()  # request ids from start() until their job ends

    @property
    def inflight(self) -> int:
        return len(self._active)

    async def startup(self) -> None:
        self.encoders.start()
        self.dispatcher.start()

    async def shutdown(self) -> None:
        await self.dispatcher.stop()
        await self.encoders.stop()

    async def prepare(self, body: bytes) -> ChatRequest:
        """Parse and validate an OpenAI chat-completions body and build its prompt, on a worker
        thread. Raises RequestError (400/413) on anything wrong."""
        try:
            return await asyncio.to_thread(self._prepare, body)
        except PromptError as exc:
            raise RequestError(exc.status, exc.message) from None
        except ValueError as exc:  # includes JSON decode errors
            raise RequestError(400, str(exc)) from None

    def _prepare(self, body: bytes) -> ChatRequest:
        req = parse_chat_request(
            json.loads(body), self.policy, self.config.max_new_tokens_limit, self.stop_ids
        )
        if req.model is not None and req.model not in self.config.model_names:  # as vLLM
            shown = req.model if len(req.model) <= 256 else req.model[:256] + "..."
            raise RequestError(404, f"The model `{shown}` does not exist.", param="model")
        req.prompt = self.builder.build(req.turns, req.images, req.add_generation_prompt)
        return req

    async def start(self, req: ChatRequest) -> Running:
        """Get the prompt's visual rows (if any) and queue it on the engine. Raises RequestError."""
        if self.inflight >= self.config.max_inflight:
            raise RequestError(503, f"server busy: {self.inflight} requests in flight",
                               retry_after_s=1.0)  # fmt: skip
        req.marks["start"] = time.perf_counter()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def emit(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            if kind != "token":  # counted out even if nobody reads the stream
                loop.call_soon_threadsafe(self._active.discard, req.rid)

        self._active.add(req.rid)
        prompt = req.prompt
        try:
            if prompt.images:
                job = await self.dispatcher.encode(
                    req.rid, prompt, lambda rows: self._image_job(req, rows, emit), req.marks
                )
            else:
                job = self.engine.job_for_text(prompt.input_ids, prompt.positions, req.params, emit)
        except BaseException:
            self._active.discard(req.rid)
            raise
        job.stream = req.stream or bool(req.stop)  # stop strings are watched token by token
        self.engine.submit(job)
        return Running(req, job, events, len(prompt.input_ids))

    def _image_job(self, req: ChatRequest, prompt: ReceivedPrompt, emit) -> GenJob:
        """The engine copies the received rows out of the pool; the blocks are freed after."""
        t = prompt.timings
        n_vis = prompt.n_visual
        req.timings["visual_tokens"] = n_vis
        per_token = self.receiver.buffers.bytes_per_token
        req.timings["transfer_bytes"] = (n_vis - prompt.cached_tokens) * per_token
        req.timings["cached_images"] = prompt.cached_images  # served from resident rows
        req.timings["encoder_cached_images"] = prompt.encoder_cached_images  # sent, no ViT
        req.timings["images"] = sum(spec.kind == "image" for spec in req.prompt.images)
        req.timings["cache_saved_bytes"] = prompt.cached_tokens * per_token
        lent = req.marks.get("lent", req.marks["start"])
        req.timings.update(block_wait_s=max(0.0, lent - req.marks["start"]), queue_s=t.queue_s,
                           preprocess_s=t.preprocess_s, vision_s=t.vision_s,
                           transfer_s=t.transfer_s)  # fmt: skip
        if any(spec.kind == "video" for spec in req.prompt.images):
            req.timings["videos"] = len(req.prompt.video_frame_indices)
            req.timings["decode_s"] = t.decode_s  # part of preprocess_s
        return self.engine.job_for_image(prompt, req.params, emit)

    async def tokens(self, run: Running) -> AsyncGenerator[int, None]:
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
                    # engines with a prefix cache say how many prompt tokens' KV they reused
                    reused = run.job.marks.get("prefix_cached_tokens")
                    if reused is not None:
                        req.timings["prefix_cached_tokens"] = int(reused)
                    return
                else:
                    finished = True
                    raise RequestError(500, f"generation failed: {value}")
        finally:
            self._active.discard(req.rid)
            if not finished:
                self.engine.cancel(run.job)

    def _record_ttft(self, run: Running) -> None:
        req, marks = run.request, run.job.marks
        t = req.timings
        t["ttft_s"] = req.marks["first_token"] - req.marks["start"]
        t["prefill_s"] = marks.get("first_token", 0.0) - marks.get("prefill_start", 0.0)
        parts = ("block_wait_s", "queue_s", "preprocess_s", "vision_s", "transfer_s", "prefill_s")
        t["overhead_s"] = t["ttft_s"] - sum(t.get(k, 0.0) for k in parts)
