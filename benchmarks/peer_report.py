"""``epd-bench-peer``, reporting: results pooled over rounds, the token check, ratios against the
targets, and the markdown tables the benchmark prints. See ``peer.py``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

from benchmarks.e2e import PHASES, summarize

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
