"""Request records shared by the language server's receiver, dispatcher, service and engines."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import protocol as P


class RequestError(Exception):
    """A request failed; ``status`` is the HTTP status the client gets."""

    def __init__(self, status: int, message: str, retry_after_s: float = 0.0,
                 param: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.retry_after_s = status, message, retry_after_s
        self.param = param  # the request field at fault, when one is


@dataclass(frozen=True)
class ReceivedPrompt:
    """A prompt whose visual rows have arrived: everything an engine needs.

    The rows come one of two ways. Pool here: ``embeds``/``deepstack`` are views into it,
    valid only inside ``on_ready`` (the engine copies them). Pool in the engine's own process
    (``--engine sglang``): ``pool_runs`` says where the rows are, ``(pool_row, rows)`` in
    order, and the engine calls ``release()`` once it will not read them again.
    """

    input_ids: torch.Tensor  # [seq]
    positions: torch.Tensor  # [3, seq]
    visual_mask: torch.Tensor  # [seq] bool
    embeds: torch.Tensor | None  # [n_vis, H]
    deepstack: torch.Tensor | None  # [n_vis, 3H]
    image_grid_thw: torch.Tensor  # [n_images, 3] (images only)
    timings: P.EncodeTimings  # of the image that finished last (the critical path)
    n_visual: int = 0  # visual rows in all
    pool_runs: list[tuple[int, int]] | None = None
    release: Callable[[], None] | None = None
    cached_images: int = 0  # images whose rows were resident: no encode, no transfer
    cached_tokens: int = 0
    # Each image's content key in prompt order, when rows may be shared across requests (the
    # image cache is on): the SGLang engine derives its multimodal hash from them. Empty: never.
    content_keys: tuple[bytes, ...] = ()
    encoder_cached_images: int = 0  # images an encoder served from its own cache (no ViT)
    video_grid_thw: torch.Tensor | None = None  # [n_videos, 3]
    kinds: tuple[str, ...] = ()  # each visual item's kind ("image" / "video"), prompt order
    item_rows: tuple[int, ...] = ()  # each visual item's rows, prompt order


class LeaseState(enum.Enum):
    WAITING = "waiting"  # no blocks yet (the request waits for room in the pool)
    SENT = "sent"  # blocks lent to ``link``; its EncodeJob is out
    WRITTEN = "written"  # TransferDone arrived: the write ended; the rows are being checked
    VERIFIED = "verified"  # TransferDone checked: the rows are in the blocks
    ORPHANED = "orphaned"  # the request ended; the blocks wait for their writer to let go
    CACHED = "cached"  # the image's rows are resident (``resident``): no job, never lent


@dataclass(eq=False)
class Lease:
    """One image of one request: its encode job and the blocks lent to that job's writer.

    The blocks return to the pool only by the rule in ``transfer/base.py``: rows consumed,
    the writer said its write stopped, or the writer can no longer write.
    """

    request: Pending
    image: int
    n_tokens: int
    blocks: list[int] | None = None
    generation: int = 0
    link: Any = None  # the EncoderLink the job went to
    incarnation: int = 0  # of that encoder process, when the job went out
    state: LeaseState = LeaseState.WAITING
    dead_since: float = 0.0  # when its writer was declared dead (0: alive)
    timings: P.EncodeTimings | None = None
    content_key: bytes = b""  # SHA-256 of the image's bytes and row settings (prompt/builder.py)
    resident: Any = None  # the pool.cache.Resident whose rows it reads (one reference)

    @property
    def key(self) -> tuple[str, int, int]:
        return self.request.rid, self.image, self.generation


@dataclass(eq=False)
class Pending:
    """One request with images, from its first encode job until its rows were consumed."""

    rid: str
    prompt: Any  # language_server.prompt.PreparedPrompt
    on_ready: Callable[[ReceivedPrompt | None, RequestError | None], None]
    leases: list[Lease] = field(default_factory=list)
    waiting_since: float = 0.0  # when it started waiting for free blocks (0: not waiting)
    attempts: int = 1
    marks: dict[str, float] = field(default_factory=dict)
