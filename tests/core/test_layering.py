"""The core stays sans-IO: no clocks, sockets, randomness, logging or UI imports.

STYLE.md section 1 and 4: a decision must be a pure function of (state,
event, now); an import of any of these modules is the first step away.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

CORE = pathlib.Path(__file__).resolve().parents[2] / "jvpn_trio" / "core"
FORBIDDEN = {"trio", "trio_util", "socket", "time", "os", "random", "secrets", "logging", "rich", "datetime",
             "asyncio", "threading", "subprocess", "jvpn_trio.drivers", "jvpn_trio.ui", "pytun", "pyroute2"}


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


CORE_FILES = sorted(CORE.glob("*.py"))


def test_core_files_found() -> None:
    assert len(CORE_FILES) >= 10


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_core_module_imports_nothing_impure(path: pathlib.Path) -> None:
    bad = {name for name in _imports(path) if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_checker_catches_a_forbidden_import(tmp_path: pathlib.Path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text("import time\nfrom os import urandom\n")
    assert {"time", "os"} <= _imports(sample)
