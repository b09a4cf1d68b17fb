"""``epd-bench-e2e``: time-to-first-token of image requests through the whole EPD path.

Starts a local cluster (``--encoders`` encode servers and one language server, real processes on
loopback; or uses a running language server with ``--url``) and sends chat requests, each with one
PNG image (fixed-seed random pixels, as a data: URL) and a short text, ``max_tokens`` 1, greedy,
``ignore_eos``, from ``--concurrency`` closed-loop clients. Every response carries the server's
breakdown in ``epd.timings``:

    block_wait  language side: ttft starts -> receive blocks lent for every image of it
                (0 unless the pool was full and the request queued for room)
    queue       encoder: EncodeJob read -> its preprocessing starts (the encoder's queueing)
    preprocess  encoder: image decode, resize, patches (grid checked against the job's)
    vision      encoder: the ViT forward of the batch the image was in
    transfer    encoder: transport submit -> the transport reports the rows written
                (the four encoder phases are those of the request's slowest image)
    prefill     the language model's prefill up to the first token
    overhead    ttft - all of the above: orchestration (ZeroMQ hops, including the time a
                message waits to be read; message coding, checksums, input building, the engine
                hand-off and its wait for the engine's round; event-loop wake-ups)

``ttft`` is measured by the language server from the start of the request's orchestration (after
the HTTP body is parsed and validated and the prompt prepared: chat template, tokens, each
image's grid from its header, positions) to the first token. The client adds ``latency``
(request sent -> response parsed) and ``http`` (latency - ttft: HTTP, body parsing, validation
and prompt preparation, the response). Medians and p90 in milliseconds, throughput in requests/s.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

# server-side phases, in request order; overhead = ttft - sum of the others
SERVER_PHASES = (
    "block_wait", "queue", "preprocess", "vision", "transfer", "prefill", "overhead",
)  # fmt: skip
PHASES = ("ttft", *SERVER_PHASES)
CLIENT = ("latency", "http")
OVERHEAD_TARGET_MS = 1.5  # issue 10 (flow v3): median orchestration overhead at concurrency 1
PROMPT = "Describe this image in one word."


# --- requests -------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """``HxW`` (e.g. ``448x448``) -> (height, width)."""
    h, sep, w = text.lower().partition("x")
    try:
        height, width = int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"image size must look like 448x448, got {text!r}"
        ) from None
    if not sep or height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"image size must look like 448x448, got {text!r}")
    return height, width


def image_data_url(height: int, width: int, seed: int = 0) -> str:
    """A PNG of uniform random RGB pixels (the same bytes for the same seed) as a data: URL."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(url: str, max_tokens: int, model: str, text: str = PROMPT) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


