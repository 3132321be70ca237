"""The package's import graph follows its folders: each folder is one layer, arrows point down.

STYLE.md sections 1 and 2, docs/architecture.md: the core is a pure function
of (state, event, now), so it imports nothing impure; drivers carry out what
the core decides; the UI presents; commands wire them; offline tools read
files through the core; the lab and bench harness sits on top and nothing in
the product depends on it.  Every import is checked, including the ones made
inside functions.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jvpn_trio"

#: Modules of the standard library and third parties that would make the core impure.
CORE_FORBIDDEN = {"trio", "trio_util", "socket", "time", "os", "random", "secrets", "logging", "rich", "datetime",
                  "asyncio", "threading", "subprocess", "pytun", "pyroute2", "httpx", "jeepney"}

#: Which layers each layer may import (besides itself).  ``values`` are the file loaders
#: (config, keyfile, errors): files -> frozen, validated values, used by every layer above the core.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "values": {"core"},
    "drivers": {"core", "values"},
    "ui": {"core", "values", "drivers"},
    "commands": {"core", "values", "drivers", "ui"},
    "tools": {"core", "values"},
    "lab": {"core", "values", "drivers", "ui", "tools"},
    "entry": {"core", "values", "drivers", "ui", "commands", "tools", "lab"},
}
VALUES = {"config", "keyfile", "errors"}
ENTRY = {"cli", "__main__", "__init__"}


def layer_of(module: str) -> str:
    """``jvpn_trio.drivers.udp`` -> ``drivers``; raises for a module that belongs to no layer."""
    parts = module.split(".")
    assert parts[0] == "jvpn_trio", module
    if len(parts) == 1:
        return "entry"
    head = parts[1]
    if head in ALLOWED and head not in ("values", "entry"):
        return head
    if head in VALUES:
        return "values"
    if head in ENTRY:
        return "entry"
    raise AssertionError(f"{module} is in no layer: put it in a layer's folder or name it in this test")


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def imports_of(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (the package uses absolute imports only)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names.add("." * node.level + (node.module or ""))
                continue
            module = node.module or ""
            names.add(module)
            # ``from jvpn_trio import lab`` imports the subpackage ``jvpn_trio.lab``.
            if module == "jvpn_trio":
                names.update(f"jvpn_trio.{alias.name}" for alias in node.names)
    return names


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer() -> None:
    assert len(MODULES) > 40
    for path in MODULES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_only_down(path: pathlib.Path) -> None:
    here = layer_of(module_name(path))
    allowed = ALLOWED[here] | {here}
    bad = [name for name in imports_of(path) if name.startswith(".")]  # relative: layer unclear at a glance
    for name in imports_of(path):
        if name == "jvpn_trio" or not name.startswith("jvpn_trio."):
            continue
        if name in ("jvpn_trio.__version__",):
            continue
        target = layer_of(name)
        if target not in allowed:
            bad.append(f"{name} ({target})")
    assert not bad, f"{here} module {module_name(path)} imports {sorted(bad)}"


CORE_FILES = sorted((PACKAGE / "core").glob("*.py"))


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_core_module_imports_nothing_impure(path: pathlib.Path) -> None:
    bad = {n for n in imports_of(path) if any(n == f or n.startswith(f + ".") for f in CORE_FORBIDDEN)}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_checker_catches_each_kind_of_violation(tmp_path: pathlib.Path) -> None:
    """The rules above can fail: a forbidden module, an upward import, a lazy one, a relative one."""
    sample = tmp_path / "bad.py"
    sample.write_text(
        "import time\nfrom os import urandom\n"
        "def later():\n    from jvpn_trio.lab import demo\n"
        "from jvpn_trio import commands\nfrom ..drivers import udp\n"
    )
    found = imports_of(sample)
    assert {"time", "os", "jvpn_trio.lab", "jvpn_trio.commands", "..drivers"} <= found
    assert layer_of("jvpn_trio.lab.demo") == "lab" and "lab" not in ALLOWED["drivers"]
    assert "commands" not in ALLOWED["ui"] and "drivers" not in ALLOWED["tools"]
    with pytest.raises(AssertionError):
        layer_of("jvpn_trio.somewhere_new")


def test_nothing_in_the_product_imports_the_lab() -> None:
    """The field-testing harness may go; the VPN must still import."""
    users = sorted(
        module_name(p)
        for p in MODULES
        if layer_of(module_name(p)) not in ("lab", "entry")
        and any(n == "jvpn_trio.lab" or n.startswith("jvpn_trio.lab.") for n in imports_of(p))
    )
    assert users == []
