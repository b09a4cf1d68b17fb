"""``epd-bench-e2e``: time-to-first-token of image (or video) requests through the whole EPD path.

Starts a local cluster (``--encoders`` encode servers and one language server, real processes on
loopback; or uses a running language server with ``--url``) and sends chat requests, each with one
PNG image (random pixels, its own per request, seeded by ``--seed`` and the request's number, so
no image cache serves it; as a data: URL) and a short text, ``max_tokens`` 1, greedy,
``ignore_eos``, from ``--concurrency`` closed-loop clients. Every response carries the server's
breakdown in ``epd.timings``:

    block_wait  language side: ttft starts -> receive blocks lent for every image of it
                (0 unless the pool was full and the request queued for room)
    queue       encoder: EncodeJob read -> its preprocessing starts (the encoder's queueing)
    decode      (--video only) encoder: the PyAV decode of the video's sampled frames
    preprocess  encoder: image decode, resize, patches (grid checked against the job's); with
                --video the resize and patches of the decoded frames only (the server's
                preprocess_s less its decode_s)
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

``--video SECONDS`` sends one video clip instead of the image: ``--image-size`` frames of random
8x8-pixel blocks at ``--video-fps`` frames a second (the source rate; the checkpoint's processor
samples its own, 2 a second and at least 4 frames on the tiny model), MPEG-4 in MP4 made with
PyAV, as a ``data:video/mp4;base64`` URL. Every request's clip has its own pixels (seeded by
``--seed`` and the request's number, warmup included, made before the run), so neither the
language server's resident rows nor the encoder's cache serve it: each request pays the whole
decode, preprocess, ViT and transfer. The header gives the frames the server sampled
(``epd.video_frame_indices``) and its visual tokens (``epd.timings.visual_tokens``), both from
the first response. In the JSON, each request's row keeps the server's own values (its
``preprocess_s`` includes its ``decode_s``); the summary's ``preprocess``, like the table's,
excludes the decode.
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
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

# server-side phases, in request order; overhead = ttft - sum of the others
SERVER_PHASES = (
    "block_wait", "queue", "preprocess", "vision", "transfer", "prefill", "overhead",
)  # fmt: skip
PHASES = ("ttft", *SERVER_PHASES)
# --video: the encoder's frame decode split out of its preprocessing
VIDEO_PHASES = ("ttft", "block_wait", "queue", "decode", *SERVER_PHASES[2:])
CLIENT = ("latency", "http")
OVERHEAD_TARGET_MS = 1.5  # issue 10 (flow v3): median orchestration overhead at concurrency 1
PROMPT = "Describe this image in one word."
VIDEO_PROMPT = "Describe this video in one word."
VIDEO_BLOCK = 8  # pixels a side of one random block of a video frame: survives lossy coding


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


def image_data_url(height: int, width: int, seed: int | tuple[int, ...] = 0) -> str:
    """A PNG of uniform random RGB pixels (the same bytes for the same seed) as a data: URL."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def video_frame_count(seconds: float, fps: float) -> int:
    """Frames of a ``seconds`` clip at ``fps`` frames a second."""
    return round(seconds * fps)


