"""OpenAI-compatible HTTP API: /v1/chat/completions (JSON or SSE), /v1/models, /health, /metrics.

Every answer is JSON, errors included: a ``RequestError`` carries its status (400 a malformed or
unsupported field, named in the message; 404 an unknown model; 413 too large; 503 busy; ...);
anything else is our bug and a JSON 500. The body is read under a bound (``--max-body-bytes``)
before anything parses it, and parsing runs on a worker thread (``ChatService.prepare``), so the
event loop stays free. A client that goes away cancels its request (499 in the metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from language_server.http.chat_request import ChatRequest
from language_server.http.metrics import Metrics
from language_server.http.service import ChatService, Running
from language_server.http.text import Detokenizer, StopStrings
from language_server.pool.leases import RequestError

log = logging.getLogger("epd.language.api")
CLIENT_GONE = 499  # nginx's "client closed request": counted, never seen by the client
T = TypeVar("T")


def create_app(service: ChatService, metrics: Metrics, lifespan: Any = None) -> FastAPI:
    app = FastAPI(title="epd language server", lifespan=lifespan)
    config = service.config
    names, name, limit = config.model_names, config.model_name, config.body_limit

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        metrics.requests.labels(status=str(exc.status)).inc()
        return _error(exc.status, exc.message, exc.retry_after_s, exc.param)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))  # unknown route, wrong method

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:  # uvicorn logs the traceback
        metrics.requests.labels(status="500").inc()
        return _error(500, f"internal server error ({type(exc).__name__}); see the server log")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = await _prepare(service, await _read_body(request, limit))  # 404: unknown model
        run = await _unless_gone(request, service.start(req))
        if req.stream:
            return StreamingResponse(
                _sse(service, metrics, run, name), media_type="text/event-stream"
            )
        return JSONResponse(await _unless_gone(request, _complete(service, metrics, run, name)))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cards = [{"id": n, "object": "model", "owned_by": "epd", "root": name} for n in names]
        return {"object": "list", "data": cards}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        buffers, receiver = service.receiver.buffers, service.receiver
        idle = receiver.cache.idle_blocks if receiver.cache is not None else 0
        links = [link.describe() for link in service.encoders.links]
        return {
            "status": "ok",
            "model": name,
            "pool": {
                "free_blocks": buffers.num_free,
                # free + resident images nobody reads (taken back the moment a request needs room)
                "available_blocks": buffers.num_free + idle,
                "total_blocks": buffers.num_blocks,
                "block_tokens": buffers.block_tokens,
                "peak_used_blocks": receiver.peak_used,
                "quarantined_blocks": receiver.orphaned_blocks,  # lent to writers of ended requests
                "lent_blocks": receiver.lent_blocks,
                "handed_blocks": receiver.handed_blocks,  # rows the engine reads in place
                "waiting_requests": len(receiver.waiting),
                "pending_requests": len(receiver.pending),
                **_cache(receiver.cache),
                **(await _pool_host(receiver)),
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


def _error(
    status: int, message: str, retry_after_s: float = 0.0, param: str | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after_s)))} if retry_after_s else None
    kind = {404: "NotFoundError"}.get(status, "invalid_request_error" if status < 500
                                      else "server_error")  # fmt: skip
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it is known to exceed ``limit`` bytes: from
    Content-Length before reading, else while counting the stream."""
    too_big = RequestError(413, f"request body larger than {limit} bytes (--max-body-bytes)")
    declared = request.headers.get("content-length", "")
    if declared.isdecimal() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestError(CLIENT_GONE, "client closed the request") from None
    return b"".join(chunks)


