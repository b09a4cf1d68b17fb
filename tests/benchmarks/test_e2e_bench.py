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


def test_e2e_bench_video_splits_decode(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "e2e-video.json"
    rc = main([
        "--model", str(tiny_model_dir), "--log-dir", str(tmp_path / "logs"),
        "--video", "1.5", "--requests", "3", "--warmup", "1", "--json", str(out),
    ])  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    rows = data["requests"]
    assert [row["status"] for row in rows] == [200] * 3
    for row in rows:
        # each clip has its own bytes, so no cache serves it: every request decodes its frames
        assert 0 < row["decode_s"] <= row["preprocess_s"], row
        for phase in PHASES:
            assert row[f"{phase}_s"] >= 0, (phase, row)
    phases = data["summary"]["phases"]
    assert set(phases) >= {"decode", *PHASES}
    split = [row["preprocess_s"] - row["decode_s"] for row in rows]
    assert phases["preprocess"]["max_ms"] == pytest.approx(1e3 * max(split))
    video = data["config"]["video"]
    assert video["seconds"] == 1.5 and video["fps"] == 4 and video["frame_size"] == [448, 448]
    assert video["frames"] == 6
    assert video["sampled_frames"] >= 4
    assert data["config"]["visual_tokens"] > 0
    assert data["config"]["visual_tokens"] == rows[0]["visual_tokens"]
    printed = capsys.readouterr().out
    assert "| decode |" in printed
    assert f"{video['sampled_frames']} sampled" in printed
