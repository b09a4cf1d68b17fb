"""The language side of the data plane: grants blocks, checks what arrived, frees blocks.

Owns ``MultimodalDataBuffers``. Runs on the asyncio loop (not thread-safe). Every message from an
encoder is checked against what this side asked for and granted: the request id must be one we
sent to that encoder, sizes, dtype and image grids must match, a TransferDone must carry the
grant's generation (a fresh random nonce per grant, so a late message can never claim reused
blocks), and the received rows must match the sender's checksum.

Blocks go back to the pool on every path. When a request ends while its encoder may still be
writing (timeout, encoder gone), its blocks are quarantined for ``quarantine_s`` before reuse,
so a late write can never land in another request's rows.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from typing import Any

import numpy as np
import torch

import protocol as P
from language_server.requests import Pending, ReceivedPrompt, RequestError
from transfer import MultimodalDataBuffers, dtype_name, rows_checksum

log = logging.getLogger("epd.language.receiver")


class Receiver:
    def __init__(
        self,
        buffers: MultimodalDataBuffers,
        image_token_id: int,
        max_waiting: int = 64,
        max_prompt_tokens: int = 1 << 20,
        merge_size: int = 2,
        alloc_wait_s: float = 10.0,
        quarantine_s: float = 10.0,
    ) -> None:
        self.buffers = buffers
        self.image_token_id, self.merge_size = image_token_id, merge_size
        self.max_waiting, self.max_prompt_tokens = max_waiting, max_prompt_tokens
        self.alloc_wait_s, self.quarantine_s = alloc_wait_s, quarantine_s
        self.dtype = dtype_name(buffers.dtype)
        self.pending: dict[str, Pending] = {}
        self.waiting: deque[Pending] = deque()  # have an AllocRequest, wait for free blocks
        self.quarantine: deque[tuple[float, list[int]]] = deque()
        self.peak_used = 0
        self.dropped_messages = 0

    @property
    def quarantined_blocks(self) -> int:
        return sum(len(blocks) for _, blocks in self.quarantine)

    def expect(self, pending: Pending) -> None:
        """Register a request about to be sent to ``pending.link``."""
        self.pending[pending.rid] = pending
        pending.marks.setdefault("sent", time.perf_counter())

    # --- messages from encoders -------------------------------------------------------------

    def on_message(self, link: Any, msg: P.Message) -> None:
        rid = getattr(msg, "rid", None)
        req = self.pending.get(rid) if rid else None
        if req is None or req.link is not link:
            self.dropped_messages += 1
            log.warning("%s for unknown request %s from %s: dropped", type(msg).__name__, rid,
                        getattr(link, "address", "?"))  # fmt: skip
            if isinstance(msg, P.AllocRequest):  # let the encoder drop it now, not at its timeout
                link.send(P.AllocDenied(rid=msg.rid, code="unknown_request", reason="not ours"))
            return
        if isinstance(msg, P.AllocRequest):
            self._on_alloc(req, msg)
        elif isinstance(msg, P.TransferDone):
            self._on_done(req, msg)
        elif isinstance(msg, P.EncodeFailed):
            # The encoder stopped its transfer before saying so: blocks can be reused at once.
            self._free_now(req.blocks)
            req.blocks = None
            status = {"preprocess": 400, "overloaded": 503}.get(msg.stage, 502)
            err = RequestError(status, f"encoder failed at {msg.stage}: {msg.reason}",
                               retry_after_s=1.0 if status == 503 else 0.0)  # fmt: skip
            self.fail(req, err)
        else:
            self.dropped_messages += 1
            log.warning("unexpected %s from %s", type(msg).__name__, getattr(link, "address", "?"))

    def _on_alloc(self, req: Pending, msg: P.AllocRequest) -> None:
        req.marks["alloc_received"] = time.perf_counter()
        problem = self._check_alloc(req, msg)
        if problem:
            self.fail(
                req, RequestError(502, f"bad allocation request: {problem}"), deny="bad_request"
            )
            return
        if msg.seq_len > self.max_prompt_tokens:
            err = RequestError(400, f"prompt has {msg.seq_len} tokens, the limit is "
                               f"{self.max_prompt_tokens}")  # fmt: skip
            self.fail(req, err, deny="bad_request")
            return
        req.alloc = msg
        try:
            blocks = self.buffers.alloc(msg.n_tokens)
        except ValueError as exc:  # can never fit
            self.fail(req, RequestError(413, str(exc)), deny="too_large")
            return
        if blocks is not None:
            self._grant(req, blocks)
        elif len(self.waiting) >= self.max_waiting:
            err = RequestError(503, "receive buffers are full; retry later", retry_after_s=1.0)
            self.fail(req, err, deny="pool_full")
        else:
            req.waiting_since = time.monotonic()
            self.waiting.append(req)

    def _check_alloc(self, req: Pending, msg: P.AllocRequest) -> str:
        if req.alloc is not None:
            return "duplicate AllocRequest"
        if msg.hidden != self.buffers.hidden or msg.dtype != self.dtype:
            return f"rows are {msg.dtype} x {msg.hidden}, the pool {self.dtype} x {self.buffers.hidden}"
        n_image = int((msg.token_ids() == self.image_token_id).sum())
        if n_image != msg.n_tokens:
            return f"{msg.n_tokens} visual tokens announced, the prompt has {n_image} image pads"
        grid_tokens = sum(t * h * w for t, h, w in msg.image_grid_thw) // self.merge_size**2
        if grid_tokens != msg.n_tokens:
            return f"image grids hold {grid_tokens} visual tokens, {msg.n_tokens} announced"
        return ""

    def _grant(self, req: Pending, blocks: list[int]) -> None:
        assert req.alloc is not None
        req.blocks, req.generation, req.waiting_since = blocks, secrets.randbits(63), 0.0
        self.peak_used = max(self.peak_used, self.buffers.num_blocks - self.buffers.num_free)
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
        alloc, blocks = req.alloc, req.blocks
        if blocks is None or alloc is None or msg.generation != req.generation:
            self.dropped_messages += 1
            log.warning("stale or unexpected TransferDone for %s (generation %d): ignored",
                        req.rid, msg.generation)  # fmt: skip
            return
        if msg.n_tokens != alloc.n_tokens:
            self.fail(
                req, RequestError(502, f"{msg.n_tokens} rows reported, {alloc.n_tokens} granted")
            )
            return
        embeds, deepstack = self.buffers.gather(blocks, alloc.n_tokens)
        if rows_checksum(embeds, deepstack, self.buffers.block_tokens) != msg.checksum:
            self.fail(req, RequestError(502, "received rows do not match the sender's checksum"))
            return
        req.marks["done_received"] = time.perf_counter()
        ids = torch.from_numpy(alloc.token_ids().astype(np.int64))
        prompt = ReceivedPrompt(
            input_ids=ids,
            positions=torch.from_numpy(alloc.position_ids().astype(np.int64)),
            visual_mask=ids == self.image_token_id,
            embeds=embeds,
            deepstack=deepstack,
            image_grid_thw=torch.tensor(alloc.image_grid_thw, dtype=torch.long).reshape(-1, 3),
            timings=msg.timings,
        )
        self._forget(req)
        req.link.served += 1
        req.blocks = None
        try:
            req.on_ready(prompt, None)  # must copy the rows it needs before returning
        finally:
            self._free_now(blocks)

    # --- endings ----------------------------------------------------------------------------

    def fail(self, req: Pending, error: RequestError, deny: str = "", writing: bool = True) -> None:
        """End ``req`` with ``error``; tell its encoder (deny or abort); free its blocks
        (after a quarantine when its encoder may still be ``writing`` into them)."""
        if not self._forget(req):
            return
        if deny:
            req.link.send(P.AllocDenied(rid=req.rid, code=deny, reason=error.message[:4000],  # type: ignore[arg-type]
                                        retry_after_s=error.retry_after_s))  # fmt: skip
        else:
            req.link.send(P.Abort(rid=req.rid, reason=error.message[:4000]))
        self.detach(req, writing)
        log.warning("request %s failed (%d): %s", req.rid, error.status, error.message)
        req.on_ready(None, error)

    def detach(self, req: Pending, writing: bool = True) -> None:
        """Drop ``req``'s claim on the pool (to fail it or send it elsewhere). Idempotent.

        Granted blocks go to quarantine when the encoder may still be ``writing`` into them.
        """
        blocks, req.blocks = req.blocks, None
        req.alloc, req.generation, req.waiting_since = None, 0, 0.0
        if req in self.waiting:
            self.waiting.remove(req)
        if blocks is not None and writing and self.quarantine_s > 0:
            self.quarantine.append((time.monotonic() + self.quarantine_s, blocks))
        else:
            self._free_now(blocks)

    def tick(self) -> None:
        """Housekeeping, called often: end quarantines, expire long waits, serve waiters."""
        now = time.monotonic()
        while self.quarantine and self.quarantine[0][0] <= now:
            self.buffers.free(self.quarantine.popleft()[1])
        while self.waiting and now - self.waiting[0].waiting_since > self.alloc_wait_s:
            err = RequestError(503, f"no receive blocks freed up within {self.alloc_wait_s:.0f} s",
                               retry_after_s=1.0)  # fmt: skip
            self.fail(self.waiting[0], err, deny="pool_full")
        self._serve_waiting()

    def _serve_waiting(self) -> None:
        while self.waiting:
            head = self.waiting[0]
            assert head.alloc is not None
            blocks = self.buffers.alloc(head.alloc.n_tokens)
            if blocks is None:
                return
            self.waiting.popleft()
            self._grant(head, blocks)

    def _free_now(self, blocks: list[int] | None) -> None:
        if blocks is not None:
            self.buffers.free(blocks)
            self._serve_waiting()

    def _forget(self, req: Pending) -> bool:
        if self.pending.get(req.rid) is not req:
            return False
        del self.pending[req.rid]
        req.link.inflight.discard(req.rid)
        return True
