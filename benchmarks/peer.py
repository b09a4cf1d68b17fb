"""``epd-bench-peer``: our encode/language split beside SGLang's own serving, on one host.

Four systems serve the same checkpoint (by default a tiny Qwen3-VL-MoE made in a temporary
directory), one at a time, so that they never share the cores with each other:

    sglang-mono   SGLang's monolithic HTTP server (``python -m sglang.launch_server``), the
                  checkpoint's own Qwen3VLMoeForConditionalGeneration, vision tower included
    sglang-split  SGLang's encoder disaggregation: one ``--encoder-only`` server and one
                  ``--language-only`` server (``--encoder-transfer-backend zmq_to_scheduler``)
    ours-sglang   ``epd-encode`` + ``epd-language --engine sglang``, Mooncake over TCP on loopback
    ours-ref      ``epd-encode`` + ``epd-language --engine transformers`` (the reference engine)

Every system runs float32 on the CPU with attention backend torch_native, SGLang's prefix (radix)
cache off, its multimodal caches off (``SGLANG_VLM_CACHE_SIZE_MB=0`` for the ViT-output cache,
``--mm-preprocess-cache-size-mb 0`` for preprocessing artefacts; the workload repeats one image,
which a cache would serve without work), ``sleep_on_idle`` on and the same seed. One exception:
sglang-split's language-only server runs without ``--sleep-on-idle`` by default, because SGLang
0.5.23's idle sleeper does not wait on the socket the encoder's rows arrive on (with
zmq_to_scheduler) and sleeps up to 1 s per request (``--split-sleep-on-idle``). The exact command
line and environment of each process are printed and kept in the JSON.

Workload: one 448x448 PNG (fixed-seed random pixels) and a short text, greedy, ``ignore_eos``,
through each system's ``/v1/chat/completions``, at every (max_tokens, concurrency) point
(closed-loop clients), ``--requests`` a point. Each round starts each system, warms it up, runs
every point and stops it (its whole process tree, then waits for its ports to be free); the
order of the systems is reversed every other round. Figures are pooled over rounds: median and
p90 latency (request sent -> response parsed) and requests/s (answers / time under load).

Launching the systems: ``peer_systems.py``; pooling, the token check and the tables:
``peer_report.py``; requests and the command line: here.

Greedy tokens must be the same for every request of every system at every point (token ids
where the server returns them: ours in ``epd.token_ids``, SGLang's in ``sglext.output_ids``);
a difference is printed and the exit status is 1. Targets (issue 12): ours-sglang's median
latency <= 0.8x sglang-split's and its requests/s >= 1.25x at every point, and the same against
sglang-mono at max_tokens 32. For our systems the servers' per-phase medians (``epd.timings``,
see epd-bench-e2e) say where the time went.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

import httpx

from benchmarks.e2e import Client, chat_body, image_data_url, served
from benchmarks.peer_report import (
    LATENCY_TARGET,
    PAIRS,
    RPS_TARGET,
    aggregate,
    check_tokens,
    ratios,
    report,
)
from benchmarks.peer_systems import ENV, StartError, cpu_seconds, descendants, log, make_system

SYSTEMS = ("sglang-mono", "sglang-split", "ours-sglang", "ours-ref")
CLIENT_SHAPES = ("shared", "issue20", "fresh")
# --- requests -------------------------------------------------------------------------------


def answer_fields(body: dict[str, Any]) -> dict[str, Any]:
    """Token ids, text and SGLang's cached-token count of one chat completion."""
    ids = (body.get("epd") or {}).get("token_ids")
    if ids is None:
        ids = (body.get("sglext") or {}).get("output_ids")
        if ids and isinstance(ids[0], list):  # one list per choice
            ids = ids[0]
    choices = body.get("choices") or [{}]
    details = (body.get("usage") or {}).get("prompt_tokens_details") or {}
    return {
        "token_ids": list(ids) if ids is not None else None,
        "text": (choices[0].get("message") or {}).get("content"),
        "cached_tokens": details.get("cached_tokens"),
    }


class AnswerClient(Client):
    """epd-bench-e2e's client; each row also keeps the answer's token ids and text, read from the
    response after the request's latency is taken."""

    def __init__(self, *args: Any, shape: str = "shared", **kwargs: Any):
        super().__init__(*args, **kwargs)
        if shape == "fresh":  # no connection is kept: each request opens its own
            self.http.close()
            self.http = httpx.Client(timeout=self.http.timeout, headers=self.http.headers,
                                     limits=httpx.Limits(max_keepalive_connections=0))  # fmt: skip
        self.last = threading.local()
        self.http.event_hooks["response"].append(self.keep)

    def keep(self, response: httpx.Response) -> None:
        self.last.response = response

    def one(self, index: int) -> dict[str, Any]:
        self.last.response = None
        row = super().one(index)
        response = self.last.response
        if row["status"] == 200 and response is not None:
            row.update(answer_fields(response.json()))
        return row


