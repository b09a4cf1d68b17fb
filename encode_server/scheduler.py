"""The encoder's job scheduler: pixels for queued jobs, then one ViT forward per batch.

Jobs arrive with their destination already lent, so nothing waits for a grant: a job goes
QUEUED -> (preprocess: decode, resize, patches; its grid must equal the one the language side
computed) -> AWAIT_VISION -> (one ViT forward over a batch of jobs, split into embeds and
deepstack) -> AWAIT_READY, from which ``transfers`` starts the write once the split's kernels
have completed. Preprocessing runs in bounded slices so the loop keeps answering messages.

With the image cache (``cache.RowCache``), preprocessing starts with a lookup by the image's
bytes: a hit skips the decode and the ViT; its rows are copied from the cache into the job's
staging span in the batch step, and a miss's rows are kept in the cache after the forward.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from encode_server.cache import RowCache
from encode_server.jobs import Job, Stage
from encode_server.staging import Span, StagingArena
from encode_server.vision import VisionEncoder

log = logging.getLogger("epd.encode.scheduler")

Fail = Callable[[Job, str, str], None]  # (job, stage, reason): report and forget the job


class JobScheduler:
    def __init__(self, encoder: VisionEncoder, dtype: str, arena: StagingArena,
                 max_batch_images: int, max_batch_tokens: int, fail: Fail,
                 cache: RowCache | None = None) -> None:  # fmt: skip
        self.encoder, self.dtype, self.arena, self.cache = encoder, dtype, arena, cache
        self.max_batch_images, self.max_batch_tokens = max_batch_images, max_batch_tokens
        self.fail = fail
        self.cuda = encoder.device.type == "cuda"
        self.stalled = False  # the last batch was cut short by a full staging arena

    def check(self, job: Job) -> str:
        """Why ``job`` cannot be served by this encoder ("" when it can)."""
        m = job.msg
        if m.hidden != self.encoder.hidden or m.dtype != self.dtype:
            return (
                f"pool is {m.dtype} x {m.hidden}, this encoder {self.dtype} x {self.encoder.hidden}"
            )
        return ""

    def preprocess_some(self, jobs: list[Job], budget_s: float = 0.2) -> None:
        """Preprocess queued jobs (oldest first) for at most ``budget_s``."""
        start = time.perf_counter()
        for job in [j for j in jobs if j.stage is Stage.QUEUED][: self.max_batch_images]:
            if time.perf_counter() - start > budget_s:
                return
            self._preprocess(job)

    def _preprocess(self, job: Job) -> None:
        job.mark("preprocess_start")
        expected = (tuple(job.msg.grid), job.msg.n_tokens)
        if self.cache is not None:
            job.cache_key = RowCache.key(job.msg)
            entry = self.cache.get(job.cache_key)
            if entry is not None:
                if (entry.grid, entry.n_tokens) != expected:
                    self._wrong_grid(job, entry.grid, entry.n_tokens)
                    return
                job.mark("preprocessed")
                job.cached, job.stage = entry, Stage.AWAIT_VISION
                return
        try:
            m = job.msg
            image = self.encoder.preprocess(m.data, m.frames, m.frame_data)
        except ValueError as exc:
            self.fail(job, "preprocess", str(exc))
            return
        if (tuple(image.grid), image.n_tokens) != expected:
            self._wrong_grid(job, image.grid, image.n_tokens)
            return
        job.mark("preprocessed")
        job.decode_s = image.decode_s
        job.image, job.stage = image, Stage.AWAIT_VISION

    def _wrong_grid(self, job: Job, grid: tuple[int, ...], n_tokens: int) -> None:
        self.fail(job, "preprocess", f"image preprocesses to grid {list(grid)} ({n_tokens} "
                  f"tokens), the job expects {job.msg.grid} ({job.msg.n_tokens} tokens)")  # fmt: skip

    def encode_batch(self, jobs: list[Job]) -> None:
        """One ViT forward over the next batch of preprocessed jobs, rows split straight into
        the staging arena; jobs whose rows are cached get them copied there instead."""
        batch, spans = self._next_batch(jobs)
        if not batch:
            return
        pairs = list(zip(batch, spans, strict=True))
        fresh = [(j, s) for j, s in pairs if j.cached is None]
        t0 = time.perf_counter()
        try:
            outputs = self.encoder.run_vision(
                [j.image for j, _ in fresh],  # type: ignore[misc]
                out=[(s.embeds, s.deepstack) if s is not None else None for _, s in fresh],
            )
        except Exception as exc:  # noqa: BLE001 - a ViT failure fails its batch, not the server
            log.exception("vision forward failed for %d jobs", len(fresh))
            for job, span in fresh:
                job.staging = span  # given back when the job is finished
                self.fail(job, "vision", f"{type(exc).__name__}: {exc}")
            outputs, fresh = [], []
        t1 = time.perf_counter()
        for (job, span), (embeds, deepstack) in zip(fresh, outputs, strict=True):
            if self.cache is not None and job.image is not None:
                self.cache.put(job.cache_key, job.image.grid, embeds, deepstack)
            job.marks.update(vision_start=t0, vision_end=t1)
            self._rows(job, span, embeds, deepstack)
        for job, span in pairs:
            if job.cached is not None:
                hit = job.cached
                if span is not None:  # the write reads registered memory: the arena
                    span.embeds.copy_(hit.embeds)
                    span.deepstack.copy_(hit.deepstack)
                    embeds, deepstack = span.embeds, span.deepstack
                else:  # larger than the arena: fresh memory, registered for this write alone
                    embeds, deepstack = hit.embeds.clone(), hit.deepstack.clone()
                job.marks.update(vision_start=t1, vision_end=t1)  # no ViT
                self._rows(job, span, embeds, deepstack)
        ready = _event() if self.cuda else None
        for job, _ in pairs:
            if job.stage is Stage.AWAIT_READY:
                job.ready = ready

    @staticmethod
    def _rows(job: Job, span: Span | None, embeds: torch.Tensor, deepstack: torch.Tensor) -> None:
        job.embeds, job.deepstack, job.staging = embeds, deepstack, span
        job.image, job.stage = None, Stage.AWAIT_READY

    def _next_batch(self, jobs: list[Job]) -> tuple[list[Job], list[Span | None]]:
        """The oldest preprocessed jobs that fit one forward, each with its staging span (None:
        larger than the whole arena, so fresh memory). Stops at a job the arena has no room
        for yet (``stalled``): the encoder does not run ahead of its writes."""
        batch: list[Job] = []
        spans: list[Span | None] = []
        tokens = 0
        self.stalled = False
        for job in jobs:
            if job.stage is not Stage.AWAIT_VISION:
                continue
            n = job.msg.n_tokens
            if batch and (
                len(batch) >= self.max_batch_images or tokens + n > self.max_batch_tokens
            ):
                break
            span = self.arena.take(n) if self.arena.fits(n) else None
            if span is None and self.arena.fits(n):
                self.stalled = True
                break
            batch.append(job)
            spans.append(span)
            tokens += n
        return batch, spans


def _event() -> torch.cuda.Event:
    """A CUDA event after everything queued so far on the current stream (the split)."""
    event = torch.cuda.Event()
    event.record()
    return event


def rows_ready(job: Job) -> bool:
    """Whether the kernels that wrote ``job``'s rows have completed (always, on the CPU)."""
    return job.ready is None or bool(job.ready.query())
