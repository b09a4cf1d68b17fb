"""``epd-bench-turns``: multi-turn conversations that resend their image each turn, image cache
on and off, side by side in one run (issue 18).

Each round starts three new local clusters on this host (one encoder and one language server
each, Mooncake over TCP on loopback, the same engine): ``on`` with both caches at their defaults
(the language server's resident rows, the encoder's ViT outputs), ``encoder`` with only the
encoder's (``epd-language --no-image-cache``: a repeat skips the ViT but is sent again), ``off``
with neither. Each conversation gets its own image (fixed-seed random pixels) and runs
``--turns`` turns the way chat clients send them: every turn carries the whole history, the
image in the first user message included, the previous answers as assistant messages, and a new
question. Conversations run on every cluster, the order rotating, so all see the same load and
noise. Then ``--fresh`` single-turn requests with a new image each (no repeats: the caches can
only cost there) on ``on`` and ``off``, paired. Two identical clusters started side by side
differ by up to ~15% in TTFT for as long as they run (``--calibrate`` measures it): pairing
within a round cannot remove that, so each round starts new clusters and the verdict's interval
is over the rounds.

Reported per turn: the median of the server's TTFT (``epd.timings.ttft_s``: orchestration start
-> first token) on each cluster, on/off, and turn k's TTFT over turn 1's (target on the tiny
checkpoint: <= 0.4x for turns 2+ with the caches on); for the fresh requests the median of the
paired on/off ratios (target: no slower, within noise: PASS unless the whole distribution-free
95% interval of the rounds' ratios lies above 1.00; 6 rounds at least). Greedy tokens must be
the same on every cluster for every request (exit status 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import math
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
MODES = ("on", "off")  # compared on every workload
ENCODER_ONLY = "encoder"  # the conversations also run here: the encoders' cache alone
# (language flags, encoder flags) per cluster; --calibrate builds "on" like "off"
SETUPS = {"on": ([], []), ENCODER_ONLY: (["--no-image-cache"], []),
          "off": (["--no-image-cache"], ["--no-image-cache"])}  # fmt: skip


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
        out.append({"ttft_s": t["ttft_s"], "cached_images": t.get("cached_images", 0), "ids": ids,
                    "timings": t})  # fmt: skip
        messages += [{"role": "assistant", "content": text},
                     {"role": "user", "content": QUESTIONS[(k + 1) % len(QUESTIONS)]}]  # fmt: skip
    return out


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values) if values else float("nan")


def paired_ratio(on: list[float], off: list[float], level: float = 0.95):
    """Median of the paired on/off ratios and a distribution-free confidence interval for it.

    The interval is the order statistics ``[r_(k), r_(n-k+1)]`` of the sorted ratios, ``k`` the
    largest with ``P(Binomial(n, 1/2) < k) <= (1 - level) / 2`` (the sign-test interval: no
    assumption about how the noise is distributed). None for the bounds when ``n`` is too small.
    """
    ratios = sorted(a / b for a, b in zip(on, off, strict=True) if b > 0)
    n = len(ratios)
    if not n:
        return float("nan"), None, None
    tail, k, below = (1 - level) / 2, 0, 0.0
    while k < n and below + math.comb(n, k) / 2**n <= tail:
        below += math.comb(n, k) / 2**n
        k += 1
    if k == 0:
        return statistics.median(ratios), None, None
    return statistics.median(ratios), ratios[k - 1], ratios[n - k]


def _interval(low: float | None, high: float | None) -> str:
    return f"{low:.2f}-{high:.2f}x" if low is not None and high is not None else "-"


def verdict(low: float | None, high: float | None) -> str:
    """Where the paired interval lies against 1.00 (no repeats: the cache must not cost)."""
    if low is None or high is None:
        return "no verdict (too few rounds: 6 at least)"
    if low > 1.0:
        return "FAIL (slower)"
    return "PASS (faster)" if high < 1.0 else "PASS (within noise)"


def report(
    rows: dict[str, list[list[dict]]], fresh: dict[str, list[dict]], turns: int, rounds: int = 1
) -> str:
    lines = ["| turn | TTFT on, median ms | TTFT encoder cache only | TTFT off, median ms "
             "| on / off | on: turn / turn 1 | cached images (on) | target |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    first = median_ms([c[0]["ttft_s"] for c in rows["on"]])
    for k in range(turns):
        on = median_ms([c[k]["ttft_s"] for c in rows["on"]])
        off = median_ms([c[k]["ttft_s"] for c in rows["off"]])
        enc = median_ms([c[k]["ttft_s"] for c in rows.get(ENCODER_ONLY, [])])
        hits = sum(c[k]["cached_images"] for c in rows["on"])
        ratio = on / first
        target = "-" if k == 0 else ("PASS" if ratio <= TURN_TARGET else "FAIL") + " (<= 0.4x)"
        lines.append(f"| {k + 1} | {on:.1f} | {enc:.1f} | {off:.1f} | {on / off:.2f}x | {ratio:.2f}x "
                     f"| {hits} | {target} |")  # fmt: skip
    if fresh["on"]:
        on_s, off_s = ([r["ttft_s"] for r in fresh[m]] for m in MODES)
        per_round, round_rows = [], []
        for r in range(rounds):  # new clusters each round: how far apart two servers sit
            on_r, off_r = ([x["ttft_s"] for x in fresh[m] if x.get("round", 0) == r] for m in MODES)
            ratio, low, high = paired_ratio(on_r, off_r)
            per_round.append(ratio)
            round_rows.append(f"| round {r + 1}: {len(on_r)} requests | {median_ms(on_r):.1f} "
                              f"| {median_ms(off_r):.1f} | {ratio:.2f}x | {_interval(low, high)} | |")  # fmt: skip
        # The verdict's interval is over the rounds' ratios: requests of one round share its
        # two servers, whose own difference no pairing removes (6 rounds at least).
        _, low, high = paired_ratio(per_round, [1.0] * len(per_round))
        lines += ["", "| no repeats | TTFT on, median ms | TTFT off, median ms "
                  "| on / off, paired median | 95% interval | target |",
                  "|---|---:|---:|---:|---:|---|",
                  f"| all: {len(on_s)} requests, a new image each (interval over the {rounds} "
                  f"rounds) | {median_ms(on_s):.1f} | {median_ms(off_s):.1f} "
                  f"| {paired_ratio(on_s, off_s)[0]:.2f}x | {_interval(low, high)} "
                  f"| {verdict(low, high)} |",
                  *round_rows]  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="epd-bench-turns", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", type=Path, default=Path("out/tiny-model"),
                   help="checkpoint directory (made with epd-make-tiny-model if missing)")  # fmt: skip
    p.add_argument("--engine", default="transformers", help="--engine of every language server")
    p.add_argument("--rounds", type=int, default=6,
                   help="rounds, each with three new clusters (how much two identical servers "
                   "differ is noise that pairing within one round cannot remove)")  # fmt: skip
    p.add_argument("--calibrate", action="store_true",
                   help="build the 'on' cluster like 'off' (both caches off): measures how far "
                   "apart two identical clusters sit, the noise floor of the on/off ratios")  # fmt: skip
    p.add_argument("--conversations", type=int, default=4,
                   help="conversations per cluster, per round")  # fmt: skip
    p.add_argument("--turns", type=int, default=4, help="turns per conversation (<= 6)")
    p.add_argument("--fresh", type=int, default=30,
                   help="single-turn requests with a new image each, per cluster, per round")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per answer")
    p.add_argument("--image-size", type=parse_size, default=(448, 448), metavar="HxW")
    p.add_argument("--log-dir", type=Path, default=Path("out/logs/bench-turns"))
    p.add_argument("--json", type=Path, metavar="PATH", help="write every row as JSON")
    a = p.parse_args(argv)
    if not 1 <= a.turns <= len(QUESTIONS) or min(a.conversations, a.rounds) < 1 or a.fresh < 0:
        p.error(
            f"--turns must be 1..{len(QUESTIONS)}, --conversations and --rounds >= 1, --fresh >= 0"
        )
    return a


def one_round(args, model: Path, r: int, rows: dict, fresh: dict) -> int:
    """Round ``r``: new clusters, the conversations, the single-turn requests; mismatches."""
    from epd.cluster import LocalCluster

    h, w = args.image_size
    setups = {**SETUPS, "on": SETUPS["off"]} if args.calibrate else SETUPS
    modes = (*MODES, ENCODER_ONLY)
    order = modes if r % 2 == 0 else modes[::-1]  # which cluster starts first, too
    clusters = {m: LocalCluster(model, n_encoders=1, transport="mooncake",
                                log_dir=args.log_dir / f"round-{r}" / m, startup_timeout_s=240,
                                language_args=["--engine", args.engine, *setups[m][0]],
                                encoder_args=setups[m][1])
                for m in order}  # fmt: skip
    mismatches, base = 0, 1000 * r  # images differ across rounds
    try:
        for c in clusters.values():
            c.start()
        with httpx.Client(timeout=120) as client:
            warm = image_data_url(h, w, seed=10_000_000 + r)
            for c in clusters.values():  # first-request costs (imports, allocations) off the books
                conversation(client, c.url, warm, 1, args.max_tokens)
            for i in tqdm(range(args.conversations), desc=f"round {r + 1}: conversations",
                          file=sys.stderr):  # fmt: skip
                image = image_data_url(h, w, seed=base + i)
                turn = modes[i % 3 :] + modes[: i % 3]
                got = {m: conversation(client, clusters[m].url, image, args.turns,
                                       args.max_tokens) for m in turn}  # fmt: skip
                mismatches += sum(
                    a["ids"] != b["ids"]
                    for m in (ENCODER_ONLY, "off")
                    for a, b in zip(got["on"], got[m], strict=True)
                )
                for m in modes:
                    rows[m].append(got[m])
            for i in tqdm(range(args.fresh), desc=f"round {r + 1}: no repeats", file=sys.stderr):
                image = image_data_url(h, w, seed=5_000_000 + base + i)
                turn = MODES if i % 2 == 0 else MODES[::-1]
                got1 = {m: conversation(client, clusters[m].url, image, 1, args.max_tokens)[0]
                        for m in turn}  # fmt: skip
                mismatches += got1["on"]["ids"] != got1["off"]["ids"]
                for m in MODES:
                    fresh[m].append({**got1[m], "round": r})
    finally:
        for c in clusters.values():
            c.stop()
    return mismatches


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = ensure_model(args.model)
    h, w = args.image_size
    rows: dict[str, list] = {m: [] for m in (*MODES, ENCODER_ONLY)}
    fresh: dict[str, list] = {m: [] for m in MODES}
    mismatches = sum(one_round(args, model, r, rows, fresh) for r in range(args.rounds))
    print(f"epd-bench-turns: {args.rounds} round(s) of {args.conversations} conversations x "
          f"{args.turns} turns and {args.fresh} requests without repeats, image {h}x{w}, engine "
          f"{args.engine}, max_tokens {args.max_tokens}"
          f"{' (--calibrate: on is built like off)' if args.calibrate else ''}; new clusters "
          f"each round, they take turns per conversation and per request\n")  # fmt: skip
    print(report(rows, fresh, args.turns, args.rounds))
    print(f"\ngreedy tokens: {'the same' if not mismatches else f'{mismatches} DIFFER'} everywhere")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                         "conversations": rows, "fresh": fresh}))  # fmt: skip
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