def request_body(url: str, max_tokens: int, image_url: str, seed: int,
                 shape: str = "shared") -> dict[str, Any]:  # fmt: skip
    """The same request for every system; each ignores the other's extension field. The
    ``issue20`` shape is that report's client: no seed, ``"stream": false`` spelled out."""
    body = chat_body(image_url, max_tokens, served(url))
    if shape == "issue20":
        return {**body, "stream": False, "return_output_ids_in_sglext": True}
    return {**body, "seed": seed, "return_output_ids_in_sglext": True}


def run_point(url: str, point: tuple[int, int], args: argparse.Namespace, image_url: str,
              label: str) -> dict[str, Any]:  # fmt: skip
    max_tokens, concurrency = point
    body = request_body(url, max_tokens, image_url, args.seed, args.client)
    client = AnswerClient(url, body, concurrency, args.timeout, shape=args.client)
    try:
        t0 = time.perf_counter()
        rows = client.run(args.requests, 0, f"{label} max_tokens={max_tokens} c={concurrency}",
                          leave=False)  # fmt: skip
        wall_s = time.perf_counter() - t0
    finally:
        client.close()
    return {"max_tokens": max_tokens, "concurrency": concurrency, "wall_s": wall_s, "rows": rows}


def warm_up(url: str, args: argparse.Namespace, image_url: str, label: str) -> None:
    if args.warmup < 1:
        return
    body = request_body(url, max(args.max_tokens), image_url, args.seed, args.client)
    client = AnswerClient(url, body, max(args.concurrency), args.timeout, shape=args.client)
    try:
        rows = client.run(args.warmup, -args.warmup, f"{label} warm-up", leave=False)
    finally:
        client.close()
    bad = [r for r in rows if r["status"] != 200]
    if bad:
        raise StartError(
            f"{label}: warm-up request failed: {bad[0].get('error', bad[0]['status'])}"
        )


def idle_cpu_pct(system: Any, seconds: float) -> float | None:
    """CPU the system's processes burn while no request is in flight, in % of one core."""
    if seconds <= 0:
        return None
    tree = descendants(system.pids())
    before = cpu_seconds(tree)
    time.sleep(seconds)  # the measurement window itself
    return 100 * (cpu_seconds(tree) - before) / seconds


def run_system(name: str, rnd: int, args: argparse.Namespace, image_url: str) -> dict[str, Any]:
    """Start ``name``, warm it up, run every point, stop it (on every path). A system that does
    not come up gets ``error`` (with its logs' tail) instead of points."""
    label = f"round {rnd} {name}"
    system = make_system(name, args, args.log_dir / f"round{rnd}" / name)
    log(f"{label}: starting (logs in {system.log_dir})")
    t0 = time.monotonic()
    result: dict[str, Any] = {"round": rnd, "system": name, "points": []}
    try:
        system.start()
        result["startup_s"] = time.monotonic() - t0
        log(f"{label}: up in {result['startup_s']:.1f} s at {system.url}")
        for role, cmd in system.commands.items():
            log(f"{label}: {role}: {shlex.join(cmd)}")
        warm_up(system.url, args, image_url, label)
        result["idle_cpu_pct"] = idle_cpu_pct(system, args.idle_probe)
        for point in points(args):
            result["points"].append(run_point(system.url, point, args, image_url, label))
    except StartError as exc:
        result["error"] = str(exc)
        log(f"{label}: FAILED: {exc}")
    finally:
        result["commands"] = system.commands
        t1 = time.monotonic()
        system.stop()
        log(f"{label}: stopped in {time.monotonic() - t1:.1f} s")
    return result


