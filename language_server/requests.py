"""Request records shared by the language server's receiver, service and engines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import protocol as P


class RequestError(Exception):
    """A request failed; ``status`` is the HTTP status the client gets."""

    def __init__(self, status: int, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after_s = status, message, retry_after_s


@dataclass(frozen=True)
class ReceivedPrompt:
    """A prompt whose visual rows have arrived: everything an engine needs."""

    input_ids: torch.Tensor  # [seq]
    positions: torch.Tensor  # [3, seq]
    visual_mask: torch.Tensor  # [seq] bool
    embeds: torch.Tensor  # [n_vis, H]: views into the pool, valid only inside on_ready
    deepstack: torch.Tensor  # [n_vis, 3H]
    image_grid_thw: torch.Tensor  # [n_images, 3]
    timings: P.EncodeTimings


@dataclass(eq=False)
class Pending:
    """One request between EncodeRequest and TransferDone (or its failure)."""

    rid: str
    link: Any  # the EncoderLink it was sent to
    message: P.EncodeRequest  # kept to re-dispatch it to another encoder
    on_ready: Callable[[ReceivedPrompt | None, RequestError | None], None]
    alloc: P.AllocRequest | None = None
    blocks: list[int] | None = None
    generation: int = 0
    waiting_since: float = 0.0  # when it started waiting for free blocks (0: not waiting)
    attempts: int = 1
    marks: dict[str, float] = field(default_factory=dict)
