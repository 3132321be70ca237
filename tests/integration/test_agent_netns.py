"""The real client agent follows the machine: a path plugged in later, the active one deleted, the gateway killed.

Real ``jvpn-trio serve`` and ``jvpn-trio up`` processes in a lab whose wifi0 and
lte0 interfaces do not exist when ``up`` starts (only eth0 does).  In turn:

1. wifi0 appears 2 s after ``up`` started: the client's status lists it
   (interface and kind) and a probe answer is measured on it;
2. eth0's link goes down and comes back: the session moves to wifi0 and back; while
   the link is down, eth0's rule and the unreachable default of its table stay, so a
   packet with its mark fails closed, and its route to the gateway returns with the link;
3. lte0 is plugged in, its link goes down (its routing stays), then it is deleted: its rule
   and table go with the interface;
4. eth0, the active path, is deleted (``ip link del``): the session moves to
   wifi0, the SessionID stays, the process neither exits nor prints a traceback, and
   eth0's rule and table are gone;
5. the gateway is killed with SIGKILL and started again: a new session
   (``sessions_started`` == 2) is attached within 10 s of its return.

Determinism rules: every wait is bounded (``trio.fail_after``) and polls a
real condition (the client's status over its control socket); the measured
wall-clock figures are printed, and only the 10 s bound of the specification
is asserted on.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from jvpn_trio.commands.up import TUNNEL_TABLE
from jvpn_trio.config import DEFAULT_FWMARK_BASE
from jvpn_trio.lab.netns import Lab, LabSpec, open_lab
from tests.integration.tunnel_lab import STATUS_POLL_S, start_tunnel
from tests.netns import requires_lab, unique_prefix

#: Enough switches per minute for the whole scenario, a quick return to eth0; the rest is the laptop default.
POLICY = {"max_switches_per_minute": 12, "return_dwell_ms": 1000}
#: Each lab path's id is its place in client.toml (eth0 p1, wifi0 p2, lte0 p3): its table and mark follow.
PATH_IDS = {"eth0": 1, "wifi0": 2, "lte0": 3}
#: How long after ``up`` starts the second interface is plugged in.
PLUG_IN_AFTER_S = 2.0
#: How long the gateway stays dead.
GATEWAY_DOWN_S = 2.0
#: The specification's bound: a gateway that came back gets a new session within this.
NEW_SESSION_BOUND_S = 10.0
#: How long eth0's rule and table may outlive its path.
ROUTES_GONE_S = 5.0
#: Bound on the whole test: the lab, both processes, the three events and their waits.
TEST_BOUND_S = 90.0


@pytest.fixture
async def late_lab() -> AsyncIterator[Lab]:
    """The three-path lab with only eth0 built at start; wifi0 and lte0 come later (or never)."""
    async with open_lab(LabSpec(prefix=unique_prefix(), absent=frozenset({"wifi0", "lte0"}))) as built:
        yield built


def mark_of(interface: str) -> int:
    return DEFAULT_FWMARK_BASE + PATH_IDS[interface]


async def routing_of(lab: Lab, interface: str) -> tuple[bool, list[dict[str, Any]]]:
    """Whether the path's fwmark rule is installed, and the routes of its table, in the client namespace."""
    table_id = TUNNEL_TABLE + PATH_IDS[interface]
    rules = json.loads((await lab.run(lab.client_ns, "ip", "-j", "rule", "show")).stdout or b"[]")
    has_rule = any(r.get("table") == str(table_id) and r.get("fwmark") == hex(mark_of(interface)) for r in rules)
    table = await lab.run(lab.client_ns, "ip", "-j", "route", "show", "table", str(table_id), check=False)
    return has_rule, json.loads(table.stdout or b"[]") if table.returncode == 0 else []


async def wait_routing_gone(lab: Lab, interface: str) -> None:
    with trio.fail_after(ROUTES_GONE_S):
        while await routing_of(lab, interface) != (False, []):
            await trio.sleep(STATUS_POLL_S)


def kept(status: dict[str, Any]) -> tuple[int, int]:
    """The follower's counters: paths whose routing was kept at link-down, and of those removed later."""
    counters = status["counters"]
    return counters.get("paths.path_routes_kept", 0), counters.get("paths.path_routes_removed_late", 0)


def path_named(status: dict[str, Any], interface: str) -> dict[str, Any] | None:
    for p in status.get("paths", []):
        if p.get("interface") == interface:
            return dict(p)
    return None


def active_interface(status: dict[str, Any]) -> str | None:
    active = status.get("active_path")
    for p in status.get("paths", []):
        if p["path"] == active:
            return str(p["interface"])
    return None


