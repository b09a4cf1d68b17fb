"""The language side of the data plane: grants blocks, checks what arrived, frees blocks.

Owns ``MultimodalDataBuffers``. Runs on the asyncio loop (not thread-safe). Every message from an
encoder is checked against what this side asked for and granted: the request id must be one we
sent to that encoder, sizes and dtype must match the pool, a TransferDone must carry the grant's
generation (a fresh nonce per grant, so a late message can never claim reused blocks), and the
received rows must match the sender's checksum. Blocks go back to the pool on every path.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import protocol as P
from transfer import MultimodalDataBuffers, dtype_name, rows_checksum

log = logging.getLogger("epd.language.receiver")


class RequestError(Exception):
    """A request failed; ``status`` is the HTTP status the client gets."""

    def __init__(self, status: int, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after_s = status, message, retry_after_s


@dataclass(frozen=True)
class ReceivedPrompt:
    """A prompt whose visual rows have arrived: everything the engine needs."""

    input_ids: torch.Tensor  # [seq]
    positions: torch.Tensor  # [3, seq]
    visual_mask: torch.Tensor  # [seq] bool
    embeds: torch.Tensor  # [n_vis, H]: views into the pool, valid only inside on_ready
    deepstack: torch.Tensor  # [n_vis, 3H]
    image_grid_thw: torch.Tensor  # [n_images, 3]
    timings: P.EncodeTimings


@dataclass(eq=False)
class Pending:
    """One request between EncodeRequest and TransferDone."""

    rid: str
    link: Any  # the EncoderLink it was sent to
    on_ready: Callable[[ReceivedPrompt | None, RequestError | None], None]
    alloc: P.AllocRequest | None = None
    blocks: list[int] | None = None
    generation: int = 0
    marks: dict[str, float] = field(default_factory=dict)


class Receiver:
    def __init__(
        self,
        buffers: MultimodalDataBuffers,
        image_token_id: int,
        max_waiting: int = 64,
        max_prompt_tokens: int = 1 << 20,
        merge_size: int = 2,
    ) -> None:
        self.buffers = buffers
        self.merge_size = merge_size
        self.max_prompt_tokens = max_prompt_tokens
        self.image_token_id = image_token_id
        self.max_waiting = max_waiting
        self.dtype = dtype_name(buffers.dtype)
        self.pending: dict[str, Pending] = {}
        self.waiting: deque[Pending] = deque()  # have an AllocRequest, wait for free blocks
        self.peak_used = 0
        self.bytes_received = 0

    def expect(self, pending: Pending) -> None:
        """Register a request about to be sent to ``pending.link``."""
        self.pending[pending.rid] = pending
        pending.marks["sent"] = time.perf_counter()

    # --- messages from encoders -------------------------------------------------------------

    def on_message(self, link: Any, msg: P.Message) -> None:
        rid = getattr(msg, "rid", None)
        req = self.pending.get(rid) if rid else None
        if req is None or req.link is not link:
            log.warning("%s for unknown request %s from %s: dropped", type(msg).__name__, rid,
                        getattr(link, "address", "?"))  # fmt: skip
            return
        if isinstance(msg, P.AllocRequest):
            self._on_alloc(req, msg)
        elif isinstance(msg, P.TransferDone):
            self._on_done(req, msg)
        elif isinstance(msg, P.EncodeFailed):
            status = 400 if msg.stage == "preprocess" else 502
            self.fail(req, RequestError(status, f"encoder failed at {msg.stage}: {msg.reason}"))
        else:
            log.warning("unexpected %s from %s", type(msg).__name__, getattr(link, "address", "?"))

    def _on_alloc(self, req: Pending, msg: P.AllocRequest) -> None:
        req.marks["alloc_received"] = time.perf_counter()
        problem = self._check_alloc(req, msg)
        if problem:
            self.fail(
                req, RequestError(502, f"bad allocation request: {problem}"), deny="bad_request"
            )
            return
        req.alloc = msg
        try:
            blocks = self.buffers.alloc(msg.n_tokens)
        except ValueError as exc:  # can never fit
            self.fail(req, RequestError(413, str(exc)), deny="too_large")
            return
        if blocks is None:
            if len(self.waiting) >= self.max_waiting:
                err = RequestError(503, "receive buffers are full; retry later", retry_after_s=1.0)
                self.fail(req, err, deny="pool_full")
                return
            self.waiting.append(req)
            return
        self._grant(req, blocks)

    def _check_alloc(self, req: Pending, msg: P.AllocRequest) -> str:
        if req.alloc is not None:
            return "duplicate AllocRequest"
        if len(msg.input_ids) > self.max_prompt_tokens:
            return f"prompt has {len(msg.input_ids)} tokens, the limit is {self.max_prompt_tokens}"
        if msg.hidden != self.buffers.hidden or msg.dtype != self.dtype:
            return f"rows are {msg.dtype} x {msg.hidden}, the pool {self.dtype} x {self.buffers.hidden}"
        n_image = sum(1 for t in msg.input_ids if t == self.image_token_id)
        if n_image != msg.n_tokens:
            return f"{msg.n_tokens} visual tokens announced, the prompt has {n_image} image pads"
        grid_tokens = sum(t * h * w for t, h, w in msg.image_grid_thw) // self.merge_size**2
        if grid_tokens != msg.n_tokens:
            return f"image grids hold {grid_tokens} visual tokens, {msg.n_tokens} announced"
        return ""

    def _grant(self, req: Pending, blocks: list[int]) -> None:
        assert req.alloc is not None
        req.blocks, req.generation = blocks, secrets.randbits(63)
        used = self.buffers.num_blocks - self.buffers.num_free
        self.peak_used = max(self.peak_used, used)
        where = self.buffers.describe(blocks)
        req.marks["granted"] = time.perf_counter()
        req.link.send(
            P.AllocGrant(
                rid=req.rid,
                generation=req.generation,
                session=where.session,
                block_tokens=where.block_tokens,
                n_tokens=req.alloc.n_tokens,
                hidden=self.buffers.hidden,
                dtype=self.dtype,  # type: ignore[arg-type]
                blocks=blocks,
                embed_addrs=where.embed_addrs,
                deepstack_addrs=where.deepstack_addrs,
            )  # fmt: skip
        )

    def _on_done(self, req: Pending, msg: P.TransferDone) -> None:
        alloc = req.alloc
        if req.blocks is None or alloc is None or msg.generation != req.generation:
            log.warning("stale or unexpected TransferDone for %s (generation %d): ignored",
                        req.rid, msg.generation)  # fmt: skip
            return
        if msg.n_tokens != alloc.n_tokens:
            self.fail(
                req, RequestError(502, f"{msg.n_tokens} rows reported, {alloc.n_tokens} granted")
            )
            return
        embeds, deepstack = self.buffers.gather(req.blocks, alloc.n_tokens)
        if rows_checksum(embeds, deepstack, self.buffers.block_tokens) != msg.checksum:
            self.fail(req, RequestError(502, "received rows do not match the sender's checksum"))
            return
        req.marks["done_received"] = time.perf_counter()
        self.bytes_received += alloc.n_tokens * self.buffers.bytes_per_token
        ids = torch.tensor(alloc.input_ids, dtype=torch.long)
        prompt = ReceivedPrompt(
            input_ids=ids,
            positions=torch.tensor(alloc.positions, dtype=torch.long),
            visual_mask=ids == self.image_token_id,
            embeds=embeds,
            deepstack=deepstack,
            image_grid_thw=torch.tensor(alloc.image_grid_thw, dtype=torch.long).reshape(-1, 3),
            timings=msg.timings,
        )
        self.pending.pop(req.rid, None)
        req.link.inflight.discard(req.rid)
        req.link.served += 1
        try:
            req.on_ready(prompt, None)  # must copy the rows it needs before returning
        finally:
            self.release(req)

    # --- endings ----------------------------------------------------------------------------

    def fail(self, req: Pending, error: RequestError, deny: str = "") -> None:
        """End ``req`` with ``error``; tell its encoder (deny or abort); free its blocks."""
        if self.pending.pop(req.rid, None) is None:
            return
        req.link.inflight.discard(req.rid)
        if deny:
            req.link.send(P.AllocDenied(rid=req.rid, code=deny, reason=error.message[:4000],  # type: ignore[arg-type]
                                        retry_after_s=error.retry_after_s))  # fmt: skip
        else:
            req.link.send(P.Abort(rid=req.rid, reason=error.message[:4000]))
        self.release(req)
        log.warning("request %s failed (%d): %s", req.rid, error.status, error.message)
        req.on_ready(None, error)

    def release(self, req: Pending) -> None:
        """Return ``req``'s blocks (idempotent) and hand freed blocks to waiting requests."""
        if req.blocks is not None:
            self.buffers.free(req.blocks)
            req.blocks = None
        if req in self.waiting:
            self.waiting.remove(req)
        while self.waiting:
            head = self.waiting[0]
            assert head.alloc is not None
            blocks = self.buffers.alloc(head.alloc.n_tokens)
            if blocks is None:
                break
            self.waiting.popleft()
            self._grant(head, blocks)
