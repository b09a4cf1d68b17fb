"""The reference engine (``--engine transformers``): the contract of ``engines/base.py`` on our
``Qwen3MoeForCausalLMWithDeepStack`` and transformers' modules.

``Engine`` runs transformers' modules on one worker thread; sequences are
interleaved one step at a time (each active sequence advances by one token per round), so a new
request's prefill does not wait for older requests to finish.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import torch

from language_server.config import LanguageConfig
from language_server.engines.base import Emit, EngineBase, GenJob, SamplingParams
from language_server.engines.reference.generate import build_input_embeds, stream
from language_server.engines.reference.model import Qwen3MoeForCausalLMWithDeepStack
from language_server.pool.leases import ReceivedPrompt
from transfer import DTYPES

log = logging.getLogger("epd.language.engine")


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


def build(config: LanguageConfig, pool_address: str = "") -> Engine:
    """The registry's builder: the language weights of ``config.model`` on ``config.device``.
    The pool stays in the front door's process (``pool_address`` is unused)."""
    model = Qwen3MoeForCausalLMWithDeepStack.from_pretrained(
        config.model, config.device, DTYPES[config.dtype]
    )
    return Engine(model)
