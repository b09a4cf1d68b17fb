"""``epd-bench-peer``: the four systems side by side on the tiny model, and its token check."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import pytest

from benchmarks.peer import SYSTEMS
from benchmarks.peer_report import check_tokens
from epd.cluster import script

POINT = "max_tokens=4 concurrency=2"


def _result(system: str, token_ids: list[list[int]]) -> dict:
    rows = [{"status": 200, "token_ids": ids, "text": str(ids)} for ids in token_ids]
    return {"system": system, "points": [{"max_tokens": 2, "concurrency": 1, "rows": rows}]}


def test_token_check_names_a_system_that_answers_differently():
    same = check_tokens([_result("a", [[1, 2], [1, 2]]), _result("b", [[1, 2]])])
    assert same["mismatches"] == [] and same["compared"] == "token_ids"
    across = check_tokens([_result("a", [[1, 2]]), _result("b", [[1, 3]])])
    assert len(across["mismatches"]) == 1 and "disagree" in across["mismatches"][0]
    within = check_tokens([_result("a", [[1, 2], [1, 3]]), _result("b", [[1, 2]])])
    assert any(m.startswith("a at max_tokens 2") for m in within["mismatches"])


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("sglang") is None,
    reason="SGLang is not installed: bash scripts/setup_sglang.sh",
)
def test_all_four_systems_answer_with_the_same_tokens(tiny_model_dir, tmp_path):
    out = tmp_path / "peer.json"
    cmd = script("epd-bench-peer") + [
        "--model", str(tiny_model_dir), "--requests", "3", "--rounds", "1", "--max-tokens", "4",
        "--concurrency", "2", "--warmup", "1", "--idle-probe", "0", "--client", "issue20",
        "--log-dir", str(tmp_path / "logs"), "--json", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    data = json.loads(out.read_text())

    assert data["failures"] == []
    tokens = data["tokens"]
    assert tokens["mismatches"] == [] and tokens["compared"] == "token_ids"
    answers = tokens["outputs"]["4"]
    assert set(answers) == set(SYSTEMS)
    assert len({key for per_system in answers.values() for key in per_system}) == 1
    assert all(len(json.loads(next(iter(a)))) == 4 for a in answers.values())  # 4 token ids

    for system in SYSTEMS:
        s = data["summary"][system][POINT]
        assert s["ok"] == 3 and s["errors"] == {}, (system, s)
        assert s["throughput_rps"] > 0 and s["phases"]["latency"]["median_ms"] > 0
    for system in ("ours-sglang", "ours-ref"):  # the servers' own phases came back
        assert data["summary"][system][POINT]["phases"]["ttft"]["median_ms"] > 0

    commands = {r["system"]: r["commands"] for r in data["results"]}
    split = commands["sglang-split"]
    assert "--encoder-only" in split["encoder"] and "--language-only" in split["language"]
    for cmd in [*split.values(), commands["sglang-mono"]["server"]]:
        assert "--disable-radix-cache" in cmd and "torch_native" in cmd
    ours = commands["ours-sglang"]["language"]
    assert json.loads(ours[ours.index("--sglang-args") + 1])["disable_radix_cache"] is True
    assert data["config"]["env"]["SGLANG_VLM_CACHE_SIZE_MB"] == "0"

    verdicts = {(r["ours"], r["theirs"]): r["verdict"] for r in data["ratios"]}
    assert verdicts[("ours-sglang", "sglang-split")] in ("PASS", "FAIL")
    assert verdicts[("ours-sglang", "sglang-mono")] is None  # its target is at max_tokens 32
    assert "| ours-sglang / sglang-split |" in proc.stdout