async def _prepare(service: ChatService, body: bytes) -> ChatRequest:
    try:
        return await service.prepare(body)
    except RecursionError:  # json.loads of very deep nesting
        raise RequestError(400, "the request body nests too deeply") from None


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:
    """``await work``, cancelled (``RequestError`` 499) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():  # the client went away (or this handler is being cancelled)
            task.cancel()
            await asyncio.wait((task,))  # its cleanup (job cancelled, blocks back) runs now
    if task.cancelled():
        raise RequestError(CLIENT_GONE, "client closed the request")
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body was read already; nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _generate(service: ChatService, run: Running, ids: list[int]) -> AsyncIterator[str]:
    """Text deltas with stop strings applied; appends the generated token ids to ``ids``.

    The streamed and the whole answer are the same text: text that may still begin a stop
    string is held back until the next tokens decide. At a stop string the job is cancelled
    (closing ``service.tokens`` does that).
    """
    detok, stops = Detokenizer(service.tokenizer), StopStrings(run.request.stop)
    async with contextlib.aclosing(service.tokens(run)) as tokens:
        async for token in tokens:
            ids.append(token)
            detok.push(token)
            if delta := stops.feed(detok.text):
                yield delta
            if stops.stopped:
                run.request.timings["finish_reason"] = "stop"
                return
    detok.flush()
    delta = stops.feed(detok.text, final=True)
    if stops.stopped:
        run.request.timings["finish_reason"] = "stop"
    if delta:
        yield delta


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
        "epd": _epd(req, ids),
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

    outcome = str(CLIENT_GONE)  # unless the stream ends otherwise
    try:
        yield chunk({"role": "assistant", "content": ""})
        ids: list[int] = []
        try:
            async for delta in _generate(service, run, ids):
                yield chunk({"content": delta})
        except RequestError as exc:
            outcome = str(exc.status)
            yield _sse_error(exc.status, exc.message)
            return
        except Exception as exc:  # our bug, after the 200 went out: say so in the stream
            log.exception("request %s: streaming failed", req.rid)
            outcome = "500"
            yield _sse_error(500, f"internal server error ({type(exc).__name__})")
            return
        usage = _finish(metrics, run, ids)
        outcome = ""  # counted as 200 by _finish
        extra = {"epd": _epd(req, ids)}
        yield chunk({}, req.timings.get("finish_reason", "stop"), **extra)
        if req.include_usage:
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if outcome:
            metrics.requests.labels(status=outcome).inc()


def _sse_error(status: int, message: str) -> str:
    return f"data: {json.dumps({'error': {'message': message, 'code': status}})}\n\n"


def _cache(cache: Any) -> dict[str, Any]:
    """The image cache in /health's pool: resident images and the blocks they hold."""
    if cache is None:
        return {"image_cache": False}
    return {"image_cache": True, "resident_images": len(cache), "resident_blocks": cache.blocks,
            "idle_resident_blocks": cache.idle_blocks, "image_cache_max_blocks": cache.max_blocks,
            "image_cache_hits": cache.hits, "image_cache_misses": cache.misses}  # fmt: skip


def _epd(req: Any, ids: list[int]) -> dict[str, Any]:
    """Our extension of a response: token ids, timings, and each video's sampled frame indices
    (so a client can reproduce what the model saw)."""
    out: dict[str, Any] = {"token_ids": list(ids), "timings": _public(req.timings)}
    videos = req.prompt.video_frame_indices if req.prompt is not None else []
    if videos:
        out["video_frame_indices"] = videos
    return out


def _public(timings: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in timings.items()}


async def _pool_host(receiver: Any) -> dict[str, Any]:
    """Where the pool's memory is: this process, or (``--engine sglang``) SGLang's scheduler
    process, with its counters (visual rows copied out of the pool into the model's inputs)."""
    if receiver.local:
        return {"host_pid": os.getpid(), "device": str(receiver.buffers.embeds.device)}
    out: dict[str, Any] = {
        "host_pid": receiver.host.hello.pid,
        "device": receiver.host.hello.device,
    }
    try:
        stats = await receiver.host.stats(timeout_s=1.0)
    except Exception as exc:  # noqa: BLE001 - health still answers
        out["host_error"] = f"{type(exc).__name__}: {exc}"
        return out
    out.update(rows_copied=stats.rows_copied, copy_calls=stats.copy_calls, verified=stats.verified,
               decode_steps=stats.decode_steps, decode_rows=stats.decode_rows,
               torch_threads=stats.torch_threads)  # fmt: skip
    return out
