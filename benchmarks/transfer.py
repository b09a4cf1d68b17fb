"""``epd-bench-transfer``: move one image's embeddings + deepstack rows between two processes.

For each payload (hidden size x visual tokens, bf16) it measures, in the same run:

    mooncake      our path: AllocRequest -> AllocGrant -> batch write -> TransferDone -> ack
    shm           our path over POSIX shared memory (same host)
    *-granted     the same, with the clock started once the grant is here: the encode server
                  asks for it before its ViT forward, so in serving it is usually waiting
    raw-mooncake  Mooncake batch_transfer_sync_write of the same bytes (no control plane)
    zmq-pickle    SGLang-style: pickled metadata + tensor frames, receiver copies into a tensor
    zmq-zerocopy  pyzmq send(copy=False), receiver keeps the frames
    copy          single-thread tensor.copy_ in one process (the same-host limit)

and reports GB/s (1e9 bytes/s; median and best over the repetitions).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import msgpack
import torch
import zmq
from tqdm import tqdm

import protocol as P
from transfer import Destination, TransferState, make_sender, rows_checksum

WARMUP = 3
BACKENDS = (
    "mooncake", "shm", "raw-mooncake", "zmq-pickle", "zmq-zerocopy", "copy",
    "mooncake-granted", "shm-granted",
)  # fmt: skip
FULL = {"hidden": (2048, 4096), "tokens": (256, 1024, 4096, 16384)}
QUICK = {"hidden": (2048,), "tokens": (256, 1024, 4096)}


@dataclass
class Row:
    backend: str
    hidden: int
    tokens: int
    bytes: int
    reps: int
    gbps_median: float
    gbps_best: float
    ms_median: float
    ms_rounds: list[float]  # one time per round, in round order (aligned across backends)


class Bench:
    """The encode-side process: drives the peer over two PAIR sockets, ``control`` for
    commands and our paths' control messages, ``bulk`` for the ZeroMQ baselines' frames (as a
    deployment keeps control and bulk data apart)."""

    def __init__(self, control: str, bulk: str) -> None:
        ctx = zmq.Context.instance()
        self.sock = ctx.socket(zmq.PAIR)
        self.sock.connect(control)
        self.bulk = ctx.socket(zmq.PAIR)
        self.bulk.connect(bulk)
        self._tracker: zmq.MessageTracker | None = None
        self.senders = {"mooncake": make_sender("mooncake"), "shm": make_sender("shm")}
        self.targets: dict[str, tuple[str, int, int]] = {}
        self.seq = 0

    def call(self, *frames: bytes, copy: bool = True) -> bytes:
        self.sock.send_multipart(frames, copy=copy)
        return self.sock.recv()

    def call_bulk(self, *frames: Any) -> bytes:
        """Send tensor frames without copying; return the peer's answer (it holds the data)."""
        self._tracker = self.bulk.send_multipart(frames, copy=False, track=True)
        return self.bulk.recv()

    def settle_bulk(self) -> None:
        """Untimed, after a ZeroMQ baseline: wait until ZeroMQ lets go of our frames and the
        peer has dropped what it received. Left undone, that clean-up (freeing 64 MiB and
        more) ran during whatever was timed next: our path measured 0.85 of raw Mooncake next
        to the ZeroMQ baselines and 0.95 without them."""
        if self._tracker is not None:
            self._tracker.wait(30)
            self._tracker = None
        self.bulk.send(b"drop")
        self.bulk.recv()

    def setup(self, hidden: int, tokens: int) -> None:
        args = {"hidden": hidden, "tokens": tokens, "dtype": "bfloat16"}
        self.targets = msgpack.unpackb(self.call(b"setup", msgpack.packb(args)))

    def ours(self, name: str, e: torch.Tensor, d: torch.Tensor, granted: bool = False) -> float:
        """One request end to end; returns its seconds, ending when the receiver verified it.

        ``granted``: start the clock after the grant arrived (as when the encode server's
        AllocRequest travels during its ViT forward), not before the AllocRequest.
        """
        t0 = time.perf_counter()
        self.seq += 1
        rid, n = f"bench-{self.seq}", e.shape[0]
        ids = [0] * n
        req = P.AllocRequest(
            rid=rid, encoder_id="bench", n_tokens=n, hidden=e.shape[1], dtype="bfloat16",
            input_ids=P.int32s(ids), positions=P.int32s([ids, ids, ids]),
        )  # fmt: skip
        grant = P.decode_as(self.call(b"ours", name.encode(), P.encode(req)), P.AllocGrant)
        if granted:
            t0 = time.perf_counter()
        dest = Destination(
            grant.session,
            grant.block_tokens,
            tuple(grant.embed_addrs),
            tuple(grant.deepstack_addrs),
        )
        sender = self.senders[name]
        sender.submit(rid, dest, e, d)
        checksum = rows_checksum(e, d, grant.block_tokens)  # overlaps the transfer
        state = sender.wait(rid, timeout_s=120)
        sender.release(rid)
        if state is not TransferState.DONE:
            raise RuntimeError(f"{name} transfer ended {state}")
        done = P.TransferDone(rid=rid, generation=grant.generation, n_tokens=n, checksum=checksum)
        ack = msgpack.unpackb(self.call(b"ours", name.encode(), P.encode(done)))
        if not ack["ok"]:
            raise RuntimeError(f"{name}: receiver found corrupt data")
        return float(ack["t"]) - t0

    def raw(self, e: torch.Tensor, d: torch.Tensor) -> None:
        session, e_addr, d_addr = self.targets["mooncake"]
        sender = self.senders["mooncake"]
        sizes = [e.numel() * 2, d.numel() * 2]
        rc = sender.write_raw(session, [e.data_ptr(), d.data_ptr()], [e_addr, d_addr], sizes)  # type: ignore[attr-defined]
        if rc != 0:
            raise RuntimeError(f"raw Mooncake write returned {rc}")

    def zmq_pickle(self, e: torch.Tensor, d: torch.Tensor) -> None:
        meta = pickle.dumps({"dtype": e.dtype, "shapes": [tuple(e.shape), tuple(d.shape)]})
        self.call_bulk(b"pickle", meta, _frame(e), _frame(d))

    def zmq_zerocopy(self, e: torch.Tensor, d: torch.Tensor) -> None:
        self.call_bulk(b"zcopy", _frame(e), _frame(d))

    def close(self) -> None:
        self.call(b"quit")
        for s in self.senders.values():
            s.close()
        self.sock.close(linger=0)
        self.bulk.close(linger=0)


