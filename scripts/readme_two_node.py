#!/usr/bin/env python3
"""Write README.md's "Two GPU nodes" section from deploy/two-node.toml, the one source of the
two-node commands (tests/faults/test_two_hosts.py runs the same steps).

    python scripts/readme_two_node.py          # rewrite the block between the markers
    python scripts/readme_two_node.py --check  # exit 1 (and show a diff) if it is out of date

Only the text between ``<!-- two-node:begin -->`` and ``<!-- two-node:end -->`` changes.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "deploy" / "two-node.toml"
README = ROOT / "README.md"
BEGIN, END = "<!-- two-node:begin -->", "<!-- two-node:end -->"


def load(path: Path = SOURCE) -> dict:
    recipe = tomllib.loads(path.read_text())
    ids = [s["id"] for s in recipe["step"]]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: step ids repeat: {ids}")
    return recipe


def render(recipe: dict) -> str:
    """The block, markers included."""
    lines = [BEGIN, f"<!-- generated from {SOURCE.relative_to(ROOT)} by "
             f"scripts/{Path(__file__).name}: edit that file, then run this script -->",
             recipe["intro"].strip(), "", "```bash"]  # fmt: skip
    for step in recipe["step"]:
        lines += [f"# {step['where']}", step["run"].strip()]
    lines += ["```", "", recipe["outro"].strip(), END]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no {BEGIN} ... {END} block")
    return text[:start] + block + text[end + len(END) :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether it is current")
    args = parser.parse_args(argv)
    text = README.read_text()
    new = replace_block(text, render(load()))
    if new == text:
        return 0
    if args.check:
        diff = difflib.unified_diff(text.splitlines(), new.splitlines(), "README.md",
                                    "README.md (from deploy/two-node.toml)", lineterm="")  # fmt: skip
        print("\n".join(diff))
        print(f"README.md is out of date: run python scripts/{Path(__file__).name}")
        return 1
    README.write_text(new)
    print("README.md: two-node section rewritten from deploy/two-node.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
