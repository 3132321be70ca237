"""A gateway, a client and the bare command line import only what they run (issue 16).

Each check starts a fresh interpreter, imports what that process imports before it
runs (the command module, the runtime, the CLI's parser for that command line) and
asserts which packages are *absent* from ``sys.modules``: the live UI (rich and
``jvpn_trio.ui``'s screens), the lab and bench, httpx (only the etcd store needs
it), prometheus_client (only a metrics endpoint) and pyroute2's NDB/IPDB (our
drivers use rtnetlink alone; drivers/netlink.py loads pyroute2 in parts).  The
assertions are structural: which modules, never memory or time, which `jvpn-trio
bench` reports.  A fresh interpreter per check, since this test process has
imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

#: A generous bound on one interpreter start and its imports, so a hung child fails the test instead of hanging it.
CHILD_TIMEOUT_S = 120.0

#: The live terminal UI and everything it draws with.
LIVE_UI = ("rich", "jvpn_trio.ui.app", "jvpn_trio.ui.attached", "jvpn_trio.ui.views", "jvpn_trio.ui.keys")
#: The lab, the bench (and its plots' matplotlib) and the offline tools: never part of a running gateway or client.
LAB = ("jvpn_trio.lab", "jvpn_trio.tools", "matplotlib")
#: Loaded only with ``[cluster] store = "etcd"``.
ETCD = ("httpx", "jvpn_trio.drivers.store_etcd")
#: Loaded only with ``metrics_listen``.
METRICS = ("prometheus_client", "jvpn_trio.drivers.metrics")
#: pyroute2's database layers and the netlink families we never use; its package ``__init__`` imports them all.
PYROUTE2_EXTRAS = ("pyroute2.ndb", "pyroute2.ipdb", "pyroute2.conntrack", "pyroute2.nftables", "pyroute2.plan9")


def modules_after(code: str) -> set[str]:
    """The names in ``sys.modules`` of a fresh interpreter after it ran ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=CHILD_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def loaded(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    """The modules that are one of ``packages`` or inside one of them."""
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


def test_the_gateway_command_imports_no_ui_lab_etcd_or_metrics() -> None:
    modules = modules_after("import jvpn_trio.commands.serve")
    assert "jvpn_trio.commands.serve" in modules  # the probe really imported it
    assert loaded(modules, ("jvpn_trio.ui", *LIVE_UI, *LAB, *ETCD, *METRICS, *PYROUTE2_EXTRAS)) == []


def test_the_gateway_runtime_imports_no_ui_lab_etcd_metrics_or_netlink() -> None:
    modules = modules_after("import jvpn_trio.drivers.gateway")
    assert "jvpn_trio.drivers.gateway" in modules
    assert loaded(modules, ("jvpn_trio.ui", *LIVE_UI, *LAB, *ETCD, *METRICS, "pyroute2")) == []


def test_what_the_gateway_loads_when_it_prints_or_reports_draws_no_live_ui() -> None:
    """``serve`` prints event lines and answers ``status`` with these, imported where it does."""
    modules = modules_after("import jvpn_trio.ui.lines, jvpn_trio.ui.status")
    assert "jvpn_trio.ui.status" in modules
    assert loaded(modules, (*LIVE_UI, *LAB, *ETCD, *METRICS)) == []


def test_the_client_command_imports_no_live_ui_lab_etcd_or_metrics() -> None:
    """``up`` loads the live UI only when it draws it (on a terminal, without ``--no-tui``)."""
    modules = modules_after("import jvpn_trio.commands.up")
    assert "jvpn_trio.commands.up" in modules
    assert loaded(modules, (*LIVE_UI, *LAB, *ETCD, *METRICS, *PYROUTE2_EXTRAS)) == []


@pytest.mark.parametrize("command", ["serve", "up"])
def test_the_command_line_of_a_gateway_or_client_imports_no_lab(command: str) -> None:
    """What ``jvpn-trio serve|up`` imports before it runs: the CLI, its parser for that line, the command."""
    modules = modules_after(
        "import jvpn_trio.cli as cli\n"
        f"cli.parser_for([{command!r}, '--config', 'x.toml']).parse_args([{command!r}, '--config', 'x.toml'])\n"
        f"import jvpn_trio.commands.{command}, jvpn_trio.drivers.clock\n"
    )
    assert loaded(modules, (*LIVE_UI, *LAB, *ETCD, *METRICS, *PYROUTE2_EXTRAS)) == []


def test_help_imports_no_command_driver_ui_or_lab() -> None:
    modules = modules_after(
        "import contextlib, io, jvpn_trio.cli as cli\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    cli.main(['--help'])\n"
    )
    assert "jvpn_trio.cli" in modules
    assert loaded(modules, ("jvpn_trio.commands", "jvpn_trio.drivers", "jvpn_trio.ui", *LIVE_UI, *LAB, "trio")) == []


@pytest.mark.parametrize("command", ["bench", "loadgen", "lab"])
def test_a_lab_command_still_gets_its_own_arguments_and_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The lighter parser leaves a lab command's options to the full one: its ``--help`` is the full parser's."""
    from jvpn_trio import cli

    light = cli.build_parser(lab_arguments=False)
    assert light.parse_known_args([command, "--help"])[0].command == command  # no exit: -h is left for the full parser
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    through_main = capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([command, "--help"])
    assert through_main == capsys.readouterr().out
    assert f"jvpn-trio {command}" in through_main and "--" in through_main.split("options:")[-1]


def test_pyroute2_in_parts_still_offers_the_whole_library_on_demand() -> None:
    """Our drivers load rtnetlink alone; a name only the package ``__init__`` exports still imports."""
    modules = modules_after(
        "import jvpn_trio.drivers.netlink as netlink\n"
        "from pyroute2 import IPRoute, NetlinkError\n"
        "assert NetlinkError is netlink.NetlinkError and IPRoute is netlink.IPRoute\n"
        "import sys; assert 'pyroute2.ndb' not in sys.modules, 'loaded before it was asked for'\n"
        "from pyroute2 import NDB, IPDB\n"
        "import pyroute2; assert pyroute2.NDB is NDB and pyroute2.NetNS is not None and pyroute2.IPRoute is IPRoute\n"
    )
    assert "pyroute2.ndb.main" in modules


def test_the_announcer_loads_netlink_only_when_it_opens() -> None:
    """``serve`` may import drivers/announce.py whether or not ``[cluster].announce_interface`` is set."""
    modules = modules_after("import jvpn_trio.drivers.announce")
    assert "jvpn_trio.drivers.announce" in modules
    assert loaded(modules, ("pyroute2", "jvpn_trio.drivers.netlink", "jvpn_trio.drivers.routes")) == []


def test_the_import_weight_script_measures_every_layer_cumulatively() -> None:
    """``scripts/import_rss.py`` (docs/benchmarks.md, "Memory per process"): each row adds to the one before."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "import_rss.py"
    done = subprocess.run([sys.executable, str(script), "--json"], capture_output=True, text=True, check=False,
                          timeout=CHILD_TIMEOUT_S * 3)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    assert rows[0]["layer"] == "the interpreter alone" and rows[-1]["layer"] == "the serve command"
    modules = [r["modules"] for r in rows]
    assert modules == sorted(modules) and modules[-1] > modules[0]
    assert all(r["VmRSS"] > 0 and r["RssAnon"] + r["RssFile"] <= r["VmRSS"] + 64 for r in rows)
