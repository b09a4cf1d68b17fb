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
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import httpx

from benchmarks.e2e import PHASES, Client, chat_body, image_data_url, served, summarize

SYSTEMS = ("sglang-mono", "sglang-split", "ours-sglang", "ours-ref")
CLIENT_SHAPES = ("shared", "issue20", "fresh")
LATENCY_TARGET = 0.8  # ours-sglang median latency / theirs, at most
RPS_TARGET = 1.25  # ours-sglang requests/s / theirs, at least
MONO_TARGET_MAX_TOKENS = 32  # the target against sglang-mono holds at this max_tokens only
# (ours, theirs, max_tokens the targets apply at: "all", one value, or None for ratios only)
PAIRS = (
    ("ours-sglang", "sglang-split", "all"),
    ("ours-sglang", "sglang-mono", MONO_TARGET_MAX_TOKENS),
    ("ours-ref", "sglang-split", None),
    ("ours-ref", "sglang-mono", None),
)
# every process of every system: offline, quiet Mooncake, SGLang's ViT-output cache off (the
# encoder-only server and the language side both size theirs from it; 0 admits nothing)
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MC_LOG_LEVEL": "ERROR",
    "SGLANG_VLM_CACHE_SIZE_MB": "0",
}
MAX_TOTAL_TOKENS = 65536  # SGLang's KV pool, as language_server's CPU defaults size it


def log(msg: str) -> None:
    print(f"[bench-peer] {msg}", file=sys.stderr, flush=True)


# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_ports_free(ports: list[int], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while busy := [p for p in ports if not port_is_free(p)]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"ports {busy} still in use {timeout_s:g} s after the stop")
        time.sleep(0.1)


def descendants(pids: list[int]) -> list[Any]:
    """The live processes ``pids`` and all their descendants (psutil.Process objects)."""
    import psutil

    out = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            out += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return out


