"""``SGLangEngine``: the language model on SGLang's engine, in process (``epd-language --engine sglang``).

SGLang's ``Engine`` runs its scheduler (the model, ``Qwen3MoeForCausalLMWithDeepStack`` from
``language_server.engines.sglang.models``) and detokenizer in subprocesses it spawns, and its tokenizer
manager in this process on an asyncio loop. That loop is ours and runs on a dedicated thread
("sglang-loop"), which also builds the engine (SGLang's children die with the thread that spawned
them): ``submit`` (called on the server's loop) schedules one coroutine per job there with
``run_coroutine_threadsafe``, the coroutine streams SGLang's output and calls ``job.emit``, which
the service already makes thread-safe. Why not the server's own loop: SGLang's tokenizer manager
installs SIGTERM/SIGQUIT handlers on the loop it first runs on when that is the main thread's,
which would take SIGTERM away from uvicorn; on a thread it installs none, and a slow step of
SGLang's (its multimodal processing, ZeroMQ I/O) never stalls the HTTP server. If an SGLang
process dies, the server exits (status 70) rather than serve errors forever.

Inputs per request are what the encoder computed, never recomputed: the input ids with image pads
already expanded, our M-RoPE positions ``[3, seq]`` (and their decode delta), and the visual rows.
The receive pool lives in SGLang's scheduler process (TP rank 0, on the model's device; see
``engines/sglang/models/pool_host.py`` and docs/sglang.md), so a request's images go as one item
(``image_data``) and its videos as another (``video_data``, with ``video_grid_thw``; SGLang finds
their positions by the video pad tokens, one run per temporal group), each carrying only a
descriptor, ``{"modality": "IMAGE"|"VIDEO", "epd_pool": {"rows", "runs": [[pool_row, rows], ...]}}``
of its rows in prompt order: our model copies
each visual row once, from the pool's views into its input embeddings and DeepStack buffer, and
the blocks go back to the front door's lender when SGLang's stream of the request has ended.
A ``ReceivedPrompt`` with tensors (a pool in this process; the golden test) still goes the old
way: one ``[n, 4H]`` tensor in SGLang's precomputed format (``torch.cat``, then SGLang's copy into
/dev/shm, then the scatter into the model's inputs: three copies). Start-up and SGLang's
arguments: ``launch.py``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from language_server.engines.base import Emit, EngineBase, GenJob, SamplingParams
from language_server.pool.leases import ReceivedPrompt

log = logging.getLogger("epd.language.sglang")
DRAIN_S = 30.0  # an aborted request's stream must end (SGLang's scheduler let go) within this
# Per process: SGLang's multimodal hash of a request's images is keyed, so no client can predict
# it, nor craft images whose hashes collide with another client's (issue 18).
_HASH_KEY = secrets.token_bytes(32)


@dataclass(eq=False)
class SGLangRequest:
    """A job's inputs in SGLang's terms (``GenJob.payload``), and what came back."""

    rid: str
    input_ids: list[int]
    sampling: dict[str, Any]
    image_data: list[dict[str, Any]] | None = None
    video_data: list[dict[str, Any]] | None = None
    release: Callable[[], None] | None = None  # blocks back to the pool (thread-safe, once)
    future: Any = None  # concurrent.futures.Future of the coroutine on the SGLang loop
    started: bool = False  # handed to SGLang (its scheduler may read the rows from then on)
    top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)  # per step


class SGLangEngine(EngineBase):
    """``EngineBase`` on SGLang's in-process ``Engine`` (see the module docstring)."""

    def __init__(self, start: Callable[[], Any], top_logprobs_num: int = 0) -> None:
        """Run ``start()`` (which returns a started ``sglang.Engine``) on the SGLang thread.

        The engine is built on the thread that then runs its loop, because SGLang's children die
        with the thread that spawned them (``PR_SET_PDEATHSIG``). ``top_logprobs_num`` > 0
        records SGLang's top log-probabilities per generated token in
        ``job.payload.top_logprobs`` (for tests). Blocks until the model is loaded.
        """
        self.top_logprobs_num = top_logprobs_num
        self._running = 0
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sglang-loop",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        before = _child_pids()
        started: concurrent.futures.Future = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(_run_into, started, start)
        try:
            self.engine = started.result()
        except BaseException:
            self._stop_loop()
            raise
        self._children = sorted(_child_pids() - before)  # SGLang's scheduler and detokenizer

    def on_child_death(self, *_: Any) -> None:
        """SIGQUIT from SGLang's watchdog (one of its children died): exit with status 70."""
        log.critical("an SGLang process died (see the log above); the language server exits")
        _kill(self._children)
        os._exit(70)

    # --- EngineBase -----------------------------------------------------------------------

    @property
    def active(self) -> int:
        return self._running

    def job_for_text(
        self, input_ids: torch.Tensor, positions: torch.Tensor, params: SamplingParams, emit: Emit
    ) -> GenJob:
        # Text-only M-RoPE positions are arange on all three axes: SGLang computes the same.
        request = SGLangRequest(_rid(), input_ids.tolist(), sampling_params(params))
        return GenJob(input_ids, positions, params, emit, payload=request)

    def job_for_image(self, prompt: ReceivedPrompt, params: SamplingParams, emit: Emit) -> GenJob:
        positions = prompt.positions
        delta = int(positions.max()) + 1 - positions.shape[1]
        kinds = prompt.kinds or ("image",)  # not told: its rows are images, taken as one item
        release, both = None, None
        if prompt.pool_runs is not None:
            release = _once_on(asyncio.get_running_loop(), prompt.release)
        elif prompt.embeds is None or prompt.deepstack is None:
            raise RuntimeError("a received prompt has neither rows nor a pool descriptor")
        else:
            # The pool is in this process: its two views -> SGLang's [n, 4H] layout, the rows'
            # first copy (SGLang then copies them to /dev/shm and into the model's inputs).
            both = torch.cat([prompt.embeds, prompt.deepstack], dim=1)
        # One SGLang item per modality (images, videos), each with its grids and its rows in
        # prompt order; SGLang finds each item's positions by its pad token.
        items: dict[str, list[dict[str, Any]]] = {}
        for kind, grid in (("image", prompt.image_grid_thw), ("video", prompt.video_grid_thw)):
            picked = [i for i, k in enumerate(kinds) if k == kind]
            if not picked:
                continue
            ranges = _row_ranges(prompt, picked)
            item: dict[str, Any] = {
                "format": "processor_output",
                "modality": kind.upper(),  # else SGLang drops the unknown keys below
                f"{kind}_grid_thw": grid,
                "mrope_positions": positions,
                "mrope_position_delta": torch.tensor([[delta]], dtype=torch.long),
                # The radix cache keys visual positions by this: the same items (by content
                # key), the same hash, so a later prompt with the same prefix reuses its KV.
                "hash": multimodal_hash(
                    tuple(prompt.content_keys[i] for i in picked) if prompt.content_keys else ()
                ),  # fmt: skip
            }
            if prompt.pool_runs is not None:
                # The rows stay in the pool (in SGLang's scheduler process); the model copies
                # them from there into its inputs. Plain values only: this crosses SGLang's
                # msgpack.
                runs = [[int(r), int(n)] for r, n in _runs_of(prompt.pool_runs, ranges)]
                item["epd_pool"] = {"v": 1, "rows": sum(n for _, n in runs), "runs": runs}
            else:
                assert both is not None
                item["precomputed_embeddings"] = (
                    both if len(kinds) == len(picked) else torch.cat([both[a:b] for a, b in ranges])
                )
            items[kind] = [item]
        request = SGLangRequest(_rid(), prompt.input_ids.tolist(), sampling_params(params),
                                image_data=items.get("image"), video_data=items.get("video"),
                                release=release)  # fmt: skip
        return GenJob(prompt.input_ids, positions, params, emit, payload=request)

    def submit(self, job: GenJob) -> None:
        if self._closed:
            _release(job.payload)
            job.emit("error", "the SGLang engine is closed")
            return
        job.marks["queued"] = time.perf_counter()
        job.payload.future = asyncio.run_coroutine_threadsafe(self._serve(job), self._loop)

    def cancel(self, job: GenJob) -> None:
        if job.cancelled:
            return
        job.cancelled = True
        request: SGLangRequest = job.payload
        if request.future is not None and not self._closed:
            self._loop.call_soon_threadsafe(self._abort, request)
        else:
            _release(request)

    def close(self) -> None:
        """Stop SGLang's processes (only those it started here), then the loop thread.

        Not ``sglang.Engine.shutdown()``: that kills every child process of this process.
        """
        if self._closed:
            return
        self._closed = True
        watchdog = getattr(self.engine.tokenizer_manager, "_subprocess_watchdog", None)
        if watchdog is not None:
            watchdog.stop()  # else it takes the children's exit for a crash and SIGQUITs us
        _kill(self._children)
        self._stop_loop()
        processor = getattr(self.engine.tokenizer_manager, "mm_processor", None)
        if processor is not None:
            processor.shutdown()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    # --- on the SGLang loop ---------------------------------------------------------------

    async def _serve(self, job: GenJob) -> None:
        request: SGLangRequest = job.payload
        if job.cancelled:
            _release(request)
            return
        self._running += 1
        request.started = True
        job.marks["prefill_start"] = time.perf_counter()
        try:
            reason = await self._stream(job, request)
            if not job.cancelled:
                job.emit("end", reason)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the engine
            self._abort_in_sglang(request)  # nobody reads it: stop SGLang computing it
            if not job.cancelled:  # (an aborted non-streamed request ends in an exception)
                log.exception("SGLang generation failed for %s", request.rid)
                job.emit("error", f"{type(exc).__name__}: {exc}")
        finally:
            self._running -= 1
            # SGLang is done with the request: its stream ended (finished, or its scheduler
            # answered our abort: an aborted request still runs one forward, whose KV goes into
            # the radix cache under the images' hash, so its rows must not change before then).
            _release(request)

    async def _stream(self, job: GenJob, request: SGLangRequest) -> str:
        logprobs = self.top_logprobs_num > 0
        out = await self.engine.async_generate(
            input_ids=request.input_ids, image_data=request.image_data,
            video_data=request.video_data,
            sampling_params=request.sampling, stream=job.stream, rid=request.rid,
            return_logprob=logprobs, top_logprobs_num=self.top_logprobs_num if logprobs else None,
        )  # fmt: skip
        chunks = out if job.stream else _one(out)
        sent = 0
        async for chunk in chunks:
            if job.cancelled:
                continue  # aborted in SGLang: read on until its scheduler says it let go
            ids, meta = chunk["output_ids"], chunk["meta_info"]
            if "cached_tokens" in meta:  # prompt tokens whose KV came from SGLang's radix cache
                job.marks["prefix_cached_tokens"] = meta["cached_tokens"]
            finish = meta.get("finish_reason") or {}
            if finish.get("type") == "stop" and ids and finish.get("matched") == ids[-1]:
                ids = ids[:-1]  # a stop token (ours, or the model's EOS) is not returned
            if logprobs:
                request.top_logprobs = [_pairs(step) for step in meta["output_top_logprobs"]]
            for token in ids[sent:]:
                if job.generated == 0:
                    job.marks["first_token"] = time.perf_counter()
                job.generated += 1
                job.emit("token", int(token))
            sent = max(sent, len(ids))
            if finish:
                return _finish_reason(finish)
        if job.cancelled:
            return "cancelled"
        raise RuntimeError("SGLang's stream ended without a finish reason")

    def _abort(self, request: SGLangRequest) -> None:
        self._abort_in_sglang(request)
        if not request.started:  # never reached SGLang: nothing can read its rows
            request.future.cancel()
            _release(request)  # a coroutine cancelled before it ran has no finally
            return
        # Its stream ends once SGLang's scheduler has dropped the request; the blocks come back
        # then (``_serve``'s finally). A scheduler that never answers: stop waiting after a while.
        self._loop.call_later(DRAIN_S, self._stop_draining, request)

    def _stop_draining(self, request: SGLangRequest) -> None:
        if not request.future.done():
            log.warning("SGLang did not end aborted request %s within %.0f s; its blocks come "
                        "back now", request.rid, DRAIN_S)  # fmt: skip
            request.future.cancel()

    def _abort_in_sglang(self, request: SGLangRequest) -> None:
        try:
            self.engine.tokenizer_manager.abort_request(rid=request.rid)
        except Exception:  # noqa: BLE001 - the request may be finished already
            log.debug("abort of %s failed", request.rid, exc_info=True)


