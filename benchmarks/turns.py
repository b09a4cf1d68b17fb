"""``epd-bench-turns``: multi-turn conversations that resend their image each turn, image cache
on and off, side by side in one run (issue 18).

Starts two local clusters on this host (one encoder and one language server each, Mooncake over
TCP on loopback, the same engine): ``on`` with ``--image-cache-blocks -1`` (resident rows may
fill the pool), ``off`` without. Each conversation gets its own image (fixed-seed random pixels)
and runs ``--turns`` turns the way chat clients send them: every turn carries the whole history,
the image in the first user message included, the previous answers as assistant messages, and a
new question. Conversations are paired: each runs on both clusters, the order alternating, so
both see the same load and the same noise. Then ``--fresh`` single-turn requests with a new image
each (no repeats: the cache can only cost there), also paired.

Reported per turn: the median of the server's TTFT (``epd.timings.ttft_s``: orchestration start
-> first token) with the cache on and off, and on/off; turn k's TTFT over turn 1's (target on the
tiny checkpoint: <= 0.4x for turns 2+ with the cache on); and for the fresh requests on/off
(target: no slower, within noise). Greedy tokens must be the same on both clusters for every
request (exit status 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from benchmarks.e2e import ensure_model, image_data_url, parse_size

QUESTIONS = ("Describe this image in one word.", "And its colours?", "Anything else?",
             "Say it again.", "Once more.", "Last one.")  # fmt: skip
TURN_TARGET = 0.4  # turns 2+: TTFT / turn 1's, cache on, at most
MODES = ("on", "off")


def ask(client: httpx.Client, url: str, messages: list[dict[str, Any]], max_tokens: int):
    """One chat completion: (answer text, token ids, the server's timings)."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    r = client.post(url + "/v1/chat/completions", json=body)
    r.raise_for_status()
    reply = r.json()
    return (
        reply["choices"][0]["message"]["content"],
        reply["epd"]["token_ids"],
        reply["epd"]["timings"],
    )


def conversation(client: httpx.Client, url: str, image: str, turns: int, max_tokens: int):
    """One conversation of ``turns`` turns; per turn (ttft_s, cached_images, token ids)."""
    first = [{"type": "image_url", "image_url": {"url": image}},
             {"type": "text", "text": QUESTIONS[0]}]  # fmt: skip
    messages: list[dict[str, Any]] = [{"role": "user", "content": first}]
    out = []
    for k in range(turns):
        text, ids, t = ask(client, url, messages, max_tokens)
        out.append({"ttft_s": t["ttft_s"], "cached_images": t.get("cached_images", 0), "ids": ids})
        messages += [{"role": "assistant", "content": text},
                     {"role": "user", "content": QUESTIONS[(k + 1) % len(QUESTIONS)]}]  # fmt: skip
    return out


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values) if values else float("nan")