def video_data_url(seconds: float, fps: float, height: int, width: int,
                   seed: int | tuple[int, ...] = 0) -> str:  # fmt: skip
    """An MP4 (MPEG-4 part 2, yuv420p) of random 8x8 blocks, ``seconds`` long at ``fps``, as a
    data: URL; the same bytes for the same arguments."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    blocks = (-(-height // VIDEO_BLOCK), -(-width // VIDEO_BLOCK), 3)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(video_frame_count(seconds, fps)):
            pixels = rng.integers(0, 256, blocks, dtype=np.uint8)
            pixels = pixels.repeat(VIDEO_BLOCK, 0).repeat(VIDEO_BLOCK, 1)[:height, :width]
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush
    return "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(url: str, max_tokens: int, model: str, text: str = PROMPT,
              part: str = "image_url") -> dict[str, Any]:  # fmt: skip
    """The request; ``part`` is the media part's type (``image_url`` or ``video_url``)."""
    content = [{"type": part, part: {"url": url}}, {"type": "text", "text": text}]
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
    """Closed-loop clients: ``concurrency`` threads, each with a kept-alive connection.

    Every request sends ``body``, or, when ``bodies`` has one for its index, that one (encoded
    here, before any request: the client stays cheap). ``first_epd`` is the ``epd`` field of the
    first successful response."""

    def __init__(self, url: str, body: dict[str, Any], concurrency: int, timeout_s: float,
                 bodies: dict[int, dict[str, Any]] | None = None):  # fmt: skip
        self.endpoint = url.rstrip("/") + "/v1/chat/completions"
        self.payload = json.dumps(body).encode()  # encoded once: the client stays cheap
        self.payloads = {i: json.dumps(b).encode() for i, b in (bodies or {}).items()}
        self.first_epd: dict[str, Any] | None = None
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
            r = self.http.post(self.endpoint, content=self.payloads.get(index, self.payload))
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
            epd = body.get("epd") or {}
            if self.first_epd is None:
                self.first_epd = epd
            timings = epd.get("timings") or {}
            for phase in PHASES:
                row[f"{phase}_s"] = timings.get(f"{phase}_s")
            if "decode_s" in timings:  # a video's: part of preprocess_s
                row["decode_s"] = timings["decode_s"]
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


def phase_s(row: dict[str, Any], phase: str, split_decode: bool = False) -> float | None:
    """``row``'s seconds in ``phase``; ``split_decode``: preprocess without the decode."""
    value = row.get(f"{phase}_s")
    if split_decode and phase == "preprocess" and value is not None:
        decode = row.get("decode_s")
        return None if decode is None else value - decode
    return value


def summarize(rows: list[dict[str, Any]], wall_s: float,
              phases_in: tuple[str, ...] = PHASES) -> dict[str, Any]:  # fmt: skip
    """Per phase of ``phases_in`` (and the client's), median / p90 / mean / max ms; with
    ``VIDEO_PHASES`` the preprocess phase is the server's preprocess_s less its decode_s."""
    ok = [r for r in rows if r["status"] == 200]
    split = "decode" in phases_in
    phases: dict[str, dict[str, float]] = {}
    for phase in (*phases_in, *CLIENT):
        values = [v * 1e3 for r in ok if (v := phase_s(r, phase, split)) is not None]
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


def table(summary: dict[str, Any], phases_in: tuple[str, ...] = PHASES) -> str:
    """Markdown table: one line per phase, median / p90 / max ms and share of the median TTFT."""
    phases = summary["phases"]
    ttft = phases.get("ttft", {}).get("median_ms")
    lines = ["| phase | median ms | p90 ms | max ms | % of median ttft |", "|---|---|---|---|---|"]
    for phase in (*phases_in, *CLIENT):
        if phase not in phases:
            lines.append(f"| {phase} | - | - | - | - |")
            continue
        s = phases[phase]
        share = f"{100 * s['median_ms'] / ttft:.1f}" if ttft and phase in phases_in else ""
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
                   help="image (with --video: frame) height x width in pixels (default 448x448: "
                        "196 visual tokens for an image on the tiny model)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=1,
                   help="tokens to generate per request (default 1: TTFT only)")  # fmt: skip
    p.add_argument("--video", type=positive_float, metavar="SECONDS",
                   help="send one video clip of this many seconds instead of the image: "
                        "--image-size frames of random blocks at --video-fps, MP4 (MPEG-4) as a "
                        "data: URL, its own pixels per request; the table splits the encoder's "
                        "frame decode out of preprocess")  # fmt: skip
    p.add_argument("--video-fps", type=positive_float, metavar="FPS",
                   help="frame rate the --video clip is made at (default 4); the server's "
                        "processor samples at its own, 2 a second on the tiny model")  # fmt: skip
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the images' (with --video: the clips') random pixels, one "
                        "per request")  # fmt: skip
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
    if args.video_fps is not None and args.video is None:
        p.error("--video-fps needs --video")
    if args.video is not None:
        args.video_fps = args.video_fps or 4.0
        if video_frame_count(args.video, args.video_fps) < 1:
            p.error(f"--video {args.video:g} at --video-fps {args.video_fps:g} makes no frame")
    if args.seed < 0:
        p.error("--seed must be >= 0")
    return args


