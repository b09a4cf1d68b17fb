"""``epd-bench-transfer``: two real processes, every backend, the JSON, the plot and the ratios."""

from __future__ import annotations

import json

import pytest

from benchmarks import report
from benchmarks.transfer import BACKENDS, FIXED, Row, main


def test_transfer_bench_measures_every_backend(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main([
        "--hidden", "64", "--tokens", "16", "256", "--max-reps", "4", "--budget", "0.05",
        "--fixed-reps", "20", "--json", str(out), "--plot", str(png),
    ])  # fmt: skip
    assert rc == 0
    rows = json.loads(out.read_text())
    throughput = [r for r in rows if r["kind"] == "throughput"]
    fixed = [r for r in rows if r["kind"] == "fixed"]
    assert {(r["backend"], r["tokens"]) for r in throughput} == {
        (b, n) for b in BACKENDS for n in (16, 256)
    }
    assert [r["backend"] for r in fixed] == list(FIXED["backends"])
    for r in rows:
        assert r["bytes"] == r["tokens"] * 4 * r["hidden"] * 2  # bf16, [n, 4H]
        assert r["gbps_median"] > 0 and r["gbps_best"] >= r["gbps_median"]
        assert min(r["ms_rounds"]) <= r["ms_median"] <= r["ms_p90"] <= max(r["ms_rounds"])
    for r in throughput:
        assert r["hidden"] == 64 and 3 <= r["reps"] == len(r["ms_rounds"]) <= 4
    for r in fixed:
        assert (r["hidden"], r["tokens"]) == (64, 1) and 3 <= r["reps"] <= 20
    assert png.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "| H | tokens | MiB | " + " | ".join(BACKENDS) + " |" in printed
    assert "| 64 | 1 |" not in printed  # the fixed cost has its own section
    ratio_lines = [x for x in printed.splitlines() if x.startswith("H=64 n=")]
    assert any("mooncake(tcp) / best zmq" in x for x in ratio_lines)
    assert not any("target" in x for x in ratio_lines)  # throughput targets start at 16 MiB
    for ours in ("mooncake", "shm"):
        line = next(x for x in printed.splitlines() if x.startswith(f"fixed cost per job: {ours} "))
        assert "(target median <= 0.3 ms)" in line and line.endswith(("PASS", "FAIL"))


def test_transfer_bench_fails_on_rows_the_receiver_rejects(monkeypatch):
    """Our path's clock stops only at the language side's verified ``on_ready``: rows that do
    not match the encoder's checksum fail the run instead of being timed."""
    monkeypatch.setattr("encode_server.transfers.rows_checksum", lambda *a, **k: 12345)
    with pytest.raises(RuntimeError, match="do not match the sender's checksum"):
        main(["--hidden", "64", "--tokens", "16", "--backends", "shm", "--max-reps", "3",
              "--fixed-reps", "0"])  # fmt: skip


def _row(backend: str, ms: list[float], kind: str = "throughput") -> Row:
    med = sorted(ms)[len(ms) // 2]
    p90 = sorted(ms)[int(0.9 * (len(ms) - 1))]
    return Row(backend, 2048, 1024, 16 << 20, len(ms), 1.0 / med, 1.0 / min(ms), med, ms, p90,
               kind)  # fmt: skip


def test_paired_ratio_and_its_interval():
    raw = _row("raw-mooncake", [10.0, 20.0, 10.0, 30.0, 10.0])
    ours = _row("mooncake", [12.5, 25.0, 12.5, 37.5, 12.5])  # 0.8x in every round
    med, lo, hi = report.paired(ours, raw)
    assert med == pytest.approx(0.8) and lo == pytest.approx(0.8) and hi == pytest.approx(0.8)
    line = report.ratios([ours, raw])[0]
    assert "(target >= 0.95) FAIL" in line and "paired per round 0.80 [95% CI 0.80-0.80]" in line
    noisy = _row("mooncake", [9.0, 25.0, 11.0, 36.0, 10.5])  # per round 1.11, 0.8, 0.91, ...
    med, lo, hi = report.paired(noisy, raw)
    assert lo < med < hi and lo <= 0.95 <= hi
    assert "(within noise)" in report.ratios([noisy, raw])[0]
    fast = _row("mooncake", [9.9, 19.9, 9.9, 29.9, 9.9])
    assert "(target >= 0.95) PASS" in report.ratios([fast, raw])[0]


def test_fixed_cost_verdict_is_the_median_against_0_3_ms():
    rows = [
        _row("mooncake", [0.25, 0.29, 0.30, 0.31, 0.9], "fixed"),  # median 0.30: PASS
        _row("shm", [0.2, 0.31, 0.32, 0.33, 0.34], "fixed"),  # median 0.32: FAIL
        _row("raw-mooncake", [0.05, 0.06, 0.07], "fixed"),
    ]
    lines = report.fixed_cost(rows)
    assert lines[1].startswith("fixed cost per job: mooncake median 0.300 ms")
    assert lines[1].endswith("(target median <= 0.3 ms) PASS")
    assert lines[2].endswith("FAIL") and lines[3].endswith("(informational)")
    assert report.ratios(rows) == [] and "| 2048 |" not in report.table(rows, ["mooncake"])


def test_a_dead_peer_fails_the_run_instead_of_hanging_it(monkeypatch):
    """The peer process dies at start (``os.abort`` takes no arguments: a TypeError there);
    the bench's next read gives up after its timeout with the peer's exit code."""
    import os

    monkeypatch.setattr("benchmarks.transfer._peer_main", os.abort)
    monkeypatch.setattr("benchmarks.transfer.TIMEOUT_S", 3.0)
    with pytest.raises(RuntimeError, match=r"did not answer within 3 s \(exit code 1"):
        main(["--hidden", "64", "--tokens", "16", "--backends", "shm", "--max-reps", "3",
              "--fixed-reps", "0"])  # fmt: skip