def reap(procs: list[Any], timeout_s: float = 15.0) -> None:
    """SIGKILL whatever of ``procs`` outlived the stop and wait for it."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)


def cpu_seconds(procs: list[Any]) -> float:
    import psutil

    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(f"    {line}" for line in text[-lines:]) or "    (empty)"


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# --- systems --------------------------------------------------------------------------------


class StartError(RuntimeError):
    """A system did not come up; the message carries the tail of its logs."""


@dataclass
class SGLangSystem:
    """SGLang's own HTTP servers (one, or an encoder-only and a language-only one).

    Each server runs in its own session, so that stopping it reaches its scheduler and
    detokenizer children too. ``start`` blocks until every server's /health answers 200 (SGLang
    answers 503 until its own warm-up request is done).
    """

    name: str
    model: Path
    seed: int
    log_dir: Path
    startup_timeout_s: float
    split_backend: str = "zmq_to_scheduler"
    split_language_sleeps: bool = False
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    commands: dict[str, list[str]] = field(default_factory=dict)

    def common_flags(self) -> list[str]:
        return [
            "--model-path", str(self.model), "--host", "127.0.0.1", "--device", "cpu",
            "--dtype", "float32", "--attention-backend", "torch_native",
            "--disable-radix-cache", "--mm-preprocess-cache-size-mb", "0",
            "--random-seed", str(self.seed), "--max-total-tokens", str(MAX_TOTAL_TOKENS),
        ]  # fmt: skip

    @property
    def roles(self) -> tuple[str, ...]:
        return ("server",) if self.name == "sglang-mono" else ("encoder", "language")

    def role_flags(self, role: str) -> list[str]:
        if role == "server":
            return ["--sleep-on-idle"]
        backend = ["--encoder-transfer-backend", self.split_backend]
        if role == "encoder":
            return ["--encoder-only", "--sleep-on-idle", *backend]
        sleep = ["--sleep-on-idle"] if self.split_language_sleeps else []
        return ["--language-only", *sleep, *backend,
                "--encoder-urls", f"http://127.0.0.1:{self.ports['encoder']}",
                # the language side's encoder bootstrap server (SGLang's default: 8997)
                "--encoder-bootstrap-port", str(self.ports["bootstrap"])]  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports[self.roles[-1]]}"

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        needs = [*self.roles, "bootstrap"] if "language" in self.roles else self.roles
        self.ports.update({role: free_port() for role in needs})
        for role in self.roles:
            cmd = [sys.executable, "-m", "sglang.launch_server", *self.common_flags(),
                   "--port", str(self.ports[role]), *self.role_flags(role)]  # fmt: skip
            self.commands[role] = cmd
            with open(self.log_dir / f"{role}.log", "ab") as out:
                self.procs[role] = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    env={**os.environ, **ENV},
                )  # fmt: skip
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        pending = list(self.procs)
        while pending:
            for role, proc in self.procs.items():
                if proc.poll() is not None:
                    raise StartError(self.failure(f"{role} exited with {proc.returncode}"))
            pending = [
                r for r in pending if not http_ok(f"http://127.0.0.1:{self.ports[r]}/health")
            ]
            if pending and time.monotonic() > deadline:
                raise StartError(
                    self.failure(f"{pending} not ready in {self.startup_timeout_s:g} s")
                )
            if pending:
                time.sleep(0.25)

    def failure(self, what: str) -> str:
        tails = [f"  {role}.log:\n{log_tail(self.log_dir / f'{role}.log')}" for role in self.procs]
        return f"{self.name}: {what}; logs in {self.log_dir}\n" + "\n".join(tails)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def stop(self) -> None:
        tree = descendants(self.pids())
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reap(tree)
        wait_ports_free([p for p in self.ports.values() if p])


@dataclass
class OurSystem:
    """Our split through epd.cluster.LocalCluster: one encoder, one language server, Mooncake."""

    name: str
    model: Path
    seed: int
    log_dir: Path
    startup_timeout_s: float
    torch_threads: int = 1
    cluster: Any = None

    def language_args(self) -> list[str]:
        if self.name == "ours-ref":
            return ["--engine", "transformers", "--dtype", "float32"]
        sglang = {"attention_backend": "torch_native", "sleep_on_idle": True,
                  "disable_radix_cache": True, "mm_preprocess_cache_size_mb": 0,
                  "random_seed": self.seed, "max_total_tokens": MAX_TOTAL_TOKENS}  # fmt: skip
        return ["--engine", "sglang", "--dtype", "float32", "--sglang-args", json.dumps(sglang)]

    @property
    def url(self) -> str:
        return self.cluster.url

    @property
    def commands(self) -> dict[str, list[str]]:
        procs = self.cluster.procs if self.cluster else {}
        return {role: list(map(str, p.args)) for role, p in procs.items()}

    def start(self) -> None:
        from epd.cluster import LocalCluster

        self.cluster = LocalCluster(
            self.model, n_encoders=1, transport="mooncake", log_dir=self.log_dir,
            language_args=self.language_args(), encoder_args=["--dtype", "float32"],
            startup_timeout_s=self.startup_timeout_s, torch_threads=self.torch_threads,
        )  # fmt: skip
        try:
            self.cluster.start()  # stops what it started when it fails
        except (RuntimeError, TimeoutError) as exc:
            tails = [f"  {p.name}:\n{log_tail(p)}" for p in sorted(self.log_dir.glob("*.log"))]
            raise StartError(f"{self.name}: {exc}\n" + "\n".join(tails)) from None

    def pids(self) -> list[int]:
        return [p.pid for p in self.cluster.procs.values()] if self.cluster else []

    def stop(self) -> None:
        if self.cluster is None:
            return
        tree = descendants(self.pids())  # --engine sglang: SGLang's scheduler and detokenizer
        self.cluster.stop()
        reap(tree)
        wait_ports_free([self.cluster.http_port, *self.cluster.encoder_ports])


def make_system(name: str, args: argparse.Namespace, log_dir: Path) -> Any:
    common = dict(model=args.model, seed=args.seed, log_dir=log_dir,
                  startup_timeout_s=args.startup_timeout)  # fmt: skip
    if name.startswith("sglang-"):
        sleeps = args.split_sleep_on_idle == "on" or (
            args.split_sleep_on_idle == "auto" and args.split_backend != "zmq_to_scheduler"
        )
        return SGLangSystem(name, **common, split_backend=args.split_backend,
                            split_language_sleeps=sleeps)  # fmt: skip
    return OurSystem(name, **common, torch_threads=args.torch_threads)


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


# --- results --------------------------------------------------------------------------------


def point_key(max_tokens: int, concurrency: int) -> str:
    return f"max_tokens={max_tokens} concurrency={concurrency}"


def aggregate(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """System -> point -> epd-bench-e2e's summary of that point's rows pooled over rounds."""
    pooled: dict[str, dict[str, Any]] = {}
    for result in results:
        for p in result["points"]:
            slot = pooled.setdefault(result["system"], {}).setdefault(
                point_key(p["max_tokens"], p["concurrency"]), {"rows": [], "wall_s": 0.0, "n": 0}
            )
            slot["rows"] += p["rows"]
            slot["wall_s"] += p["wall_s"]
            slot["n"] += 1
    return {
        system: {key: {**summarize(s["rows"], s["wall_s"]), "rounds": s["n"]}
                 for key, s in by_point.items()}
        for system, by_point in pooled.items()
    }  # fmt: skip


def check_tokens(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Every answer of every system at one max_tokens must be the same greedy tokens."""
    rows = [(r["system"], p["max_tokens"], row) for r in results for p in r["points"]
            for row in p["rows"] if row["status"] == 200]  # fmt: skip
    by = "token_ids" if all(row.get("token_ids") is not None for *_, row in rows) else "text"
    outputs: dict[int, dict[str, Counter]] = {}
    for system, max_tokens, row in rows:
        value = row.get(by)
        outputs.setdefault(max_tokens, {}).setdefault(system, Counter())[json.dumps(value)] += 1
    mismatches = []
    for max_tokens, per_system in sorted(outputs.items()):
        for system, seen in per_system.items():
            if len(seen) > 1:
                mismatches.append(f"{system} at max_tokens {max_tokens} answered {len(seen)} "
                                  f"different ways: {dict(seen)}")  # fmt: skip
        common = {system: seen.most_common(1)[0][0] for system, seen in per_system.items()}
        if len(set(common.values())) > 1:
            mismatches.append(f"systems disagree at max_tokens {max_tokens}: {common}")
    return {
        "compared": by,
        "outputs": {m: {s: dict(c) for s, c in per.items()} for m, per in outputs.items()},
        "mismatches": mismatches,
    }


