"""A bounded load test: 64 concurrent clients against 2 encoders and a small pool, one client in
eight sending only hostile bodies."""

from __future__ import annotations

import json

import pytest

from benchmarks.load import main

pytestmark = pytest.mark.slow


def test_64_clients_every_request_accounted_and_pool_full_again(tiny_model_dir, tmp_path):
    out = tmp_path / "load.json"
    code = main(["--model", str(tiny_model_dir), "--clients", "64", "--requests", "128",
                 "--duration", "120", "--num-blocks", "32", "--block-tokens", "16",
                 "--hostile-every", "8", "--json", str(out),
                 "--log-dir", str(tmp_path / "logs")])  # fmt: skip
    summary = json.loads(out.read_text())
    hostile = summary["hostile"]
    assert code == 0
    assert summary["accounted"] == summary["sent"] == 128  # the good requests
    assert hostile["sent"] >= 8, summary  # the 8 hostile clients sent all along
    assert hostile["rejected_4xx"] == hostile["sent"] and not hostile["other"], hostile
    assert summary["completed"] == summary["sent"] and not summary["errors"], summary
    assert 0 < summary["peak_blocks_used"] <= 32
    assert summary["all_blocks_free"]
