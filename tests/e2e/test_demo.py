import subprocess

import pytest

from epd.cluster import script


@pytest.mark.slow
def test_demo_runs_and_matches_transformers(tmp_path):
    proc = subprocess.run(
        script("epd-demo") + ["--model", str(tmp_path / "m"), "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "greedy, 16 tokens, cold and cached): MATCH" in out
    assert "the same image again: 1 of 1 image(s) from the image cache, 0 bytes sent" in out
    assert "blocks free" in out and "visual tokens" in out
    assert (tmp_path / "m" / "config.json").is_file()
