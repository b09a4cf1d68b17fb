"""Tables, target ratios and plots for ``epd-bench-transfer`` results."""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterable
from typing import Any

MIB = 1 << 20
BOOTSTRAP = 2000
# the targets
RAW_MOONCAKE = 0.95  # our mooncake / raw Mooncake, every payload >= 16 MiB
SHM_COPY = 0.6  # our shm / single-thread in-process copy, at 16 MiB
FIXED_MS = 0.3  # median fixed cost per job (tiny payload, loopback), our paths


def _throughput(rows: Iterable[Any]) -> list[Any]:
    return [r for r in rows if getattr(r, "kind", "throughput") == "throughput"]


def _index(rows: Iterable[Any]) -> dict[tuple[int, int], dict[str, Any]]:
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for r in _throughput(rows):
        out.setdefault((r.hidden, r.tokens), {})[r.backend] = r
    return out


def table(rows: list[Any], backends: list[str]) -> str:
    """Markdown table: one line per payload, median GB/s per backend."""
    head = "| H | tokens | MiB | " + " | ".join(backends) + " |"
    lines = [head, "|" + "---|" * (3 + len(backends))]
    for (hidden, tokens), by in sorted(_index(rows).items()):
        nbytes = next(iter(by.values())).bytes
        cells = [f"{by[b].gbps_median:.2f}" if b in by else "-" for b in backends]
        lines.append(f"| {hidden} | {tokens} | {nbytes / MIB:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(a: Any, b: Any) -> tuple[float, float, float]:
    """Speed of ``a`` relative to ``b`` from the rounds they shared: the median over rounds of
    ``time_b / time_a``, and a 95% bootstrap interval of that median (fixed seed).

    Both ran once per round, next to each other, so drift on the machine hits both and cancels
    in each round's ratio; the interval says whether a target is met or only within noise.
    """
    per_round = [tb / ta for ta, tb in zip(a.ms_rounds, b.ms_rounds, strict=False) if ta > 0]
    if not per_round:
        raise ValueError(f"{a.backend} and {b.backend} share no rounds")
    rng = random.Random(0)
    meds = sorted(
        statistics.median(rng.choices(per_round, k=len(per_round))) for _ in range(BOOTSTRAP)
    )
    lo, hi = meds[int(0.025 * BOOTSTRAP)], meds[int(0.975 * BOOTSTRAP) - 1]
    return statistics.median(per_round), lo, hi


def _compare(tag: str, a: Any, b: Any, target: float | None = None, note: str = "") -> str:
    """One line: the ratio of the medians (the verdict, when there is a ``target``) and the
    paired per-round ratio with its interval."""
    r = a.gbps_median / b.gbps_median
    med, lo, hi = paired(a, b)
    line = f"{tag}: {a.backend} / {b.backend} = {r:.2f}"
    if target is not None:
        line += f" (target >= {target:g}) {_ok(r >= target)}"
        if lo < target <= hi or hi < target <= lo:
            note = " (within noise)" + note
    return f"{line}; paired per round {med:.2f} [95% CI {lo:.2f}-{hi:.2f}]{note}"


def ratios(rows: list[Any]) -> list[str]:
    """The issue's throughput targets, each as a measured ratio with PASS/FAIL, and
    informational comparisons with the ZeroMQ baselines."""
    out = []
    zmq = ("zmq-pickle", "zmq-zerocopy")
    for (hidden, tokens), by in sorted(_index(rows).items()):
        mib = next(iter(by.values())).bytes / MIB
        tag = f"H={hidden} n={tokens} ({mib:.0f} MiB)"
        if {"mooncake", "raw-mooncake"} <= by.keys() and mib >= 16:
            out.append(_compare(tag, by["mooncake"], by["raw-mooncake"], RAW_MOONCAKE))
        if {"shm", "copy"} <= by.keys() and mib == 16:
            out.append(_compare(tag, by["shm"], by["copy"], SHM_COPY))
        best_zmq = max((by[z].gbps_median for z in zmq if z in by), default=None)
        for ours, label in (("shm", "shm"), ("mooncake", "mooncake(tcp)")):
            if ours in by and best_zmq:
                r = by[ours].gbps_median / best_zmq
                out.append(f"{tag}: {label} / best zmq = {r:.2f} (informational)")
    return out


def fixed_cost(rows: list[Any]) -> list[str]:
    """The fixed cost per job: a tiny payload end to end through our paths, median and p90 ms
    (``kind == "fixed"`` rows), with the target's PASS/FAIL; baselines are informational."""
    fixed = [r for r in rows if getattr(r, "kind", "") == "fixed"]
    if not fixed:
        return []
    r0 = fixed[0]
    out = [f"fixed cost per job (H={r0.hidden} x {r0.tokens} token, {r0.bytes} B, bf16):"]
    for r in fixed:
        line = (f"fixed cost per job: {r.backend} median {r.ms_median:.3f} ms, "
                f"p90 {r.ms_p90:.3f} ms ({r.reps} rounds)")  # fmt: skip
        if r.backend in ("mooncake", "shm"):
            line += f" (target median <= {FIXED_MS:g} ms) {_ok(r.ms_median <= FIXED_MS)}"
        else:
            line += " (informational)"
        out.append(line)
    return out


def _ok(cond: bool) -> str:
    return "PASS" if cond else "FAIL"


def plot(rows: list[Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _throughput(rows)
    hiddens = sorted({r.hidden for r in rows})
    fig, axes = plt.subplots(1, len(hiddens), figsize=(6 * len(hiddens), 4.5), squeeze=False)
    for ax, hidden in zip(axes[0], hiddens, strict=True):
        for backend in dict.fromkeys(r.backend for r in rows):
            pts = sorted(
                (r.bytes / MIB, r.gbps_median)
                for r in rows
                if r.hidden == hidden and r.backend == backend
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=backend)
        ax.set(xscale="log", yscale="log", xlabel="payload (MiB, bf16)", ylabel="GB/s (median)")
        ax.set_title(f"hidden {hidden}: embeds [n,H] + deepstack [n,3H]")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
