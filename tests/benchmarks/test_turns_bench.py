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
        "--rounds", "2", "--conversations", "2", "--turns", "3", "--fresh", "2", "--max-tokens", "2",
        "--image-size", "96x96", "--json", str(out),
    ])  # fmt: skip
    assert rc == 0  # the same greedy tokens on both clusters
    data = json.loads(out.read_text())
    on, off = data["conversations"]["on"], data["conversations"]["off"]
    assert [t["cached_images"] for c in on for t in c] == [0, 1, 1] * 4  # turns 2+ hit
    assert all(t["cached_images"] == 0 for c in off for t in c)
    encoder = data["conversations"]["encoder"]  # the encoder's cache alone: turns 2+ skip the ViT
    assert [t["timings"]["encoder_cached_images"] for c in encoder for t in c] == [0, 1, 1] * 4
    assert all(t["timings"]["encoder_cached_images"] == 0 for c in off for t in c)
    assert all(r["cached_images"] == 0 for r in data["fresh"]["on"])  # nothing repeats there
    assert [r["round"] for r in data["fresh"]["off"]] == [0, 0, 1, 1]  # new clusters each round
    printed = capsys.readouterr().out
    assert "| turn | TTFT on, median ms |" in printed and "the same everywhere" in printed
    assert "| round 2: 2 requests |" in printed


def test_paired_ratio_interval_is_the_sign_test_interval():
    from benchmarks.turns import paired_ratio, verdict

    on = [1.0 + i / 100 for i in range(40)]  # ratios 1.00 .. 1.39, every pair slower
    ratio, low, high = paired_ratio(on, [1.0] * 40)
    assert ratio == pytest.approx(1.195)
    assert (low, high) == (pytest.approx(1.13), pytest.approx(1.26))  # r_(14), r_(27) of 40
    assert verdict(low, high) == "FAIL (slower)"
    assert verdict(*paired_ratio([1.0, 0.9, 1.1] * 10, [1.0] * 30)[1:]) == "PASS (within noise)"
    assert paired_ratio([2.0, 1.0], [1.0, 1.0])[1:] == (None, None)  # 2 pairs: no 95% interval