def points(args: argparse.Namespace) -> list[tuple[int, int]]:
    return [(m, c) for m in args.max_tokens for c in args.concurrency]


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="epd-bench-peer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint directory (default: a tiny Qwen3-VL-MoE made in a "
                        "temporary directory, removed at the end)")  # fmt: skip
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS),
                   metavar="NAME", help=f"systems to run, in this order (default: all of "
                                        f"{', '.join(SYSTEMS)})")  # fmt: skip
    p.add_argument("--requests", type=int, default=30,
                   help="measured requests per point, system and round (default 30)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=2,
                   help="times each system is started, measured and stopped; the order of the "
                        "systems is reversed every other round (default 2)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, nargs="+", default=[1, 32], metavar="N",
                   help="max_tokens of the points (default 1 32)")  # fmt: skip
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], metavar="N",
                   help="closed-loop clients of the points (default 1 4)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=4,
                   help="requests sent after each start and not measured, at the largest "
                        "max_tokens and concurrency (default 4)")  # fmt: skip
    p.add_argument("--image-size", type=int, nargs=2, default=[448, 448], metavar=("H", "W"),
                   help="image height and width in pixels (default 448 448)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the image's pixels, of every server and of every request "
                        "(default 0)")  # fmt: skip
    p.add_argument("--split-backend", choices=["zmq_to_scheduler", "zmq_to_tokenizer"],
                   default="zmq_to_scheduler",
                   help="sglang-split's --encoder-transfer-backend (default zmq_to_scheduler, "
                        "SGLang's own choice for this model)")  # fmt: skip
    p.add_argument("--split-sleep-on-idle", choices=["auto", "on", "off"], default="auto",
                   help="--sleep-on-idle for sglang-split's language-only server; auto: off with "
                        "zmq_to_scheduler (SGLang 0.5.23's idle sleeper does not wake for "
                        "the encoder's rows and sleeps up to 1 s per request), on otherwise")  # fmt: skip
    p.add_argument("--client", choices=CLIENT_SHAPES, default="shared",
                   help="the clients' shape: shared (default: the threads share one kept-alive "
                        "httpx client, each request with the seed), issue20 (the same client, "
                        "the body of issue 20's report: no seed, \"stream\": false), fresh (a "
                        "new connection per request)")  # fmt: skip
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads of each of our processes, SGLang's scheduler "
                        "under ours-sglang included, as epd-bench-e2e's cluster (default 1; "
                        "0: torch's choice); SGLang's own servers keep torch's choice")  # fmt: skip
    p.add_argument("--startup-timeout", type=float, default=300.0,
                   help="seconds a system may take to answer /health (default 300)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds one request may take before it counts as an error "
                        "(default 120)")  # fmt: skip
    p.add_argument("--idle-probe", type=float, default=1.0, metavar="SECONDS",
                   help="after the warm-up, measure the CPU an idle system burns over this "
                        "long (default 1; 0: skip)")  # fmt: skip
    p.add_argument("--log-dir", type=Path, default=Path("out/logs/bench-peer"),
                   help="server logs, one folder per round and system "
                        "(default out/logs/bench-peer)")  # fmt: skip
    p.add_argument("--json", metavar="PATH", type=Path,
                   help="write the configuration, every command line, every request's row, "
                        "the summary, the ratios and the token check as JSON")  # fmt: skip
    args = p.parse_args(argv)
    for flag in ("requests", "rounds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    if min(args.max_tokens) < 1 or min(args.concurrency) < 1 or min(args.image_size) < 1:
        p.error("--max-tokens, --concurrency and --image-size take values >= 1")
    if args.warmup < 0 or args.torch_threads < 0:
        p.error("--warmup and --torch-threads must be >= 0")
    args.systems = list(dict.fromkeys(args.systems))
    return args


def prepare_model(args: argparse.Namespace, stack: ExitStack) -> None:
    if args.model is not None:
        if not (args.model / "config.json").is_file():
            raise SystemExit(f"epd-bench-peer: {args.model} has no config.json")
        args.model = args.model.resolve()
        return
    from epd.tiny_model import make_tiny_model

    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="epd-bench-peer-")))
    log(f"creating a tiny checkpoint in {tmp / 'tiny-model'}")
    args.model = make_tiny_model(tmp / "tiny-model")


def on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through every stop()


def run_all(args: argparse.Namespace, image_url: str) -> list[dict[str, Any]]:
    results = []
    for rnd in range(1, args.rounds + 1):
        order = args.systems if rnd % 2 else args.systems[::-1]
        results += [run_system(name, rnd, args, image_url) for name in order]
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, ENV))  # our processes inherit it too
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, on_sigterm)
            stack.callback(signal.signal, signal.SIGTERM, previous)
        prepare_model(args, stack)
        image_url = image_data_url(*args.image_size, seed=args.seed)
        results = run_all(args, image_url)
    failures = [{k: r[k] for k in ("round", "system", "error")} for r in results if "error" in r]
    pts = points(args)
    summary = aggregate(results)
    out = {
        "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "image_size": list(args.image_size), "env": ENV,
                   "targets": {"latency_ratio_max": LATENCY_TARGET, "rps_ratio_min": RPS_TARGET,
                               "pairs": PAIRS}},
        "results": results, "failures": failures, "summary": summary,
        "ratios": ratios(summary, pts), "tokens": check_tokens(results),
    }  # fmt: skip
    report(out, args.systems, pts)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    bad_requests = any(v["errors"] for by in summary.values() for v in by.values())
    return 1 if failures or bad_requests or out["tokens"]["mismatches"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
