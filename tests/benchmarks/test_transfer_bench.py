"""``epd-bench-transfer``: two real processes, every backend, the JSON, the plot and the ratios."""

from __future__ import annotations

import json

import pytest

from benchmarks import report
from benchmarks.transfer import BACKENDS, Row, main


def test_transfer_bench_measures_every_backend(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main([
        "--hidden", "64", "--tokens", "16", "256", "--max-reps", "4", "--budget", "0.05",
        "--json", str(out), "--plot", str(png),
    ])  # fmt: skip
    assert rc == 0
    rows = json.loads(out.read_text())
    assert {(r["backend"], r["tokens"]) for r in rows} == {
        (b, n) for b in BACKENDS for n in (16, 256)
    }
    for r in rows:
        assert r["hidden"] == 64 and r["bytes"] == r["tokens"] * 4 * 64 * 2  # bf16, [n, 4H]
        assert 3 <= r["reps"] == len(r["ms_rounds"]) <= 4
        assert r["gbps_median"] > 0 and r["gbps_best"] >= r["gbps_median"]
        assert min(r["ms_rounds"]) <= r["ms_median"] <= max(r["ms_rounds"])
    assert png.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "| H | tokens | MiB | " + " | ".join(BACKENDS) + " |" in printed
    assert "mooncake(tcp) / best zmq" in printed
    assert "target" not in printed  # the targets start at 1 MiB; these are smaller


def _row(backend: str, ms: list[float]) -> Row:
    med = sorted(ms)[len(ms) // 2]
    return Row(backend, 2048, 1024, 16 << 20, len(ms), 1.0 / med, 1.0 / min(ms), med, ms)


def test_paired_ratio_and_its_interval():
    raw = _row("raw-mooncake", [10.0, 20.0, 10.0, 30.0, 10.0])
    ours = _row("mooncake", [12.5, 25.0, 12.5, 37.5, 12.5])  # 0.8x in every round
    med, lo, hi = report.paired(ours, raw)
    assert med == pytest.approx(0.8) and lo == pytest.approx(0.8) and hi == pytest.approx(0.8)
    line = report.ratios([ours, raw])[0]
    assert "FAIL" in line and "paired per round 0.80 [95% CI 0.80-0.80]" in line
    noisy = _row("mooncake", [9.0, 25.0, 11.0, 36.0, 10.5])  # per round 1.11, 0.8, 0.91, ...
    med, lo, hi = report.paired(noisy, raw)
    assert lo < med < hi and lo <= 0.9 <= hi
    assert "(within noise)" in report.ratios([noisy, raw])[0]