@requires_lab
async def test_the_agent_follows_interfaces_and_a_gateway_restart(late_lab: Lab, tmp_path: Path) -> None:
    lab = late_lab
    with trio.fail_after(TEST_BOUND_S):
        tunnel = await start_tunnel(lab, tmp_path, policy=POLICY)
        started = time.monotonic()
        first = await tunnel.wait_attached()
        assert active_interface(first) == "eth0" and path_named(first, "wifi0") is None
        session = first["session"]

        # 1. A path plugged in later is used.
        await trio.sleep(max(0.0, started + PLUG_IN_AFTER_S - time.monotonic()))
        await lab.add_path("wifi0")  # returns once the interface is up with its address and route
        usable_at = time.monotonic()
        status = await tunnel.wait_status(
            lambda s: (p := path_named(s, "wifi0")) is not None and p["srtt_ms"] is not None
        )
        first_answer_s = time.monotonic() - usable_at
        wifi = path_named(status, "wifi0")
        assert wifi is not None and wifi["kind"] == "wifi"

        # 2. eth0's link flaps: its routing stays, failing closed, and its route returns with it.
        has_rule, table = await routing_of(lab, "eth0")
        assert has_rule and any(r.get("dst") == lab.gateway_address for r in table), table
        await lab.link_down("eth0")
        down = await tunnel.wait_status(
            lambda s: s.get("state") == "ATTACHED" and active_interface(s) == "wifi0" and path_named(s, "eth0") is None
        )
        assert kept(down) == (1, 0)  # kept by choice, not by timing
        has_rule, table = await routing_of(lab, "eth0")
        assert has_rule and [(r.get("type"), r.get("dst")) for r in table] == [("unreachable", "default")], table
        marked = await lab.run(
            lab.client_ns, "ip", "route", "get", lab.gateway_address, "mark", str(mark_of("eth0")), check=False
        )
        assert marked.returncode != 0 or b"unreachable" in marked.stdout, marked.stdout  # never via another link
        await lab.restore("eth0")
        await tunnel.wait_status(lambda s: active_interface(s) == "eth0")
        has_rule, table = await routing_of(lab, "eth0")
        assert has_rule and any(r.get("dst") == lab.gateway_address for r in table), table

        # 3. A standby whose link went down is then deleted: its kept routing goes with it.
        await lab.add_path("lte0")
        await tunnel.wait_status(lambda s: (p := path_named(s, "lte0")) is not None and p["srtt_ms"] is not None)
        await lab.link_down("lte0")
        await tunnel.wait_status(lambda s: path_named(s, "lte0") is None and kept(s) == (2, 0))
        assert (await routing_of(lab, "lte0"))[0]
        await lab.delete_path("lte0")
        await tunnel.wait_status(lambda s: kept(s) == (2, 1))
        await wait_routing_gone(lab, "lte0")

        # 4. The active path's interface is deleted: the session moves, the process lives, its routing goes.
        deleted_at = time.monotonic()
        await lab.delete_path("eth0")  # the link goes first; the lab then drops its fault chains
        status = await tunnel.wait_status(
            lambda s: s.get("state") == "ATTACHED" and active_interface(s) == "wifi0"
        )
        moved_s = time.monotonic() - deleted_at
        assert status["session"] == session
        gone = await tunnel.wait_status(lambda s: path_named(s, "eth0") is None)
        assert gone["session"] == session
        await wait_routing_gone(lab, "eth0")

        # 5. The gateway is killed and comes back: a new session within the bound.
        await tunnel.kill_gateway()
        await trio.sleep(GATEWAY_DOWN_S)
        await tunnel.start_gateway()
        back_at = time.monotonic()
        with trio.fail_after(NEW_SESSION_BOUND_S):
            status = await tunnel.wait_status(
                lambda s: s.get("sessions_started") == 2 and s.get("state") == "ATTACHED"
            )
        new_session_s = time.monotonic() - back_at
        assert status["session"] != session and active_interface(status) == "wifi0"
        assert tunnel.client.returncode is None

        client_code, _gateway_code = await tunnel.stop()
        assert client_code == 0
        stderr = (tmp_path / "client.err").read_text()
        assert "Traceback" not in stderr, stderr
        assert "path p1 down: eth0" in stderr and "path p2 up: wifi0" in stderr

    print(
        f"wifi0 usable -> first probe answer: {first_answer_s:.3f} s; "
        f"eth0 deleted -> session on wifi0: {moved_s:.3f} s; "
        f"gateway back -> new session attached: {new_session_s:.3f} s"
    )