def ratios(summary: dict[str, dict[str, Any]], pts: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """ours/theirs median latency and requests/s per point, with the issue's verdicts."""
    out = []
    for ours, theirs, rule in PAIRS:
        for max_tokens, concurrency in pts:
            key = point_key(max_tokens, concurrency)
            a, b = summary.get(ours, {}).get(key), summary.get(theirs, {}).get(key)
            if not a or not b:
                continue
            lat = median_ms(a) / median_ms(b)
            rps = a["throughput_rps"] / b["throughput_rps"]
            applies = rule == "all" or rule == max_tokens
            ok = lat <= LATENCY_TARGET and rps >= RPS_TARGET  # NaN fails
            out.append({"ours": ours, "theirs": theirs, "max_tokens": max_tokens,
                        "concurrency": concurrency, "latency_ratio": lat, "rps_ratio": rps,
                        "verdict": ("PASS" if ok else "FAIL") if applies else None})  # fmt: skip
    return out


def median_ms(s: dict[str, Any]) -> float:
    return s["phases"].get("latency", {}).get("median_ms", math.nan)


def p90_ms(s: dict[str, Any]) -> float:
    return s["phases"].get("latency", {}).get("p90_ms", math.nan)


def point_table(summary: dict[str, Any], rats: list[dict[str, Any]], point: tuple[int, int],
                systems: list[str]) -> str:  # fmt: skip
    key = point_key(*point)
    lines = [f"### max_tokens {point[0]}, concurrency {point[1]}", "",
             "| system | median ms | p90 ms | requests/s | ok / sent |", "|---|---|---|---|---|"]  # fmt: skip
    for system in systems:
        s = summary.get(system, {}).get(key)
        if s is None:
            lines.append(f"| {system} | - | - | - | not run |")
            continue
        lines.append(f"| {system} | {median_ms(s):.1f} | {p90_ms(s):.1f} | "
                     f"{s['throughput_rps']:.2f} | {s['ok']} / {s['requests']} |")  # fmt: skip
    mine = [r for r in rats if (r["max_tokens"], r["concurrency"]) == point]
    if mine:
        lines += [
            "",
            "| ours / theirs | median latency | requests/s | target |",
            "|---|---|---|---|",
        ]
        target = f"<= {LATENCY_TARGET:g}x, >= {RPS_TARGET:g}x"
        for r in mine:
            verdict = f"{r['verdict']} ({target})" if r["verdict"] else "-"
            lines.append(f"| {r['ours']} / {r['theirs']} | {r['latency_ratio']:.2f}x | "
                         f"{r['rps_ratio']:.2f}x | {verdict} |")  # fmt: skip
    return "\n".join(lines)


def phase_table(summary: dict[str, Any], pts: list[tuple[int, int]]) -> str:
    """Our systems' server-side phase medians (ms) per point; rest = latency - ttft (decode,
    HTTP, the client)."""
    cols = [*PHASES, "http"]
    lines = ["| system | max_tokens | c | " + " | ".join(cols[:-1]) + " | rest | latency |",
             "|---" * (len(cols) + 4) + "|"]  # fmt: skip
    for system in ("ours-sglang", "ours-ref"):
        for point in pts:
            s = summary.get(system, {}).get(point_key(*point))
            if s is None:
                continue
            cells = [f"{s['phases'][c]['median_ms']:.1f}" if c in s["phases"] else "-"
                     for c in cols]  # fmt: skip
            lines.append(f"| {system} | {point[0]} | {point[1]} | " + " | ".join(cells)
                         + f" | {median_ms(s):.1f} |")  # fmt: skip
    return "\n".join(lines)


def startup_table(results: list[dict[str, Any]], systems: list[str]) -> str:
    lines = ["| system | start-up s (per round) | idle CPU % of a core |", "|---|---|---|"]
    for system in systems:
        mine = [r for r in results if r["system"] == system]
        ups = ", ".join("FAILED" if "error" in r else f"{r['startup_s']:.1f}" for r in mine)
        idle = [r["idle_cpu_pct"] for r in mine if r.get("idle_cpu_pct") is not None]
        lines.append(f"| {system} | {ups} | {', '.join(f'{x:.0f}' for x in idle) or '-'} |")
    return "\n".join(lines)


def report(out: dict[str, Any], systems: list[str], pts: list[tuple[int, int]]) -> None:
    summary, rats = out["summary"], out["ratios"]
    cfg = out["config"]
    print(f"\nepd-bench-peer: {cfg['requests']} requests a point x {cfg['rounds']} round(s), "
          f"image {cfg['image_size']}, model {cfg['model']}\n")  # fmt: skip
    print(startup_table(out["results"], systems) + "\n")
    for point in pts:
        print(point_table(summary, rats, point, systems) + "\n")
    if any(s in summary for s in ("ours-sglang", "ours-ref")):
        print("per-phase medians of our systems, ms (see epd-bench-e2e; rest = latency - ttft):\n")
        print(phase_table(summary, pts) + "\n")
    verdicts = [r["verdict"] for r in rats if r["verdict"]]
    if verdicts:
        print(f"targets: {verdicts.count('PASS')} of {len(verdicts)} PASS")
    tokens = out["tokens"]
    if tokens["mismatches"]:
        print("GREEDY TOKENS DIFFER:\n  " + "\n  ".join(tokens["mismatches"]))
    elif not summary:
        print("greedy tokens: no answers to compare")
    else:
        print(f"greedy tokens: the same for every request of {', '.join(summary)} "
              f"(compared by {tokens['compared']})")  # fmt: skip
    for failure in out["failures"]:
        print(f"FAILED: round {failure['round']} {failure['system']}: "
              f"{failure['error'].splitlines()[0]}")  # fmt: skip
    cached = Counter(r["system"] for r in out["results"] for p in r["points"] for row in p["rows"]
                     if (row.get("cached_tokens") or 0) > 0)  # fmt: skip
    if cached:
        print(f"WARNING: SGLang reported prefix-cache hits (cached_tokens > 0): {dict(cached)}")
    errors = {
        s: {k: v["errors"] for k, v in by.items() if v["errors"]} for s, by in summary.items()
    }
    errors = {s: e for s, e in errors.items() if e}
    if errors:
        print(f"request errors: {errors}")


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
