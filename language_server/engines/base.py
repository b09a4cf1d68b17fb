"""The contract between the language service and a generation engine.

``ChatService`` (``http/service.py``) drives every engine through ``EngineBase`` alone: it builds
a ``GenJob`` from a prompt (with or without visual rows), submits it, and reads its tokens from
``emit``. An engine is chosen by name in ``engines/__init__.py`` (``--engine``); each one lives in
its own subpackage (``reference/``, ``sglang/``) and imports only this file, ``weights.py`` and
the pool's ``ReceivedPrompt``, never the other engine or anything of the HTTP side.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from language_server.pool.leases import ReceivedPrompt


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1.0 mean no filtering.

    Generation stops after ``max_new_tokens`` or at a token in ``stop_token_ids`` (which is not
    returned). ``seed`` makes sampling reproducible (a private torch.Generator).
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative ints")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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
