"""Import boundaries: language_server never imports encode_server (and the reverse): they meet only
in protocol/transfer; inside language_server, the arrows between its subpackages run one way
(the rule in language_server/__init__.py and README's package table)."""

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


# What each part of language_server may import of the others (itself always). A new top-level
# module or subpackage needs a line here.
MAY_IMPORT = {
    "cli": {"config", "http", "prompt", "encoders", "engines", "pool"},  # the composition root
    "http": {"config", "prompt", "encoders", "engines", "pool"},
    "encoders": {"config", "pool"},
    "engines": {"config", "pool"},
    "prompt": {"config"},
    "pool": {"config"},
    "config": set(),
    "__init__": set(),
}
ENGINES = ("reference", "sglang")  # engines/<name>/: never import each other


def _role(parts: tuple[str, ...]) -> str:
    """``("language_server", "pool", "receiver")`` -> ``"pool"``; top-level modules by name."""
    return parts[1] if len(parts) > 1 else "__init__"


def _arrows(package: str = "language_server") -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every import inside ``package``, including
    those in functions and ``TYPE_CHECKING`` blocks."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package (level 1)
                    base = ".".join([*parts[: len(parts) - node.level], *base.split(".")]).strip(
                        "."
                    )
                # each imported name too: ``from language_server.engines import reference``
                names = [f"{base}.{alias.name}" for alias in node.names]
            found += [(".".join(parts), n, node.lineno) for n in names
                      if n.split(".")[0] == package]  # fmt: skip
    return found


def _wrong_way(arrows: list[tuple[str, str, int]]) -> list[str]:
    bad = []
    for src, dst, line in arrows:
        s, d = tuple(src.split(".")), tuple(dst.split("."))
        if len(d) == 1:  # the package itself: its docstring only
            continue
        rs, rd = _role(s), _role(d)
        if rs not in MAY_IMPORT or rd not in MAY_IMPORT:
            bad.append(f"{src}:{line} -> {dst}: {rs if rs not in MAY_IMPORT else rd!r} has no rule")
        elif rs != rd and rd not in MAY_IMPORT[rs]:
            bad.append(f"{src}:{line} -> {dst}: {rs} may not import {rd}")
        elif rd == "engines" and rs != "engines" and rs != "cli" and d[2:3] not in ((), ("base",)):
            bad.append(f"{src}:{line} -> {dst}: only engines.base is the engines' contract")
        elif rs == rd == "engines" and len(s) > 3 and len(d) > 3 and s[2] in ENGINES \
                and d[2] in ENGINES and s[2] != d[2]:  # fmt: skip
            bad.append(f"{src}:{line} -> {dst}: engine {s[2]} may not import engine {d[2]}")
    return bad


def test_subpackages_import_one_way():
    arrows = _arrows()
    assert len(arrows) > 40  # the walk found the package's imports
    assert not _wrong_way(arrows), "\n".join(_wrong_way(arrows))


@pytest.mark.parametrize(
    ("arrow", "why"),
    [
        (("language_server.pool.receiver", "language_server.http.service"), "pool may not import http"),
        (("language_server.prompt.builder", "language_server.engines.base"), "prompt may not import engines"),
        (("language_server.config", "language_server.pool.leases"), "config may not import pool"),
        (("language_server.encoders.links", "language_server.engines.base"), "encoders may not import engines"),
        (("language_server.http.service", "language_server.engines.reference.engine"), "only engines.base"),
        (("language_server.engines.sglang.engine", "language_server.engines.reference.model"), "may not import engine"),
        (("language_server.engines.reference.engine", "language_server.cli"), "engines may not import cli"),
        (("language_server.http.app", "language_server.video.frames"), "has no rule"),
    ],
)  # fmt: skip
def test_a_wrong_way_arrow_is_caught(arrow, why):
    (problem,) = _wrong_way([(*arrow, 1)])
    assert why in problem


def test_allowed_arrows_pass():
    assert not _wrong_way([
        ("language_server.http.service", "language_server.engines.base", 1),
        ("language_server.engines.sglang.launch", "language_server.engines.sglang.engine", 1),
        ("language_server.engines.sglang.models.qwen3_moe_deepstack", "language_server.engines.weights", 1),
        ("language_server.encoders.dispatch", "language_server.pool.receiver", 1),
        ("language_server.cli", "language_server.engines.reference.engine", 1),
    ])  # fmt: skip
