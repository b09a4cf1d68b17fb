"""Generation engines: the contract the service drives, and the reference engine.

``EngineBase`` is what ``ChatService`` needs from an engine (the reference engine here, or
SGLang's). ``Engine`` runs transformers' modules on one worker thread; sequences are
interleaved one step at a time (each active sequence advances by one token per round), so a new
request's prefill does not wait for older requests to finish.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from language_server.generate import SamplingParams, build_input_embeds, stream
from language_server.model import Qwen3MoeForCausalLMWithDeepStack
from language_server.requests import ReceivedPrompt

log = logging.getLogger("epd.language.engine")

Emit = Callable[[str, Any], None]  # ("token", id) | ("end", finish_reason) | ("error", message)


@dataclass(eq=False)
class GenJob:
    input_ids: torch.Tensor  # [seq]
    positions: torch.Tensor  # [3, seq]
    params: SamplingParams
    emit: Emit
    input_embeds: torch.Tensor | None = None
    input_deepstack_embeds: torch.Tensor | None = None
    visual_mask: torch.Tensor | None = None
    payload: Any = None  # engine-specific inputs
    # False: nobody reads tokens before the end (a whole answer, no stop strings to watch), so an
    # engine may deliver them all at once (SGLang then sends one message per request, not per token)
    stream: bool = True
    cancelled: bool = False
    generated: int = 0
    marks: dict[str, float] = field(default_factory=dict)
    _tokens: Iterator[int] | None = None


class EngineBase(ABC):
    """What the language service needs from a generation engine.

    Called from the asyncio loop; no method blocks. Every job ends with exactly one ``emit`` of
    "end" or "error" (after its "token" events), unless it was cancelled first.
    """

    @abstractmethod
    def job_for_text(
        self, input_ids: torch.Tensor, positions: torch.Tensor, params: SamplingParams, emit: Emit
    ) -> GenJob:
        """A job for a prompt without images (``positions`` [3, seq])."""

    @abstractmethod
    def job_for_image(self, prompt: ReceivedPrompt, params: SamplingParams, emit: Emit) -> GenJob:
        """A job for a prompt whose visual rows arrived.

        ``prompt.embeds`` / ``prompt.deepstack`` are views into the receive pool, whose blocks
        are freed as soon as this returns: copy what the job needs before returning.
        """

    @abstractmethod
    def submit(self, job: GenJob) -> None:
        """Queue ``job``; the engine owns its tensors from now on."""

    @abstractmethod
    def cancel(self, job: GenJob) -> None:
        """Stop ``job`` soon; it emits nothing more. Idempotent."""

    @abstractmethod
    def close(self) -> None:
        """Stop the engine and free its resources."""

    @property
    @abstractmethod
    def active(self) -> int:
        """Sequences being generated now."""


class Engine(EngineBase):
    """The reference engine: ``Qwen3MoeForCausalLMWithDeepStack`` on transformers' modules."""

    def __init__(self, model: Qwen3MoeForCausalLMWithDeepStack) -> None:
        self.model = model
        self._inbox: queue.SimpleQueue[GenJob | None] = queue.SimpleQueue()
        self._active: list[GenJob] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    @property
    def active(self) -> int:
        return len(self._active)

    def job_for_text(
        self, input_ids: torch.Tensor, positions: torch.Tensor, params: SamplingParams, emit: Emit
    ) -> GenJob:
        return GenJob(input_ids, positions, params, emit)

    def job_for_image(self, prompt: ReceivedPrompt, params: SamplingParams, emit: Emit) -> GenJob:
        # One copy: the visual rows go into the sequence's [seq, H] / [seq, 3H] inputs.
        if prompt.embeds is None or prompt.deepstack is None:
            raise RuntimeError("the reference engine reads rows from a receive pool in its process")
        embeds, deepstack = build_input_embeds(
            self.model, prompt.input_ids, prompt.visual_mask, prompt.embeds, prompt.deepstack
        )
        mask = prompt.visual_mask.to(self.model.device)
        return GenJob(prompt.input_ids, prompt.positions, params, emit, embeds, deepstack, mask)

    def submit(self, job: GenJob) -> None:
        job.marks["queued"] = time.perf_counter()
        self._inbox.put(job)

    def cancel(self, job: GenJob) -> None:
        job.cancelled = True

    def close(self) -> None:
        self._stop = True
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop:
            self._admit(block=not self._active)
            for job in list(self._active):
                self._step(job)

    def _admit(self, block: bool) -> None:
        try:
            job = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while job is not None:
                self._start(job)
                job = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _start(self, job: GenJob) -> None:
        job._tokens = stream(
            self.model, job.input_ids, job.positions, job.params, job.input_embeds,
            job.input_deepstack_embeds, job.visual_mask,
        )  # fmt: skip
        self._active.append(job)

    def _step(self, job: GenJob) -> None:
        if job.cancelled:
            self._active.remove(job)
            return
        assert job._tokens is not None
        try:
            if job.generated == 0:
                job.marks["prefill_start"] = time.perf_counter()
            token = next(job._tokens)
        except StopIteration:
            self._active.remove(job)
            done = job.generated >= job.params.max_new_tokens
            job.emit("end", "length" if done else "stop")
            return
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the engine
            log.exception("generation failed")
            self._active.remove(job)
            job.emit("error", f"{type(exc).__name__}: {exc}")
            return
        if job.generated == 0:
            job.marks["first_token"] = time.perf_counter()
        job.generated += 1
        job.emit("token", token)
        if job.generated >= job.params.max_new_tokens:  # done now, not at the next round
            self._active.remove(job)
            job.emit("end", "length")
