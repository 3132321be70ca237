"""Shared helpers for the root + network-namespace integration tests.

Import the markers and the ``lab`` fixture into a test module (pytest finds fixtures in a
module's namespace)::

    from tests.netns import lab, requires_lab  # noqa: F401  (lab is a fixture)

Determinism rules for tests that use these helpers:

* every lab has a fresh prefix (``jvt`` + 6 hex digits), so parallel runs and leftovers of a
  crashed run never collide, and a test lab is told apart from a user's ``jvlab*``;
* a test's traffic tools write their reports, ready files and stderr into ``tmp_path``, and
  servers are used only after their ready file exists (no "sleep and hope");
* every test body runs under ``trio.fail_after``; every tool has its own timeout as well, so a
  hung process cannot outlive the lab (teardown kills it);
* assertions on real traffic are either causal (nothing can arrive through a dead path) or use
  tolerances many standard deviations wide; never wall-clock durations.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, AsyncIterator, Callable, TypeVar

import attrs
import pytest
import trio

from jvpn_trio.lab.netns import Lab, LabProcess, LabSpec, open_lab
from jvpn_trio.lab.traffic import traffic_argv

requires_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip"),
    reason="needs root and iproute2 to build network namespaces",
)
requires_nft = pytest.mark.skipif(
    shutil.which("nft") is None,
    reason="needs the nft binary for lab faults (apt-get install nftables)",
)

#: How often a test looks for a tool's ready file.
READY_POLL_S = 0.01
#: Prefix family of labs built by tests.
TEST_PREFIX_FAMILY = "jvt"

F = TypeVar("F", bound=Callable[..., Any])


def requires_lab(fn: F) -> F:
    """Mark a test as needing a lab: the ``root`` marker, root + iproute2, and nft."""
    for mark in (pytest.mark.root, requires_root, requires_nft):
        fn = mark(fn)
    return fn


def unique_prefix() -> str:
    """A lab prefix no other test (or run) uses."""
    return TEST_PREFIX_FAMILY + secrets.token_hex(3)


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    """A fresh three-path lab (eth0/wifi0/lte0, metrics 10/20/30), torn down after the test."""
    async with open_lab(LabSpec(prefix=unique_prefix())) as built:
        yield built


async def namespaces() -> list[str]:
    """All network namespace names, via ``ip netns list`` run without blocking the loop."""
    result = await trio.run_process(["ip", "netns", "list"], capture_stdout=True)
    return [line.split()[0] for line in result.stdout.decode().splitlines() if line.strip()]


def read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@attrs.frozen
class Server:
    """A traffic tool started in the background whose ready file has appeared."""

    process: LabProcess
    report: Path
    stderr: Path

    async def finish(self) -> dict[str, Any]:
        """Wait for the tool to stop by itself and return its report."""
        await self.process.wait()
        return read_json(self.report)


async def start_server(
    lab: Lab, ns: str, subcommand: str, listen: str, *args: str, tmp_path: Path, name: str
) -> Server:
    """Start ``jvpn_trio.lab.traffic <subcommand> --listen <listen>`` in ``ns`` and wait until it is ready.

    Fails the test (with the tool's stderr) if the tool exits before it is ready; the caller's
    ``fail_after`` bounds the wait.
    """
    ready, report, stderr = (tmp_path / f"{name}.{ext}" for ext in ("ready", "json", "err"))
    argv = traffic_argv(subcommand, "--listen", listen, "--ready", str(ready), "--report", str(report), *args)
    process = await lab.start_process(ns, argv, stderr_path=stderr)
    while not ready.exists():
        if process.returncode is not None:
            pytest.fail(f"{subcommand} exited {process.returncode} before it was ready: {stderr.read_text()}")
        await trio.sleep(READY_POLL_S)
    return Server(process, report, stderr)


async def run_tool(
    lab: Lab, ns: str, subcommand: str, *args: str, tmp_path: Path, name: str
) -> tuple[int, dict[str, Any]]:
    """Run ``jvpn_trio.lab.traffic <subcommand> ... --report FILE`` in ``ns`` to completion: (exit code, report)."""
    report = tmp_path / f"{name}.json"
    result = await lab.run(ns, *traffic_argv(subcommand, *args, "--report", str(report)), check=False)
    assert report.exists(), f"{subcommand} wrote no report: {result.stderr.decode()}"
    return result.returncode, read_json(report)