def _row_ranges(prompt: ReceivedPrompt, picked: list[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of visual items ``picked`` among the prompt's rows (prompt order); a
    prompt that does not say its items' rows is one item."""
    sizes = prompt.item_rows or (int(prompt.visual_mask.sum()),)
    starts = list(itertools.accumulate(sizes, initial=0))
    return [(starts[i], starts[i + 1]) for i in picked]


def _runs_of(runs: list[tuple[int, int]], ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of pool ``runs`` ((pool_row, rows), holding the prompt's rows in order) that
    hold prompt rows ``ranges`` (sorted ``[start, end)``), in prompt order."""
    out, row = [], 0
    for pool_row, n in runs:
        for lo, hi in ranges:
            a, b = max(lo, row), min(hi, row + n)
            if a < b:
                out.append((pool_row + a - row, b - a))
        row += n
    return out


def _once_on(loop: asyncio.AbstractEventLoop, fn: Callable[[], None] | None) -> Callable[[], None]:
    """``fn`` run once, on ``loop`` (the server's: the receiver is not thread-safe)."""
    done = threading.Lock()

    def call() -> None:
        if fn is not None and done.acquire(blocking=False):
            with contextlib.suppress(RuntimeError):  # the server's loop is closed: shutting down
                loop.call_soon_threadsafe(fn)

    return call


async def _one(item: Any) -> Any:
    yield item


def multimodal_hash(content_keys: tuple[bytes, ...]) -> int:
    """SGLang's multimodal hash for a request's images (62 bits, as SGLang's own).

    Keyed (HMAC-SHA256 under this process's secret) over the images' content keys in prompt
    order, so the same images give the same hash and SGLang's radix cache reuses the KV of a
    prompt that starts the same; a client can neither predict a hash nor aim at another's.
    No keys (the image cache is off): random, unique to the request, never shared.
    """
    if not content_keys:
        return secrets.randbits(62)
    digest = hmac.new(_HASH_KEY, b"".join(content_keys), "sha256").digest()
    return int.from_bytes(digest[:8], "big") >> 2


def _release(request: SGLangRequest) -> None:
    if request.release is not None:
        request.release()


def sampling_params(params: SamplingParams) -> dict[str, Any]:
    """Our ``SamplingParams`` as SGLang's sampling-params dict."""
    out: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
    }
    if params.stop_token_ids:
        out["stop_token_ids"] = list(params.stop_token_ids)
    else:
        out["ignore_eos"] = True  # no stop token at all, as the reference engine
    if params.seed is not None:
        out["sampling_seed"] = params.seed  # honoured with --enable-deterministic-inference
    return out


def _run_into(future: concurrent.futures.Future, fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
        future.set_exception(exc)


def _child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children()}


def _kill(pids: list[int]) -> None:
    """SIGKILL ``pids`` and their descendants and reap them, as SGLang's own shutdown does."""
    import psutil

    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            parent = psutil.Process(pid)
            procs += [*parent.children(recursive=True), parent]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)


def _rid() -> str:
    return f"epd-{secrets.token_hex(8)}"


def _pairs(step: Any) -> list[tuple[float, int]]:
    return [(float(lp), int(tok)) for lp, tok, *_ in step or []]


def _finish_reason(finish: dict[str, Any]) -> str:
    kind = finish.get("type")
    if kind in ("length", "stop"):
        return kind
    raise RuntimeError(f"SGLang ended the request: {finish.get('message') or finish}")