def _frame(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def measure(
    bench: Bench, hidden: int, tokens: int, backends: list[str], budget_s: float, max_reps: int
):
    g = torch.Generator().manual_seed(hidden + tokens)
    e = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    d = torch.randn(tokens, 3 * hidden, generator=g).to(torch.bfloat16)
    nbytes = (e.numel() + d.numel()) * 2
    bench.setup(hidden, tokens)
    dst_e, dst_d = torch.empty_like(e), torch.empty_like(d)

    def copy() -> None:
        dst_e.copy_(e)
        dst_d.copy_(d)

    fns: dict[str, Callable[[], float | None]] = {
        "mooncake": lambda: bench.ours("mooncake", e, d),
        "shm": lambda: bench.ours("shm", e, d),
        "mooncake-granted": lambda: bench.ours("mooncake", e, d, granted=True),
        "shm-granted": lambda: bench.ours("shm", e, d, granted=True),
        "raw-mooncake": lambda: bench.raw(e, d),
        "zmq-pickle": lambda: bench.zmq_pickle(e, d),
        "zmq-zerocopy": lambda: bench.zmq_zerocopy(e, d),
        "copy": copy,
    }
    after = {"zmq-pickle": bench.settle_bulk, "zmq-zerocopy": bench.settle_bulk}
    times = _interleaved({b: fns[b] for b in backends}, budget_s, max_reps, after)
    for name in backends:
        med = statistics.median(times[name])
        best = min(times[name])
        yield Row(name, hidden, tokens, nbytes, len(times[name]), nbytes / med / 1e9,
                  nbytes / best / 1e9, med * 1e3, [round(t * 1e3, 4) for t in times[name]])  # fmt: skip


def _interleaved(
    fns: dict[str, Callable[[], float | None]],
    budget_s: float,
    max_reps: int,
    after: dict[str, Callable[[], None]] | None = None,
) -> dict[str, list[float]]:
    """Time every backend once per round, in a shuffled order each round.

    Drift, and the cost of following another backend (cold caches, an idle TCP connection),
    then hit all backends alike; ``after[name]`` runs untimed right after each call of
    ``name`` (its clean-up, so that the next backend does not pay for it). Warm-up calls
    first (connections, page faults). At least 3 rounds; then stop at ``max_reps`` rounds or
    when the budget per backend is spent.
    """
    after = after or {}
    order = list(fns)
    rng = random.Random(0)

    def run(name: str) -> float:
        took = _timed(name, fns[name])
        if name in after:
            after[name]()
        return took

    for _ in range(WARMUP):
        for name in fns:
            run(name)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(max_reps):
        if r >= 3 and time.perf_counter() - start > budget_s * len(fns):
            break
        rng.shuffle(order)
        for name in order:
            times[name].append(run(name))
    return times


def _timed(name: str, fn: Callable[[], float | None]) -> float:
    threads = torch.get_num_threads()
    if name == "copy":
        torch.set_num_threads(1)  # the baseline is a single-thread copy
    try:
        t0 = time.perf_counter()
        own = fn()  # our paths time themselves (end = receiver verified the data)
        return own if own is not None else time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)


