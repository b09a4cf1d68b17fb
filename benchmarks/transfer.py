"""``epd-bench-transfer``: move one image's embeddings + deepstack rows between two processes.

For each payload (hidden size x visual tokens, bf16) it measures, in the same run:

    mooncake      our path, through the servers' own code (flow v3, below), over Mooncake
    shm           the same over POSIX shared memory (same host)
    raw-mooncake  Mooncake batch_transfer_sync_write of the same bytes (no control plane)
    zmq-pickle    SGLang-style: pickled metadata + tensor frames, receiver copies into a tensor
    zmq-zerocopy  pyzmq send(copy=False), receiver keeps the frames
    copy          single-thread tensor.copy_ in one process (the same-host limit)

and reports GB/s (1e9 bytes/s; median and best over the repetitions). A second section, the
fixed cost per job, sends a tiny payload (H=64 x 1 token) through our paths and reports the
median and p90 in ms: what a job costs besides moving its bytes.

Our paths run the code the servers run. The peer process is the language side: a
``language_server.receiver.Receiver`` over ``MultimodalDataBuffers`` on the real transport
receiver lends blocks (``admit``) and builds the ``EncodeJob`` (``job``), whose bytes come
here over the control socket. This process is the encode side: it wraps the job in an
``encode_server.jobs.Job`` holding the rows, as the ViT's split leaves it, and runs
``encode_server.transfers.Transfers`` (``start_ready``, then ``poll``) with the real sender;
between polls it waits with the sender's own ``wait`` (the encode server's loop waits on the
sender's completion fd, or polls). ``Transfers`` reports the encoded ``TransferDone`` to the
peer, whose ``Receiver.on_message`` checks lease, generation, row count and checksum and calls
the request's ``on_ready``, which reads the clock. The timed region starts when this process
has the job and its rows ready: in serving the job (blocks included) is what the encoder
preprocesses and runs the ViT for, so it is always here before its rows are, and lending and
the job's trip are not on the path from rows to use. It ends at that ``on_ready``
(``time.perf_counter`` is CLOCK_MONOTONIC, shared by processes on one host), so the ack's trip
back is not counted either.
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
from encode_server.jobs import Job, Stage
from encode_server.transfers import Transfers
from transfer import make_sender

WARMUP = 3
BACKENDS = ("mooncake", "shm", "raw-mooncake", "zmq-pickle", "zmq-zerocopy", "copy")
OURS = ("mooncake", "shm")
FULL = {"hidden": (2048, 4096), "tokens": (256, 1024, 4096, 16384)}
QUICK = {"hidden": (2048,), "tokens": (256, 1024, 4096)}
FIXED = {"hidden": 64, "tokens": 1, "backends": ("mooncake", "shm", "raw-mooncake"), "warmup": 20}
TIMEOUT_S = 120.0


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
    ms_p90: float = 0.0
    kind: str = "throughput"  # or "fixed" (the fixed cost per job: a tiny payload)


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
        for sock in (self.sock, self.bulk):  # a dead peer fails the run instead of hanging it
            sock.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))
        self._tracker: zmq.MessageTracker | None = None
        self.senders = {name: make_sender(name) for name in OURS}
        self.transfers = {name: self._transfers(name) for name in OURS}
        self.live: set[str] = set()  # keys of jobs that Transfers has not finished
        self.reports = 0  # messages reported to the peer whose answers are not read yet
        self.targets: dict[str, tuple[str, int, int]] = {}

    def _transfers(self, name: str) -> Transfers:
        """``Transfers`` on ``name``'s sender; its callbacks do what the encode server's do."""
        sender = self.senders[name]

        def report(job: Job, msg: P.Message) -> None:
            self.sock.send_multipart([b"msg", name.encode(), P.encode(msg)])
            self.reports += 1

        def finish(job: Job) -> None:
            sender.release(job.key)
            job.drop_tensors()
            self.live.discard(job.key)

        return Transfers(sender, TIMEOUT_S, report, finish)

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

    def ours(self, name: str, e: torch.Tensor, d: torch.Tensor) -> float:
        """One encode job through both servers' code; its seconds from "job and rows here" to
        "rows verified and handed to ``on_ready``" on the language side (module docstring)."""
        self.sock.send_multipart([b"lend", name.encode()])
        answer = self.sock.recv_multipart()
        if answer[0] != b"job":
            raise RuntimeError(f"{name}: the receiver lent no blocks: {answer[-1].decode()}")
        received = time.perf_counter()
        job = Job(peer=b"bench", msg=P.decode_as(answer[1], P.EncodeJob), received_at=received)
        job.marks["received"] = received
        job.embeds, job.deepstack, job.stage = e, d, Stage.AWAIT_READY  # as the split leaves it
        t0 = time.perf_counter()
        self._write(name, job)
        acks = [self._ack() for _ in range(self.reports)]
        self.reports = 0
        bad = [a for a in acks if not a["ok"]]
        if bad or not acks:
            raise RuntimeError(f"{name}: {bad[0]['error'] if bad else 'nothing reported'}")
        if acks[-1]["lent_blocks"]:
            raise RuntimeError(f"{name}: {acks[-1]['lent_blocks']} blocks still lent after the job")
        return float(acks[-1]["t"]) - t0

    def _write(self, name: str, job: Job) -> None:
        """Start the job's write and poll it until ``Transfers`` has reported its end."""
        transfers, sender = self.transfers[name], self.senders[name]
        self.live.add(job.key)
        deadline = time.perf_counter() + TIMEOUT_S + 10
        transfers.start_ready([job])
        while job.key in self.live:
            if job.stage is Stage.TRANSFERRING:
                sender.wait(job.key, timeout_s=TIMEOUT_S)
                sender.drain_completions()
            elif job.stage is Stage.DRAINING:
                time.sleep(1e-3)
            transfers.poll([job])
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{name}: job {job.key} never ended")

    def _ack(self) -> dict[str, Any]:
        """The peer's answer to one reported message (messages it sent back are ignored: an
        Abort only follows a failure, which the ack already says)."""
        frames = self.sock.recv_multipart()
        return msgpack.unpackb(frames[0])

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

    def close(self, timeout_s: float = 5.0) -> None:
        """Tell the peer to quit (also after a failed run: answers still unread are skipped;
        a peer that is gone is not waited for beyond ``timeout_s``), then close everything."""
        try:
            self.sock.send(b"quit", zmq.NOBLOCK)
            while self.sock.poll(int(timeout_s * 1000)) and self.sock.recv() != b"bye":
                pass
        except zmq.ZMQError:
            pass  # the peer is gone
        for s in self.senders.values():
            s.close()
        self.sock.close(linger=0)
        self.bulk.close(linger=0)


