"""OpenAI-compatible HTTP API: /v1/chat/completions (JSON or SSE), /v1/models, /health, /metrics."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from language_server.metrics import Metrics
from language_server.requests import RequestError
from language_server.service import ChatService, Running
from language_server.text import Detokenizer


def create_app(service: ChatService, metrics: Metrics, lifespan: Any = None) -> FastAPI:
    app = FastAPI(title="epd language server", lifespan=lifespan)
    name = service.config.model_name

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        metrics.requests.labels(status=str(exc.status)).inc()
        return _error(exc.status, exc.message, exc.retry_after_s)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = await service.prepare(await request.body())
        run = await service.start(req)
        if req.stream:
            return StreamingResponse(
                _sse(service, metrics, run, name), media_type="text/event-stream"
            )
        return JSONResponse(await _complete(service, metrics, run, name))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "epd"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        buffers, receiver = service.receiver.buffers, service.receiver
        links = [link.describe() for link in service.encoders.links]
        return {
            "status": "ok",
            "model": name,
            "pool": {
                "free_blocks": buffers.num_free,
                "total_blocks": buffers.num_blocks,
                "block_tokens": buffers.block_tokens,
                "peak_used_blocks": receiver.peak_used,
                "quarantined_blocks": receiver.orphaned_blocks,  # lent to writers of ended requests
                "lent_blocks": receiver.lent_blocks,
                "waiting_requests": len(receiver.waiting),
                "pending_requests": len(receiver.pending),
            },
            "encoders": links,
            "engine": {"active": service.engine.active},
            "requests": {
                "inflight": service.inflight,
                "redispatched": service.dispatcher.redispatched,
                "dropped_messages": receiver.dropped_messages,
            },
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        buffers = service.receiver.buffers
        metrics.pool_free.set(buffers.num_free)
        metrics.pool_total.set(buffers.num_blocks)
        metrics.pool_peak.set(service.receiver.peak_used)
        metrics.waiting.set(len(service.receiver.waiting))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _error(status: int, message: str, retry_after_s: float = 0.0) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after_s)))} if retry_after_s else None
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _generate(service: ChatService, run: Running, ids: list[int]) -> AsyncIterator[str]:
    """Text deltas with stop strings applied; appends the generated token ids to ``ids``.

    At a stop string the job is cancelled (closing ``service.tokens`` does that).
    """
    detok = Detokenizer(service.tokenizer)
    stops = run.request.stop
    async with contextlib.aclosing(service.tokens(run)) as tokens:
        async for token in tokens:
            ids.append(token)
            delta, stopped = _cut(detok.push(token), detok.text, stops)
            if delta:
                yield delta
            if stopped:
                run.request.timings["finish_reason"] = "stop"
                return
    delta, stopped = _cut(detok.flush(), detok.text, stops)
    if stopped:
        run.request.timings["finish_reason"] = "stop"
    if delta:
        yield delta


def _cut(delta: str, text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``delta`` (the end of ``text``) cut before the first stop string in ``text``."""
    hits = [text.find(s) for s in stops if s in text]
    if not hits:
        return delta, False
    keep = len(delta) - (len(text) - min(hits))
    return delta[: max(0, keep)], True


def _finish(metrics: Metrics, run: Running, ids: list[int]) -> dict[str, Any]:
    req = run.request
    metrics.requests.labels(status="200").inc()
    metrics.tokens.inc(len(ids))
    metrics.latency.observe(time.perf_counter() - req.marks["start"])
    if "ttft_s" in req.timings:
        metrics.ttft.observe(req.timings["ttft_s"])
    if "transfer_s" in req.timings:
        metrics.transfer_seconds.observe(req.timings["transfer_s"])
        metrics.transfer_bytes.inc(req.timings["transfer_bytes"])
    usage = {"prompt_tokens": run.prompt_tokens, "completion_tokens": len(ids),
             "total_tokens": run.prompt_tokens + len(ids)}  # fmt: skip
    return usage


async def _complete(
    service: ChatService, metrics: Metrics, run: Running, name: str
) -> dict[str, Any]:
    ids: list[int] = []
    text = "".join([delta async for delta in _generate(service, run, ids)])
    req = run.request
    usage = _finish(metrics, run, ids)
    return {
        "id": req.rid, "object": "chat.completion", "created": int(req.created), "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": req.timings.get("finish_reason", "stop")}],
        "usage": usage,
        "epd": {"token_ids": list(ids), "timings": _public(req.timings)},
    }  # fmt: skip


async def _sse(
    service: ChatService, metrics: Metrics, run: Running, name: str
) -> AsyncIterator[str]:
    req = run.request
    base = {"id": req.rid, "object": "chat.completion.chunk", "created": int(req.created),
            "model": name}  # fmt: skip

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return f"data: {json.dumps({**base, 'choices': [choice], **extra})}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    ids: list[int] = []
    try:
        async for delta in _generate(service, run, ids):
            yield chunk({"content": delta})
    except RequestError as exc:
        metrics.requests.labels(status=str(exc.status)).inc()
        yield f"data: {json.dumps({'error': {'message': exc.message, 'code': exc.status}})}\n\n"
        return
    usage = _finish(metrics, run, ids)
    extra = {"epd": {"token_ids": ids, "timings": _public(req.timings)}}
    yield chunk({}, req.timings.get("finish_reason", "stop"), **extra)
    if req.include_usage:
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


def _public(timings: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in timings.items()}
