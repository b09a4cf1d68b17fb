"""``epd-bench-e2e`` end to end: a real local cluster, a few requests, the JSON it writes."""

from __future__ import annotations

import json

import pytest

from benchmarks.e2e import PHASES, main

pytestmark = pytest.mark.slow


def test_e2e_bench_writes_timings(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "e2e.json"
    rc = main([
        "--model", str(tiny_model_dir), "--log-dir", str(tmp_path / "logs"),
        "--requests", "4", "--warmup", "1", "--json", str(out),
    ])  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    rows = data["requests"]
    assert len(rows) == 4
    assert data["summary"]["errors"] == {}
    assert data["summary"]["ok"] == 4
    for row in rows:
        assert row["status"] == 200
        for phase in PHASES:
            value = row[f"{phase}_s"]
            assert isinstance(value, (int, float)), (phase, row)
            assert value >= 0, (phase, row)
        assert row["overhead_s"] <= row["ttft_s"]
        assert row["latency_s"] >= row["ttft_s"]
    assert data["config"]["visual_tokens"] == 196
    assert set(data["summary"]["phases"]) >= set(PHASES)
    printed = capsys.readouterr().out
    assert "| overhead (orchestration) |" in printed
    assert "median orchestration overhead:" in printed