def _frame(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def measure(
    bench: Bench,
    hidden: int,
    tokens: int,
    backends: list[str],
    budget_s: float,
    max_reps: int,
    kind: str = "throughput",
    warmup: int = WARMUP,
):
    """Yield one ``Row`` per backend for this payload, from interleaved rounds."""
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
        "raw-mooncake": lambda: bench.raw(e, d),
        "zmq-pickle": lambda: bench.zmq_pickle(e, d),
        "zmq-zerocopy": lambda: bench.zmq_zerocopy(e, d),
        "copy": copy,
    }
    after = {"zmq-pickle": bench.settle_bulk, "zmq-zerocopy": bench.settle_bulk}
    times = _interleaved({b: fns[b] for b in backends}, budget_s, max_reps, after, warmup)
    for name in backends:
        ts = times[name]
        med, best = statistics.median(ts), min(ts)
        yield Row(name, hidden, tokens, nbytes, len(ts), nbytes / med / 1e9, nbytes / best / 1e9,
                  med * 1e3, [round(t * 1e3, 4) for t in ts], round(_p90(ts) * 1e3, 4),
                  kind)  # fmt: skip


def _p90(values: list[float]) -> float:
    """Linear-interpolated 90th percentile (numpy's default)."""
    xs = sorted(values)
    k = (len(xs) - 1) * 0.9
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _interleaved(
    fns: dict[str, Callable[[], float | None]],
    budget_s: float,
    max_reps: int,
    after: dict[str, Callable[[], None]] | None = None,
    warmup: int = WARMUP,
) -> dict[str, list[float]]:
    """Time every backend once per round, in a shuffled order each round.

    Drift, and the cost of following another backend (cold caches, an idle TCP connection),
    then hit all backends alike; ``after[name]`` runs untimed right after each call of
    ``name`` (its clean-up, so that the next backend does not pay for it). ``warmup``
    untimed rounds first (connections, page faults). At least 3 rounds; then stop at ``max_reps`` rounds or
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

    for _ in range(warmup):
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
    p.add_argument(
        "--fixed-reps", type=int, default=300,
        help="repetitions of the fixed-cost-per-job measurement at most (0: skip it)",
    )  # fmt: skip
    p.add_argument(
        "--torch-threads", type=int, default=1,
        help="intra-op threads of this (encode-side) process; 0: torch's default. Default 1: "
        "both processes share the host, as in the local cluster (the peer uses 1)",
    )  # fmt: skip
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    p.add_argument("--plot", metavar="PATH.png", help="draw GB/s against payload size")
    p.add_argument(
        "--port", type=int, default=0, help="loopback port for the peer (default: pick one)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    grid = QUICK if args.quick else FULL
    hiddens, tokens = args.hidden or grid["hidden"], args.tokens or grid["tokens"]
    budget = args.budget if args.budget is not None else (0.4 if args.quick else 1.0)
    fixed = [b for b in FIXED["backends"] if b in args.backends] if args.fixed_reps > 0 else []
    port = args.port or _free_port()
    control, bulk = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{_free_port()}"
    peer = mp.get_context("spawn").Process(target=_peer_main, args=(control, bulk), daemon=True)
    peer.start()
    bench = Bench(control, bulk)
    rows: list[Row] = []
    total = len(fixed) + len(hiddens) * len(tokens) * len(args.backends)
    try:
        with tqdm(total=total, unit="run") as bar:
            if fixed:
                bar.set_description("fixed cost per job")
                rows += measure(bench, FIXED["hidden"], FIXED["tokens"], fixed, budget,
                                args.fixed_reps, "fixed", FIXED["warmup"])  # fmt: skip
                bar.update(len(fixed))
            for hidden in hiddens:
                for n in tokens:
                    bar.set_description(f"H={hidden} n={n}")
                    for row in measure(bench, hidden, n, args.backends, budget, args.max_reps):
                        rows.append(row)
                        bar.update()
    except zmq.Again:
        raise RuntimeError(
            f"the peer process did not answer within {TIMEOUT_S:.0f} s (exit "
            f"code {peer.exitcode}; its traceback is above)"
        ) from None
    finally:
        bench.close()
        peer.join(10)
        if peer.is_alive():
            peer.kill()
    from benchmarks import report

    print(report.table(rows, args.backends))
    for line in (*report.ratios(rows), *report.fixed_cost(rows)):
        print(line)
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