def visual_tokens(model: Path | None, height: int, width: int) -> int | None:
    """Visual tokens the processor of ``model`` makes of one height x width image (None: unknown)."""
    if model is None or not (model / "processor_config.json").is_file():
        return None
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        proc = json.loads((model / "processor_config.json").read_text())["image_processor"]
        patch, merge = int(proc["patch_size"]), int(proc["merge_size"])
        size = proc.get("size") or {}
        h, w = smart_resize(
            height,
            width,
            factor=patch * merge,
            min_pixels=int(size.get("shortest_edge", 56 * 56)),
            max_pixels=int(size.get("longest_edge", 28 * 28 * 1280)),
        )
        return (h // patch) * (w // patch) // (merge * merge)
    except Exception:  # noqa: BLE001 - informational only
        return None


def served(url: str) -> str:
    """The model id the server at ``url`` answers to (its first in /v1/models)."""
    try:
        return str(httpx.get(url.rstrip("/") + "/v1/models", timeout=5).json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return "default"


class Client:
    """Closed-loop clients: ``concurrency`` threads, each with a kept-alive connection."""

    def __init__(self, url: str, body: dict[str, Any], concurrency: int, timeout_s: float):
        self.endpoint = url.rstrip("/") + "/v1/chat/completions"
        self.payload = json.dumps(body).encode()  # encoded once: the client stays cheap
        self.concurrency = concurrency
        self.http = httpx.Client(
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            headers={"Content-Type": "application/json"},
        )
        self.t0 = time.perf_counter()

    def one(self, index: int) -> dict[str, Any]:
        """Send one request; its row (status, client times, the server's timings)."""
        row: dict[str, Any] = {"index": index}
        start = time.perf_counter()
        try:
            r = self.http.post(self.endpoint, content=self.payload)
            row["status"] = r.status_code
            try:
                body = r.json()
            except ValueError:  # e.g. a plain-text 500
                body = {"error": {"message": r.text}}
        except Exception as exc:  # noqa: BLE001 - counted as an error, the run goes on
            body = {"error": {"message": f"{type(exc).__name__}: {exc}"}}
            row["status"] = type(exc).__name__
        end = time.perf_counter()
        row.update(start_s=start - self.t0, end_s=end - self.t0, latency_s=end - start)
        if row["status"] == 200:
            timings = (body.get("epd") or {}).get("timings") or {}
            for phase in PHASES:
                row[f"{phase}_s"] = timings.get(f"{phase}_s")
            row["http_s"] = row["latency_s"] - row["ttft_s"] if row["ttft_s"] is not None else None
            usage = body.get("usage") or {}
            row["prompt_tokens"] = usage.get("prompt_tokens")
            row["completion_tokens"] = usage.get("completion_tokens")
            row["visual_tokens"] = timings.get("visual_tokens")
            row["transfer_bytes"] = timings.get("transfer_bytes")
        else:
            err = body.get("error") if isinstance(body, dict) else None
            row["error"] = str(err.get("message", err) if isinstance(err, dict) else body)[:500]
        return row

    def run(self, n: int, first_index: int, desc: str, leave: bool = True) -> list[dict[str, Any]]:
        rows = []
        with (
            ThreadPoolExecutor(self.concurrency, thread_name_prefix="client") as pool,
            tqdm(total=n, desc=desc, unit="req", leave=leave, file=sys.stderr) as bar,
        ):
            futures = [pool.submit(self.one, first_index + i) for i in range(n)]
            for fut in as_completed(futures):
                row = fut.result()
                rows.append(row)
                bar.update()
                if row["status"] != 200:
                    bar.set_postfix(errors=sum(r["status"] != 200 for r in rows))
        return sorted(rows, key=lambda r: r["index"])

    def close(self) -> None:
        self.http.close()


# --- statistics -----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``q`` in 0..100."""
    xs = sorted(values)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(rows: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == 200]
    phases: dict[str, dict[str, float]] = {}
    for phase in (*PHASES, *CLIENT):
        values = [r[f"{phase}_s"] * 1e3 for r in ok if r.get(f"{phase}_s") is not None]
        if values:
            phases[phase] = {
                "median_ms": statistics.median(values),
                "p90_ms": percentile(values, 90),
                "mean_ms": statistics.fmean(values),
                "max_ms": max(values),
                "n": len(values),
            }
    errors = Counter(str(r["status"]) for r in rows if r["status"] != 200)

    def median_of(key: str) -> float | None:
        values = [r[key] for r in ok if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {
        "requests": len(rows),
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "wall_s": wall_s,
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else math.nan,
        "prompt_tokens": median_of("prompt_tokens"),
        "visual_tokens": median_of("visual_tokens"),
        "transfer_bytes": median_of("transfer_bytes"),
        "phases": phases,
    }


def table(summary: dict[str, Any]) -> str:
    """Markdown table: one line per phase, median / p90 / max ms and share of the median TTFT."""
    phases = summary["phases"]
    ttft = phases.get("ttft", {}).get("median_ms")
    lines = ["| phase | median ms | p90 ms | max ms | % of median ttft |", "|---|---|---|---|---|"]
    for phase in (*PHASES, *CLIENT):
        if phase not in phases:
            lines.append(f"| {phase} | - | - | - | - |")
            continue
        s = phases[phase]
        share = f"{100 * s['median_ms'] / ttft:.1f}" if ttft and phase in PHASES else ""
        name = "overhead (orchestration)" if phase == "overhead" else phase
        lines.append(
            f"| {name} | {s['median_ms']:.2f} | {s['p90_ms']:.2f} | {s['max_ms']:.2f} | {share} |"
        )
    return "\n".join(lines)


def verdict(summary: dict[str, Any]) -> str:
    overhead = summary["phases"].get("overhead", {}).get("median_ms", math.nan)
    ok = overhead <= OVERHEAD_TARGET_MS  # NaN (no successful request) fails
    return (
        f"median orchestration overhead: {overhead:.2f} ms "
        f"(target <= {OVERHEAD_TARGET_MS:g} ms at concurrency 1): {'PASS' if ok else 'FAIL'}"
    )


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="epd-bench-e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", type=Path, default=Path("out/tiny-model"),
                   help="checkpoint directory; the tiny model is created there when it has no "
                        "config.json (default out/tiny-model)")  # fmt: skip
    p.add_argument("--url", default="",
                   help="use the language server running at this base URL (e.g. "
                        "http://127.0.0.1:8000) instead of starting a local cluster")  # fmt: skip
    p.add_argument("--encoders", type=int, default=1,
                   help="encode servers in the local cluster (default 1)")  # fmt: skip
    p.add_argument("--transport", choices=["mooncake", "shm"], default="mooncake",
                   help="data plane of the local cluster (default mooncake)")  # fmt: skip
    p.add_argument("--log-dir", type=Path, default=Path("out/logs/bench-e2e"),
                   help="server logs of the local cluster (default out/logs/bench-e2e)")  # fmt: skip
    p.add_argument("--requests", type=int, default=50,
                   help="measured requests (default 50)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=3,
                   help="requests sent first and not counted (default 3)")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests in flight at once, closed loop (default 1)")  # fmt: skip
    p.add_argument("--image-size", type=parse_size, default=(448, 448), metavar="HxW",
                   help="image height x width in pixels (default 448x448: 196 visual tokens on "
                        "the tiny model)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=1,
                   help="tokens to generate per request (default 1: TTFT only)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the image's random pixels")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds one request may take before it counts as an error")  # fmt: skip
    p.add_argument("--json", metavar="PATH", type=Path,
                   help="write the configuration, summary and per-request timings as JSON")  # fmt: skip
    args = p.parse_args(argv)
    for flag in ("requests", "concurrency", "encoders", "max_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def ensure_model(model: Path) -> Path:
    if (model / "config.json").is_file():
        return model
    from epd.tiny_model import make_tiny_model

    print(f"creating the tiny checkpoint in {model}", file=sys.stderr)
    return Path(make_tiny_model(model))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    height, width = args.image_size
    model = None if args.url else ensure_model(args.model)
    n_vis = visual_tokens(model if model is not None else args.model, height, width)
    config = {
        "url": args.url or None, "model": str(model) if model else None,
        "encoders": None if args.url else args.encoders,
        "transport": None if args.url else args.transport, "requests": args.requests,
        "warmup": args.warmup, "concurrency": args.concurrency, "image_size": [height, width],
        "visual_tokens": n_vis, "max_tokens": args.max_tokens,
    }  # fmt: skip

    cluster = None
    if args.url:
        url = args.url
        try:
            httpx.get(url.rstrip("/") + "/health", timeout=5).raise_for_status()
        except httpx.HTTPError as exc:
            print(f"no language server at {url}: {exc}", file=sys.stderr)
            return 2
    else:
        from epd.cluster import LocalCluster

        assert model is not None
        print(f"starting {args.encoders} encoder(s) + language server ({args.transport}), "
              f"logs in {args.log_dir}", file=sys.stderr)  # fmt: skip
        cluster = LocalCluster(
            model, n_encoders=args.encoders, transport=args.transport, log_dir=args.log_dir
        )
        cluster.start()
        url = cluster.url
    client = None
    try:
        body = chat_body(image_data_url(height, width, args.seed), args.max_tokens, served(url))
        client = Client(url, body, args.concurrency, args.timeout)
        if args.warmup:
            client.run(args.warmup, -args.warmup, "warmup", leave=False)
        t0 = time.perf_counter()
        rows = client.run(args.requests, 0, f"c={args.concurrency}")
        wall_s = time.perf_counter() - t0
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.stop()

    summary = summarize(rows, wall_s)
    overhead = summary["phases"].get("overhead", {}).get("median_ms", math.nan)
    summary["overhead_target_ms"] = OVERHEAD_TARGET_MS
    summary["overhead_pass"] = overhead <= OVERHEAD_TARGET_MS
    where = args.url or f"local cluster: {args.encoders} encoder(s), {args.transport}"
    n_served = summary["visual_tokens"]
    vis = f"{n_served:g}" if n_served is not None else "?"
    if n_vis is not None and n_served != n_vis:
        vis += f" (expected {n_vis})"
    prompt = summary["prompt_tokens"]
    print(
        f"\n{where}; {args.requests} requests at concurrency {args.concurrency}; "
        f"image {height}x{width}, {vis} visual tokens; "
        f"prompt tokens {'?' if prompt is None else f'{prompt:g}'}; max_tokens {args.max_tokens}\n"
    )
    print(table(summary))
    print(
        f"\nthroughput: {summary['throughput_rps']:.2f} requests/s "
        f"({summary['ok']} ok in {wall_s:.2f} s)"
    )
    errors = summary["errors"]
    print("errors: " + (", ".join(f"{k}: {v}" for k, v in errors.items()) if errors else "none"))
    if args.concurrency != 1:
        print(f"note: the overhead target is for concurrency 1; this run used {args.concurrency}")
    print(verdict(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"config": config, "summary": summary, "requests": rows}
        args.json.write_text(json.dumps(out, indent=1))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
