"""One encode request's state on the encode server, from EncodeRequest to TransferDone."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

import protocol as P
from encode_server.preprocess import PreprocessedPrompt
from transfer import Destination


class Stage(enum.Enum):
    QUEUED = "queued"  # received, not preprocessed yet
    AWAIT_VISION = "await_vision"  # preprocessed, AllocRequest sent, ViT not run yet
    AWAIT_GRANT = "await_grant"  # ViT done, no grant yet
    TRANSFERRING = "transferring"


@dataclass(slots=True)
class Job:
    peer: bytes  # ZeroMQ identity of the language server that asked
    rid: str
    request: P.EncodeRequest | None  # until preprocessed
    received_at: float
    prompt: PreprocessedPrompt | None = None
    stage: Stage = Stage.QUEUED
    dest: Destination | None = None
    generation: int = 0
    embeds: torch.Tensor | None = None
    deepstack: torch.Tensor | None = None
    checksum: int = 0
    deadline: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Unique across peers: the transport's request id."""
        return f"{self.peer.hex()}/{self.rid}"

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def span(self, start: str, end: str) -> float:
        if start not in self.marks or end not in self.marks:
            return 0.0
        return max(0.0, self.marks[end] - self.marks[start])

    def drop_tensors(self) -> None:
        self.embeds = self.deepstack = None