def _peer_main(control: str, bulk: str) -> None:
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    from benchmarks.transfer_peer import serve

    serve(control, bulk)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="epd-bench-transfer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--quick", action="store_true", help="H=2048, 256-4096 tokens, short budget (< 60 s)"
    )
    p.add_argument("--hidden", type=int, nargs="+", help="hidden sizes (default 2048 4096)")
    p.add_argument(
        "--tokens", type=int, nargs="+", help="visual tokens (default 256 1024 4096 16384)"
    )
    p.add_argument(
        "--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="what to measure"
    )
    p.add_argument(
        "--budget", type=float, help="seconds per measurement after 3 reps (default 1.0, quick 0.4)"
    )
    p.add_argument("--max-reps", type=int, default=20, help="repetitions per measurement at most")
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    p.add_argument("--plot", metavar="PATH.png", help="draw GB/s against payload size")
    p.add_argument(
        "--port", type=int, default=0, help="loopback port for the peer (default: pick one)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    grid = QUICK if args.quick else FULL
    hiddens, tokens = args.hidden or grid["hidden"], args.tokens or grid["tokens"]
    budget = args.budget if args.budget is not None else (0.4 if args.quick else 1.0)
    port = args.port or _free_port()
    control, bulk = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{_free_port()}"
    peer = mp.get_context("spawn").Process(target=_peer_main, args=(control, bulk), daemon=True)
    peer.start()
    bench = Bench(control, bulk)
    rows: list[Row] = []
    try:
        with tqdm(total=len(hiddens) * len(tokens) * len(args.backends), unit="run") as bar:
            for hidden in hiddens:
                for n in tokens:
                    bar.set_description(f"H={hidden} n={n}")
                    for row in measure(bench, hidden, n, args.backends, budget, args.max_reps):
                        rows.append(row)
                        bar.update()
        bench.close()
    finally:
        peer.join(10)
        if peer.is_alive():
            peer.kill()
    from benchmarks import report

    print(report.table(rows, args.backends))
    print("\n".join(report.ratios(rows)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    if args.plot:
        report.plot(rows, args.plot)
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    raise SystemExit(main())