def report(rows: dict[str, list[list[dict]]], fresh: dict[str, list[dict]], turns: int) -> str:
    lines = ["| turn | TTFT on, median ms | TTFT off, median ms | on / off | on: turn / turn 1 "
             "| cached images (on) | target |", "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    first = median_ms([c[0]["ttft_s"] for c in rows["on"]])
    for k in range(turns):
        on = median_ms([c[k]["ttft_s"] for c in rows["on"]])
        off = median_ms([c[k]["ttft_s"] for c in rows["off"]])
        hits = sum(c[k]["cached_images"] for c in rows["on"])
        ratio = on / first
        target = "-" if k == 0 else ("PASS" if ratio <= TURN_TARGET else "FAIL") + " (<= 0.4x)"
        lines.append(f"| {k + 1} | {on:.1f} | {off:.1f} | {on / off:.2f}x | {ratio:.2f}x "
                     f"| {hits} | {target} |")  # fmt: skip
    if fresh["on"]:
        on = median_ms([r["ttft_s"] for r in fresh["on"]])
        off = median_ms([r["ttft_s"] for r in fresh["off"]])
        lines += ["", "| no repeats | TTFT on, median ms | TTFT off, median ms | on / off |",
                  "|---|---:|---:|---:|",
                  f"| {len(fresh['on'])} requests, a new image each | {on:.1f} | {off:.1f} "
                  f"| {on / off:.2f}x |"]  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="epd-bench-turns", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", type=Path, default=Path("out/tiny-model"),
                   help="checkpoint directory (made with epd-make-tiny-model if missing)")  # fmt: skip
    p.add_argument("--engine", default="transformers", help="--engine of both language servers")
    p.add_argument("--conversations", type=int, default=10, help="conversations per cluster")
    p.add_argument("--turns", type=int, default=4, help="turns per conversation (<= 6)")
    p.add_argument("--fresh", type=int, default=20,
                   help="single-turn requests with a new image each, per cluster")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per answer")
    p.add_argument("--image-size", type=parse_size, default=(448, 448), metavar="HxW")
    p.add_argument("--log-dir", type=Path, default=Path("out/logs/bench-turns"))
    p.add_argument("--json", type=Path, metavar="PATH", help="write every row as JSON")
    a = p.parse_args(argv)
    if not 1 <= a.turns <= len(QUESTIONS) or a.conversations < 1 or a.fresh < 0:
        p.error(f"--turns must be 1..{len(QUESTIONS)}, --conversations >= 1, --fresh >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    from epd.cluster import LocalCluster

    args = parse_args(argv)
    model = ensure_model(args.model)
    h, w = args.image_size
    extra = {"on": ["--image-cache-blocks", "-1"], "off": []}
    clusters = {m: LocalCluster(model, n_encoders=1, transport="mooncake",
                                log_dir=args.log_dir / m, startup_timeout_s=240,
                                language_args=["--engine", args.engine, *extra[m]])
                for m in MODES}  # fmt: skip
    rows: dict[str, list] = {m: [] for m in MODES}
    fresh: dict[str, list] = {m: [] for m in MODES}
    mismatches = 0
    try:
        for c in clusters.values():
            c.start()
        with httpx.Client(timeout=120) as client:
            warm = image_data_url(h, w, seed=10_000)
            for c in clusters.values():  # first-request costs (imports, allocations) off the books
                conversation(client, c.url, warm, 1, args.max_tokens)
            for i in tqdm(range(args.conversations), desc="conversations", file=sys.stderr):
                image = image_data_url(h, w, seed=i)
                order = MODES if i % 2 == 0 else MODES[::-1]
                got = {m: conversation(client, clusters[m].url, image, args.turns,
                                       args.max_tokens) for m in order}  # fmt: skip
                mismatches += sum(
                    a["ids"] != b["ids"] for a, b in zip(got["on"], got["off"], strict=True)
                )
                for m in MODES:
                    rows[m].append(got[m])
            for i in tqdm(range(args.fresh), desc="no repeats", file=sys.stderr):
                image = image_data_url(h, w, seed=20_000 + i)
                order = MODES if i % 2 == 0 else MODES[::-1]
                got1 = {m: conversation(client, clusters[m].url, image, 1, args.max_tokens)[0]
                        for m in order}  # fmt: skip
                mismatches += got1["on"]["ids"] != got1["off"]["ids"]
                for m in MODES:
                    fresh[m].append(got1[m])
    finally:
        for c in clusters.values():
            c.stop()
    print(f"epd-bench-turns: {args.conversations} conversations x {args.turns} turns, "
          f"{args.fresh} requests without repeats, image {h}x{w}, engine {args.engine}, "
          f"max_tokens {args.max_tokens}; the two clusters take turns per conversation\n")  # fmt: skip
    print(report(rows, fresh, args.turns))
    print(f"\ngreedy tokens: {'the same' if not mismatches else f'{mismatches} DIFFER'} on both")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                         "conversations": rows, "fresh": fresh}))  # fmt: skip
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
