"""``epd-bench-turns``: two real clusters, cache on and off, a short conversation, its JSON."""

from __future__ import annotations

import json

import pytest

from benchmarks.turns import main

pytestmark = pytest.mark.slow


def test_turns_bench_serves_repeats_from_the_cache_with_the_same_tokens(
    tiny_model_dir, tmp_path, capsys
):
    out = tmp_path / "turns.json"
    rc = main([
        "--model", str(tiny_model_dir), "--log-dir", str(tmp_path / "logs"),
        "--conversations", "2", "--turns", "3", "--fresh", "2", "--max-tokens", "2",
        "--image-size", "96x96", "--json", str(out),
    ])  # fmt: skip
    assert rc == 0  # the same greedy tokens on both clusters
    data = json.loads(out.read_text())
    on, off = data["conversations"]["on"], data["conversations"]["off"]
    assert [t["cached_images"] for c in on for t in c] == [0, 1, 1] * 2  # turns 2+ hit
    assert all(t["cached_images"] == 0 for c in off for t in c)
    assert all(r["cached_images"] == 0 for r in data["fresh"]["on"])  # nothing repeats there
    printed = capsys.readouterr().out
    assert "| turn | TTFT on, median ms |" in printed and "the same on both" in printed
