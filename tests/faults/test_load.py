"""A bounded load test: 64 concurrent clients against 2 encoders and a small pool."""

from __future__ import annotations

import json

import pytest

from benchmarks.load import main

pytestmark = pytest.mark.slow


def test_64_clients_every_request_accounted_and_pool_full_again(tiny_model_dir, tmp_path):
    out = tmp_path / "load.json"
    code = main(["--model", str(tiny_model_dir), "--clients", "64", "--requests", "128",
                 "--duration", "120", "--num-blocks", "32", "--block-tokens", "16",
                 "--json", str(out), "--log-dir", str(tmp_path / "logs")])  # fmt: skip
    summary = json.loads(out.read_text())
    assert code == 0
    assert summary["accounted"] == summary["sent"] == 128
    assert summary["completed"] + sum(summary["errors"].values()) == 128
    assert summary["completed"] >= 120, summary  # overload may shed a few, never silently
    assert all(kind.startswith("http_503") for kind in summary["errors"]), summary
    assert 0 < summary["peak_blocks_used"] <= 32
    assert summary["all_blocks_free"]
