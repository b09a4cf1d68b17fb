"""The receive pool's host inside SGLang's scheduler process (TP rank 0), where the model runs.

With ``--engine sglang`` the front door passes ``epd_pool`` (address of its channel, transport,
sizes, dtype) in ``json_model_override_args``; our model's ``__init__`` calls ``start_host`` on
TP rank 0 of the first pipeline stage, which allocates ``MultimodalDataBuffers`` on the model's
device, registers it with the transport (encoders write straight into it), and announces it
(``PoolHello``) on the channel. A thread then answers the front door: ``VerifyRows`` runs the
one verification code (``MultimodalDataBuffers.checksum``, the same the front door runs when
the pool is its own) on the rows in place, ``PoolStatsQuery`` returns the copy counters.

The model copies rows out of the pool on the scheduler's main thread (``copy_rows``): once per
visual row per prefill, straight into the batch's input embeddings and DeepStack buffer. The
front door lends the blocks and takes them back when SGLang's stream of the request has ended
(the pool itself never frees anything), so no block is reused while a forward may read it.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch
import zmq

from protocol.codec import ProtocolError
from protocol.pool import (
    PoolHello,
    PoolStats,
    PoolStatsQuery,
    RowsVerdict,
    VerifyRows,
    decode_pool,
    encode_pool,
)
from transfer import DTYPES, MultimodalDataBuffers, make_receiver

log = logging.getLogger("epd.language.pool_host")

HOST: PoolHost | None = None  # this process's pool (TP rank 0 only)


class PoolHost:
    def __init__(self, spec: dict[str, Any], hidden: int, device: torch.device | str) -> None:
        dtype = DTYPES[spec["dtype"]]
        self.transport = make_receiver(spec["transport"], **spec.get("options", {}))
        self.buffers = MultimodalDataBuffers(int(spec["num_blocks"]), int(spec["block_tokens"]),
                                             hidden, dtype, self.transport, device)  # fmt: skip
        self.rows_copied = 0  # visual rows copied out of the pool into model inputs
        self.copy_calls = 0
        self.verified = 0
        self.decode_steps = 0  # decode forwards of this rank, and the sequences they carried
        self.decode_rows = 0
        self.torch_threads = 0  # intra-op threads of the thread that runs the forwards
        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.PAIR)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 16 << 20)
        self._sock.connect(spec["address"])
        b = self.buffers
        hello = PoolHello(session=b.session, embed_base=b.embed_base,
                          deepstack_base=b.deepstack_base, num_blocks=b.num_blocks,
                          block_tokens=b.block_tokens, hidden=hidden, dtype=spec["dtype"],
                          device=str(b.embeds.device), pid=os.getpid())  # fmt: skip
        self._sock.send(encode_pool(hello))  # queued until the front door reads it
        self._thread = threading.Thread(target=self._serve, name="epd-pool-host", daemon=True)
        self._thread.start()
        log.info("receive pool in the scheduler process (pid %d): %d blocks x %d tokens on %s, "
                 "%.1f MiB, session %s", os.getpid(), b.num_blocks, b.block_tokens,
                 b.embeds.device, b.capacity_tokens * b.bytes_per_token / 2**20,
                 b.session)  # fmt: skip

    def copy_rows(self, embeds: torch.Tensor, deepstack: torch.Tensor | None, dest: int,
                  pool_row: int, n: int) -> None:  # fmt: skip
        """Rows ``pool_row..+n`` of the pool into rows ``dest..+n`` of the model's inputs (the
        one copy of each visual row; slices of contiguous rows, so views, no staging)."""
        b = self.buffers
        embeds[dest : dest + n].copy_(b.embeds[pool_row : pool_row + n], non_blocking=True)
        if deepstack is not None:
            width = deepstack.shape[1]
            deepstack[dest : dest + n].copy_(b.deepstack[pool_row : pool_row + n, :width],
                                             non_blocking=True)  # fmt: skip
        self.rows_copied += n
        self.copy_calls += 1

    def count_decode(self, batch_size: int) -> None:
        """One decode forward over ``batch_size`` sequences (called by the model)."""
        self.decode_steps += 1
        self.decode_rows += batch_size
        self.torch_threads = torch.get_num_threads()

    def _serve(self) -> None:
        device = self.buffers.embeds.device
        if device.type == "cuda":  # checksums on their own stream: never queued behind a forward
            torch.cuda.set_device(device)
            with torch.cuda.stream(torch.cuda.Stream(device)):
                self._loop()
        else:
            self._loop()

    def _loop(self) -> None:
        while True:
            try:
                data = self._sock.recv(copy=False)
            except zmq.ZMQError:
                return  # the context was terminated
            try:
                self._answer(decode_pool(data.buffer))
            except ProtocolError as exc:
                log.warning("pool channel: message dropped: %s", exc)
            except Exception:  # noqa: BLE001 - the pool's host must keep answering
                log.exception("pool channel: handling a message failed")

    def _answer(self, msg: Any) -> None:
        if isinstance(msg, VerifyRows):
            problem = self.buffers.verify(list(msg.blocks), msg.n_tokens, msg.checksum)
            self.verified += 1
            self._sock.send(encode_pool(RowsVerdict(id=msg.id, problem=problem)))
        elif isinstance(msg, PoolStatsQuery):
            stats = PoolStats(id=msg.id, rows_copied=self.rows_copied, copy_calls=self.copy_calls,
                              verified=self.verified, pid=os.getpid(),
                              decode_steps=self.decode_steps, decode_rows=self.decode_rows,
                              torch_threads=self.torch_threads)  # fmt: skip
            self._sock.send(encode_pool(stats))
        else:
            log.warning("pool channel: unexpected %s dropped", type(msg).__name__)


def start_host(spec: dict[str, Any], hidden: int, device: torch.device | str) -> PoolHost:
    """Create this process's pool (once) and announce it to the front door."""
    global HOST
    if HOST is None:
        HOST = PoolHost(spec, hidden, device)
    return HOST
