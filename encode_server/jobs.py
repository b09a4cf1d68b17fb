"""One encode job on the encode server: one image or video, from EncodeJob to its done (or
failed) report."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import protocol as P
from encode_server.vision import PreprocessedImage
from transfer import Destination


class Stage(enum.Enum):
    QUEUED = "queued"  # received, not preprocessed yet
    AWAIT_VISION = "await_vision"  # pixels ready, ViT not run yet
    AWAIT_READY = "await_ready"  # rows split out; their kernels (CUDA event) not complete yet
    TRANSFERRING = "transferring"
    DRAINING = "draining"  # failed or aborted while the transport may still be writing


@dataclass(slots=True)
class Job:
    peer: bytes  # ZeroMQ identity of the language server that sent it
    msg: P.EncodeJob
    received_at: float
    stage: Stage = Stage.QUEUED
    image: PreprocessedImage | None = None
    embeds: torch.Tensor | None = None
    deepstack: torch.Tensor | None = None
    ready: Any = None  # a CUDA event recorded after the split (None on the CPU)
    staging: Any = None  # the staging-arena Span holding embeds/deepstack (None: fresh memory)
    checksum: int = 0
    deadline: float = 0.0
    stop_stage: str = ""  # the stage to report once a DRAINING write has stopped
    stop_reason: str = ""
    cache_key: bytes = b""  # SHA-256 of the image's bytes (encode_server/cache.py)
    cached: Any = None  # the cache's CachedRows when this image's rows were there
    decode_s: float = 0.0  # a video's frame decode (part of preprocessing)
    marks: dict[str, float] = field(default_factory=dict)

    @property
    def rid(self) -> str:
        return self.msg.rid

    @property
    def index(self) -> int:
        return self.msg.image

    @property
    def key(self) -> str:
        """Unique across peers and lendings: the transport's request id."""
        return f"{self.peer.hex()}/{self.msg.rid}/{self.msg.image}/{self.msg.generation}"

    @property
    def dest(self) -> Destination:
        m = self.msg
        return Destination(m.session, m.block_tokens, tuple(m.embed_addrs),
                           tuple(m.deepstack_addrs))  # fmt: skip

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def span(self, start: str, end: str) -> float:
        if start not in self.marks or end not in self.marks:
            return 0.0
        return max(0.0, self.marks[end] - self.marks[start])

    def timings(self) -> P.EncodeTimings:
        return P.EncodeTimings(
            queue_s=self.span("received", "preprocess_start"),
            preprocess_s=self.span("preprocess_start", "preprocessed"),
            decode_s=self.decode_s,
            vision_s=self.span("vision_start", "vision_end"),
            transfer_s=self.span("transfer_start", "transfer_end"),
            vision_cached=self.cached is not None,
        )

    def drop_tensors(self) -> None:
        self.image = self.embeds = self.deepstack = self.ready = self.cached = None
