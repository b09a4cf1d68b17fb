"""README.md's two-node section is generated from deploy/two-node.toml, the file whose commands
tests/faults/test_two_hosts.py runs: the two must not drift apart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "readme_two_node.py"


def test_readme_two_node_section_is_generated_from_the_recipe():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_recipe_step_appears_in_the_readme_verbatim():
    readme = (ROOT / "README.md").read_text()
    steps = tomllib.loads((ROOT / "deploy" / "two-node.toml").read_text())["step"]
    assert [s["id"] for s in steps] == ["install", "keys", "node-a", "node-b", "client"]
    for step in steps:
        assert step["run"].strip() in readme, step["id"]
