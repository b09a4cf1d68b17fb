"""``epd-bench-load``: a bounded load test of a language server with encoders behind it.

N concurrent clients each send requests (images of a few sizes, some text-only) until the
request budget or the time budget runs out. Every request is accounted for: completed, or
failed with its HTTP status (or a transport error). Reports p50/p99 latency, errors by kind
and the pool's peak use, and checks that every block is free again at the end.

With ``--hostile-every N`` one client in N sends only hostile bodies (lone surrogates next to an
image, wrong types, unsupported fields, paths outside any allowed directory, an unknown model,
deep nesting, broken JSON) for as long as the others run; each must get a 4xx while the others
are served. The request budget counts the good requests only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import httpx
from tqdm import tqdm


def _images(sizes: list[tuple[int, int]]) -> list[str]:
    import numpy as np
    from PIL import Image

    urls = []
    for i, (h, w) in enumerate(sizes):
        pixels = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def _body(i: int, urls: list[str], max_tokens: int) -> dict:
    content: list[dict] = [{"type": "text", "text": f"request {i}: describe."}]
    if i % 5:  # one in five is text-only
        content.insert(0, {"type": "image_url", "image_url": {"url": urls[i % len(urls)]}})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}  # fmt: skip


def hostile_bodies(image_url: str) -> list[bytes]:
    """Request bodies every server must refuse with a 4xx (JSON escapes keep lone surrogates)."""

    def chat(content, **extra) -> dict:
        return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}

    image = {"type": "image_url", "image_url": {"url": image_url}}
    bodies = [
        chat([image, {"type": "text", "text": "look \ud800 here"}]),
        chat("hi", stop=5),
        chat("hi", seed=2**70),
        chat("hi", temperature="hot"),
        chat("hi", max_tokens=True),
        chat("hi", logprobs=True),
        chat("hi", n=2),
        chat("hi", tools=[{"type": "function", "function": {"name": "f"}}]),
        chat("hi", model="no-such-model"),
        {"messages": ["hi"]},
        chat([{"type": "image", "image": image_url.split(",", 1)[1]}]),  # base64, no data:
        chat([{"type": "image_url", "image_url": {"url": "/etc/shadow"}}]),
        chat([{"type": "image_url", "image_url": {"url": "/" + "a" * 300}}]),
    ]
    return [json.dumps(b).encode() for b in bodies] + [b"[" * 50_000, b'{"messages": [']


async def run_load(url: str, clients: int, requests: int, duration_s: float, max_tokens: int,
                   sizes: list[tuple[int, int]], timeout_s: float,
                   hostile_every: int = 0) -> dict:  # fmt: skip
    urls = _images(sizes)
    hostile = hostile_bodies(urls[0])
    outcomes: list[tuple[str, float]] = []
    bad: list[str] = []  # outcomes of hostile requests: "4xx" or what else came back
    next_id = 0
    deadline = time.monotonic() + duration_s
    peak = 0
    bar = tqdm(total=requests, unit="req", desc=f"{clients} clients")

    async def client(http: httpx.AsyncClient, c: int) -> None:
        nonlocal next_id
        hostile_client = hostile_every and c % hostile_every == hostile_every - 1
        while next_id < requests and time.monotonic() < deadline:
            if hostile_client:  # until the good requests are done; not counted in them
                bad.append(await _hostile(http, url, hostile[(c + len(bad)) % len(hostile)]))
                continue
            i, next_id = next_id, next_id + 1
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/v1/chat/completions", json=_body(i, urls, max_tokens))
                kind = "ok" if r.status_code == 200 else _error_kind(r)
            except httpx.HTTPError as exc:
                kind = type(exc).__name__
            outcomes.append((kind, time.perf_counter() - t0))
            bar.update()

    async def watch(http: httpx.AsyncClient) -> None:
        nonlocal peak
        while True:
            pool = (await http.get(url + "/health")).json()["pool"]
            peak = max(peak, pool["total_blocks"] - pool["free_blocks"], pool["peak_used_blocks"])
            await asyncio.sleep(0.2)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        watcher = asyncio.create_task(watch(http))
        await asyncio.gather(*(client(http, c) for c in range(clients)))
        watcher.cancel()
        bar.close()
        health = await _settled(http, url)
    summary = _summary(outcomes, next_id, clients, peak, health)
    kinds = Counter(bad)
    summary["hostile"] = {"sent": len(bad), "rejected_4xx": kinds.pop("4xx", 0),
                          "other": dict(kinds)}  # fmt: skip
    return summary


async def _hostile(http: httpx.AsyncClient, url: str, body: bytes) -> str:
    try:
        r = await http.post(url + "/v1/chat/completions", content=body,
                            headers={"Content-Type": "application/json"})  # fmt: skip
    except httpx.HTTPError as exc:
        return type(exc).__name__
    try:
        answered = isinstance(r.json()["error"]["message"], str)  # a JSON error body
    except (ValueError, KeyError, TypeError):
        answered = False
    return "4xx" if 400 <= r.status_code < 500 and answered else f"http_{r.status_code}"


def _error_kind(r: httpx.Response) -> str:
    """``http_<status>: <first words of the reason>`` (numbers dropped, so kinds group)."""
    try:
        message = str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = ""
    words = [w for w in message.split()[:5] if not any(c.isdigit() for c in w)]
    return f"http_{r.status_code}: {' '.join(words)}".strip()


async def _settled(http: httpx.AsyncClient, url: str, timeout_s: float = 30.0) -> dict:
    """/health once every block is back (or the timeout passes)."""
    end = time.monotonic() + timeout_s
    while True:
        health = (await http.get(url + "/health")).json()
        pool = health["pool"]
        if pool["available_blocks"] == pool["total_blocks"] or time.monotonic() > end:
            return health
        await asyncio.sleep(0.2)


def _summary(outcomes, sent, clients, peak, health) -> dict:
    latencies = sorted(t for kind, t in outcomes if kind == "ok")
    kinds = Counter(kind for kind, _ in outcomes)
    pool = health["pool"]

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3 if latencies else 0

    return {
        "clients": clients, "sent": sent, "accounted": len(outcomes),
        "completed": kinds.pop("ok", 0), "errors": dict(kinds),
        "p50_ms": round(pct(0.50), 1), "p99_ms": round(pct(0.99), 1),
        "mean_ms": round(statistics.mean(latencies) * 1e3, 1) if latencies else 0.0,
        "peak_blocks_used": peak, "total_blocks": pool["total_blocks"],
        "available_blocks_after": pool["available_blocks"], "all_blocks_free": pool["available_blocks"] == pool["total_blocks"],
    }  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="epd-bench-load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--url", help="a running language server (default: start a local cluster)")
    p.add_argument("--model", type=Path, default=Path("out/tiny-model"),
                   help="checkpoint for the local cluster (created if missing)")  # fmt: skip
    p.add_argument("--encoders", type=int, default=2, help="encode servers in the local cluster")
    p.add_argument("--num-blocks", type=int, default=64, help="pool blocks (local cluster)")
    p.add_argument("--block-tokens", type=int, default=16, help="tokens per block (local cluster)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients")
    p.add_argument("--requests", type=int, default=512, help="requests in all, at most")
    p.add_argument("--duration", type=float, default=120.0, help="seconds, at most")
    p.add_argument("--max-tokens", type=int, default=4, help="tokens generated per request")
    p.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (s)")
    p.add_argument("--hostile-every", type=int, default=0, metavar="N",
                   help="one client in N sends only hostile bodies (default 0: none)")  # fmt: skip
    p.add_argument("--json", metavar="PATH", help="write the summary as JSON")
    p.add_argument("--log-dir", type=Path, default=Path("out/logs/bench-load"), help="server logs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [(64, 64), (96, 160), (224, 224), (128, 96)]
    run = lambda url: asyncio.run(run_load(url, args.clients, args.requests, args.duration,  # noqa: E731
                                           args.max_tokens, sizes, args.timeout,
                                           args.hostile_every))  # fmt: skip
    if args.url:
        summary = run(args.url)
    else:
        from epd.cluster import LocalCluster

        if not (args.model / "config.json").is_file():
            from epd.tiny_model import make_tiny_model

            make_tiny_model(args.model)
        lang = ["--num-blocks", str(args.num_blocks), "--block-tokens", str(args.block_tokens),
                "--max-waiting-allocs", "256", "--alloc-wait", "60"]  # fmt: skip
        with LocalCluster(args.model, n_encoders=args.encoders, log_dir=args.log_dir,
                          language_args=lang) as cluster:  # fmt: skip
            summary = run(cluster.url)
    print(json.dumps(summary, indent=1))
    hostile = summary["hostile"]
    refused = hostile["rejected_4xx"] == hostile["sent"]
    ok = summary["accounted"] == summary["sent"] and summary["all_blocks_free"] and refused
    print(f"every request accounted for: {summary['accounted']} of {summary['sent']}; "
          f"hostile refused with 4xx: {hostile['rejected_4xx']} of {hostile['sent']}; "
          f"pool full again: {summary['all_blocks_free']} -> {'PASS' if ok else 'FAIL'}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
