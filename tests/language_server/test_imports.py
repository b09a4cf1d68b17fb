"""language_server never imports encode_server (and the reverse): they meet only in protocol/transfer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imported_packages(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("language_server", "encode_server"), ("encode_server", "language_server")],
)
def test_servers_do_not_import_each_other(package, forbidden):
    imported = _imported_packages(package)
    assert forbidden not in imported
    assert "epd" not in imported  # epd sits above both


@pytest.mark.slow
@pytest.mark.parametrize(
    ("modules", "forbidden"),
    [
        (
            "language_server.engines.reference.model, language_server.engines.reference.generate",
            "encode_server",
        ),
        ("encode_server.vision", "language_server"),
    ],
)
def test_runtime_imports_stay_on_their_side(modules, forbidden):
    code = (
        f"import sys, {modules}; "
        f"bad = [m for m in sys.modules if m.split('.')[0] == {forbidden!r}]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