def ensure_model(model: Path) -> Path:
    if (model / "config.json").is_file():
        return model
    from epd.tiny_model import make_tiny_model

    print(f"creating the tiny checkpoint in {model}", file=sys.stderr)
    return Path(make_tiny_model(model))


def image_bodies(args: argparse.Namespace, model_id: str) -> dict[int, dict[str, Any]]:
    """One request body per request index (warmup's negative), each with its own image: with
    one image for all, every request after the first would be a cache hit (issue 18's caches
    are on by default) and the benchmark would time no decode, ViT or transfer."""
    height, width = args.image_size
    return {i: chat_body(image_data_url(height, width, (args.seed, i + args.warmup)),
                         args.max_tokens, model_id)
            for i in range(-args.warmup, args.requests)}  # fmt: skip


def video_bodies(args: argparse.Namespace, model_id: str) -> dict[int, dict[str, Any]]:
    """One request body per request index (warmup's negative), each with its own clip."""
    height, width = args.image_size
    n = args.warmup + args.requests
    print(f"making {n} video clips of {args.video:g} s", file=sys.stderr)
    bodies = {}
    for i in range(-args.warmup, args.requests):
        seed = (args.seed, i + args.warmup)  # distinct bytes: no cache serves a request
        url = video_data_url(args.video, args.video_fps, height, width, seed)
        bodies[i] = chat_body(url, args.max_tokens, model_id, VIDEO_PROMPT, "video_url")
    return bodies


def video_config(args: argparse.Namespace, epd: dict[str, Any] | None) -> dict[str, Any]:
    """The clips as made, and what the server made of the first one it answered."""
    indices = ((epd or {}).get("video_frame_indices") or [None])[0]
    return {
        "seconds": args.video, "fps": args.video_fps, "frame_size": list(args.image_size),
        "frames": video_frame_count(args.video, args.video_fps),
        "sampled_frames": None if indices is None else len(indices), "frame_indices": indices,
        "visual_tokens": ((epd or {}).get("timings") or {}).get("visual_tokens"),
    }  # fmt: skip


def video_header(video: dict[str, Any]) -> str:
    height, width = video["frame_size"]
    sampled = "?" if video["sampled_frames"] is None else video["sampled_frames"]
    return (f"video {video['seconds']:g} s at {video['fps']:g} fps: {video['frames']} frames of "
            f"{height}x{width}, {sampled} sampled")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    height, width = args.image_size
    model = None if args.url else ensure_model(args.model)
    video = args.video is not None
    n_vis = None  # a video's visual tokens are the server's (from the first response)
    if not video:
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
        model_id = served(url)
        bodies = video_bodies(args, model_id) if video else image_bodies(args, model_id)
        client = Client(url, bodies[0], args.concurrency, args.timeout, bodies=bodies)
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

    phases = VIDEO_PHASES if video else PHASES
    summary = summarize(rows, wall_s, phases)
    overhead = summary["phases"].get("overhead", {}).get("median_ms", math.nan)
    summary["overhead_target_ms"] = OVERHEAD_TARGET_MS
    summary["overhead_pass"] = overhead <= OVERHEAD_TARGET_MS
    where = args.url or f"local cluster: {args.encoders} encoder(s), {args.transport}"
    n_served = summary["visual_tokens"]
    vis = f"{n_served:g}" if n_served is not None else "?"
    if n_vis is not None and n_served != n_vis:
        vis += f" (expected {n_vis})"
    media = f"image {height}x{width}"
    if video:
        config["video"] = video_config(args, client.first_epd if client else None)
        config["visual_tokens"] = config["video"]["visual_tokens"]
        media = video_header(config["video"])
    prompt = summary["prompt_tokens"]
    print(
        f"\n{where}; {args.requests} requests at concurrency {args.concurrency}; "
        f"{media}, {vis} visual tokens; "
        f"prompt tokens {'?' if prompt is None else f'{prompt:g}'}; max_tokens {args.max_tokens}\n"
    )
    print(table(summary, phases))
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
