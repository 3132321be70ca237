"""The namespace lab: its address plan, reachability per path, each fault, and teardown.

Spec validation tests are pure; everything else needs root, iproute2 and nft (see
``tests/netns.py`` for the determinism rules).  Reachability is checked with the lab's own
``udp-echo`` / ``udp-ping`` tools pinned to one device (SO_BINDTODEVICE), so no ping binary is
needed; "a direction is dead" is checked with one-way probe streams, which cannot be fooled by
the other direction.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from jvpn_trio.lab.netns import (
    DEFAULT_PATHS,
    Lab,
    LabError,
    LabPath,
    LabSpec,
    PathFaults,
    destroy_stale,
    open_lab,
)
from tests.netns import READY_POLL_S, lab, namespaces, requires_lab, run_tool, start_server, unique_prefix  # noqa: F401

ECHO_PORT = "7000"
PROBE_PORT = 7001
TEST_TIMEOUT_S = 20


# -----------------------------------------------------------------------------
# LabSpec (pure)
# -----------------------------------------------------------------------------


def test_default_spec_matches_the_measured_lab() -> None:
    spec = LabSpec(prefix="jvlabtest")
    assert [(p.name, p.kind, p.metric) for p in spec.paths] == [
        ("eth0", "ethernet", 10),
        ("wifi0", "wifi", 20),
        ("lte0", "lte", 30),
    ]
    assert spec.gateway_address == "10.99.0.1"
    assert [spec.link_addresses(p) for p in spec.paths] == [
        ("10.77.1.2", "10.77.1.1"),
        ("10.77.2.2", "10.77.2.1"),
        ("10.77.3.2", "10.77.3.1"),
    ]


def test_fresh_prefixes_differ() -> None:
    assert LabSpec().prefix.startswith("jvlab")
    assert len({LabSpec().prefix for _ in range(20)}) > 1


@pytest.mark.parametrize(
    "changes",
    [
        {"prefix": ""},
        {"prefix": "Upper"},
        {"prefix": "x" * 30},
        {"paths": ()},
        {"paths": (DEFAULT_PATHS[0], attrs.evolve(DEFAULT_PATHS[1], name="eth0"))},
        {"paths": (DEFAULT_PATHS[0], attrs.evolve(DEFAULT_PATHS[1], metric=10))},
        {"paths": (DEFAULT_PATHS[0], attrs.evolve(DEFAULT_PATHS[1], index=1))},
        {"gateway_address": "10.77.9.9"},
        {"gateway_address": "not-an-address"},
        {"link_octet": 256},
    ],
)
def test_spec_rejects(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        LabSpec(**{"prefix": "jvlabtest", **changes})


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "a-very-long-name"},
        {"name": "eth 0"},
        {"kind": "satellite"},
        {"metric": 0},
        {"index": 255},
        {"index": True},
    ],
)
def test_path_rejects(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        LabPath(**{"name": "eth0", "kind": "ethernet", "metric": 10, "index": 1, **fields})


# -----------------------------------------------------------------------------
# A built lab
# -----------------------------------------------------------------------------


async def _json(lab: Lab, ns: str, *argv: str) -> Any:
    return json.loads((await lab.run(ns, *argv)).stdout)


async def _default_routes(lab: Lab) -> dict[str, tuple[str, int]]:
    routes = await _json(lab, lab.client_ns, "ip", "-j", "route", "show", "default")
    return {r["dev"]: (r["gateway"], r["metric"]) for r in routes}


async def _start_echo(lab: Lab, tmp_path: Path) -> None:
    await start_server(
        lab, lab.gateway_ns, "udp-echo", f"{lab.gateway_address}:{ECHO_PORT}", "--timeout", "30",
        tmp_path=tmp_path, name="echo",
    )  # fmt: skip


async def _ping(lab: Lab, path: str, tmp_path: Path, name: str) -> tuple[int, dict[str, Any]]:
    return await run_tool(
        lab, lab.client_ns, "udp-ping", "--connect", f"{lab.gateway_address}:{ECHO_PORT}",
        "--device", path, "--count", "3", "--interval", "0.05", "--wait", "1", tmp_path=tmp_path, name=name,
    )  # fmt: skip


async def _one_way(
    lab: Lab, *, src_ns: str, dst_ns: str, dst: str, device: str, count: int, hz: int, tmp_path: Path, name: str
) -> dict[str, Any]:
    """Send ``count`` probes from ``src_ns`` (pinned to ``device``) to ``dst`` in ``dst_ns``; the sink's report."""
    duration = count / hz
    sink = await start_server(
        lab, dst_ns, "udp-probe-sink", f"{dst}:{PROBE_PORT}", "--timeout", str(duration + 1.5),
        tmp_path=tmp_path, name=f"{name}-sink",
    )  # fmt: skip
    code, source = await run_tool(
        lab, src_ns, "udp-probe-source", "--connect", f"{dst}:{PROBE_PORT}", "--hz", str(hz),
        "--duration", str(duration), "--device", device, tmp_path=tmp_path, name=f"{name}-source",
    )  # fmt: skip
    assert code == 0 and source["count"] == count
    return await sink.finish()


@requires_lab
async def test_lab_builds_the_address_plan(lab: Lab) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        links = await _json(lab, lab.client_ns, "ip", "-j", "addr", "show")
        client = {link["ifname"]: link for link in links}
        for path in lab.paths:
            client_ip, _gw_ip = lab.path_addresses(path)
            assert client[path.name]["operstate"] == "UP"
            assert {(a["local"], a["prefixlen"]) for a in client[path.name]["addr_info"] if a["family"] == "inet"} == {
                (client_ip, 24)
            }
        assert await _default_routes(lab) == {
            "eth0": ("10.77.1.1", 10),
            "wifi0": ("10.77.2.1", 20),
            "lte0": ("10.77.3.1", 30),
        }
        gw_links = {link["ifname"]: link for link in await _json(lab, lab.gateway_ns, "ip", "-j", "addr", "show")}
        assert {(a["local"], a["prefixlen"]) for a in gw_links["lo"]["addr_info"] if a["family"] == "inet"} == {
            ("127.0.0.1", 8),
            ("10.99.0.1", 32),
        }
        assert sorted(gw_links) == ["gw-eth0", "gw-lte0", "gw-wifi0", "lo"]
        forward = await lab.run(lab.gateway_ns, "cat", "/proc/sys/net/ipv4/ip_forward")
        assert forward.stdout.strip() == b"1"
        for ns in (lab.client_ns, lab.gateway_ns):
            tables = await lab.run(ns, "nft", "list", "tables")
            assert b"table netdev jvlab" in tables.stdout
        described = lab.describe()
        assert described["client_ns"] == lab.client_ns == f"{lab.spec.prefix}-cli"
        assert described["gateway_ns"] == lab.gateway_ns == f"{lab.spec.prefix}-gw"
        assert [p["client_address"] for p in described["paths"]] == ["10.77.1.2/24", "10.77.2.2/24", "10.77.3.2/24"]


@requires_lab
async def test_every_path_reaches_the_gateway_address(lab: Lab, tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        await _start_echo(lab, tmp_path)
        for path in lab.paths:
            code, report = await _ping(lab, path.name, tmp_path, f"ping-{path.name}")
            assert code == 0, report
            assert report["replies"] == 3


@requires_lab
async def test_link_down_kills_the_path_and_link_up_restores_it(lab: Lab, tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        await _start_echo(lab, tmp_path)
        await lab.link_down("eth0")
        await lab.link_down("eth0")  # idempotent
        assert lab.faults("eth0") == PathFaults(link_up=False)
        assert "eth0" not in await _default_routes(lab)  # the kernel deleted it
        code, report = await _ping(lab, "eth0", tmp_path, "ping-down")
        assert code == 1 and report["replies"] == 0
        code, _report = await _ping(lab, "wifi0", tmp_path, "ping-other")
        assert code == 0  # the other paths are untouched

        await lab.link_up("eth0")
        await lab.link_up("eth0")  # idempotent
        assert lab.faults("eth0") == PathFaults()
        assert (await _default_routes(lab))["eth0"] == ("10.77.1.1", 10)
        code, report = await _ping(lab, "eth0", tmp_path, "ping-up")
        assert code == 0 and report["replies"] == 3


async def _drop_counter(lab: Lab, ns: str, chain: str) -> int:
    """Packets dropped so far by the (single) counted rule in ``chain`` of the lab's nft table."""
    listing = await _json(lab, ns, "nft", "-j", "list", "chain", "netdev", "jvlab", chain)
    counters = [item["rule"]["expr"] for item in listing["nftables"] if "rule" in item]
    (packets,) = [expr["counter"]["packets"] for rule in counters for expr in rule if "counter" in expr]
    return int(packets)


@requires_lab
async def test_blackhole_kills_both_directions_while_the_link_stays_up(lab: Lab, tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        await _start_echo(lab, tmp_path)
        # Resolve ARP on both ends first: with neighbours unresolved, a blackhole at either end
        # would stop both directions (no ARP reply), and the test could not tell the ends apart.
        code, _report = await _ping(lab, "eth0", tmp_path, "ping-before")
        assert code == 0
        await lab.blackhole("eth0", True)
        await lab.blackhole("eth0", True)  # idempotent: still one rule
        assert lab.faults("eth0") == PathFaults(blackhole=True)
        client_ip, _ = lab.path_addresses("eth0")
        for ns, dev in ((lab.client_ns, "eth0"), (lab.gateway_ns, "gw-eth0")):
            (link,) = await _json(lab, ns, "ip", "-j", "link", "show", dev)
            assert link["operstate"] == "UP" and "LOWER_UP" in link["flags"]
        reports: dict[str, dict[str, Any]] = {}

        async def one_way(name: str, src_ns: str, dst_ns: str, dst: str, device: str) -> None:
            reports[name] = await _one_way(
                lab, src_ns=src_ns, dst_ns=dst_ns, dst=dst, device=device, count=30, hz=100,
                tmp_path=tmp_path, name=name,
            )  # fmt: skip

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one_way, "up", lab.client_ns, lab.gateway_ns, lab.gateway_address, "eth0")
            nursery.start_soon(one_way, "down", lab.gateway_ns, lab.client_ns, client_ip, "gw-eth0")
        assert reports["up"]["received"] == 0
        assert reports["down"]["received"] == 0
        # Each end's ingress rule dropped (at least) the probes sent towards it.
        assert await _drop_counter(lab, lab.gateway_ns, "blackhole_eth0") >= 30
        assert await _drop_counter(lab, lab.client_ns, "blackhole_eth0") >= 30

        await lab.blackhole("eth0", False)
        assert lab.faults("eth0") == PathFaults()
        code, report = await _ping(lab, "eth0", tmp_path, "ping-after")
        assert code == 0 and report["replies"] == 3


@requires_lab
async def test_loss_drops_about_the_requested_share(lab: Lab, tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        # Resolve ARP first: ARP crosses the lossy ingress too, and a lost ARP reply is retried
        # only after a second, which would swallow the whole stream.
        await _start_echo(lab, tmp_path)
        code, _report = await _ping(lab, "eth0", tmp_path, "ping-before")
        assert code == 0
        await lab.loss("eth0", 30.0)
        assert lab.faults("eth0") == PathFaults(loss_percent=30.0)
        # One direction only: each end drops 30 % of what it receives.  500 probes at p = 0.3
        # lose 150 on average, with a standard deviation of about 10; accept 75..225.
        report = await _one_way(
            lab, src_ns=lab.client_ns, dst_ns=lab.gateway_ns, dst=lab.gateway_address, device="eth0",
            count=500, hz=1000, tmp_path=tmp_path, name="loss",
        )  # fmt: skip
        assert report["expected"] == 500
        assert 75 <= report["lost"] <= 225, report["lost"]
        assert report["received"] + report["lost"] == 500

        await lab.loss("eth0", None)
        await lab.loss("eth0", None)  # idempotent
        assert lab.faults("eth0") == PathFaults()
        for ns in (lab.client_ns, lab.gateway_ns):
            chain = await lab.run(ns, "nft", "list", "chain", "netdev", "jvlab", "loss_eth0")
            assert b"numgen" not in chain.stdout


@requires_lab
async def test_rate_installs_and_clears_tbf_on_both_ends(lab: Lab) -> None:
    async def qdiscs() -> list[str]:
        out = []
        for ns, dev in ((lab.client_ns, "wifi0"), (lab.gateway_ns, "gw-wifi0")):
            (root,) = [q for q in await _json(lab, ns, "tc", "-j", "qdisc", "show", "dev", dev) if q.get("root")]
            out.append(root["kind"] if root["kind"] != "tbf" else f"tbf {root['options']['rate']}")
        return out

    with trio.fail_after(TEST_TIMEOUT_S):
        await lab.rate("wifi0", 5)
        assert await qdiscs() == ["tbf 625000", "tbf 625000"]  # bytes per second
        await lab.rate("wifi0", 8)
        assert await qdiscs() == ["tbf 1000000", "tbf 1000000"]
        assert lab.faults("wifi0") == PathFaults(rate_mbit=8)
        await lab.rate("wifi0", None)
        await lab.rate("wifi0", None)  # idempotent
        assert await qdiscs() == ["noqueue", "noqueue"]
        assert lab.faults("wifi0") == PathFaults()


@requires_lab
async def test_restore_clears_every_fault(lab: Lab, tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        await _start_echo(lab, tmp_path)
        await lab.blackhole("lte0", True)
        await lab.loss("lte0", 50)
        await lab.rate("lte0", 2)
        await lab.link_down("lte0")
        assert lab.faults("lte0") == PathFaults(link_up=False, blackhole=True, loss_percent=50, rate_mbit=2)
        await lab.restore("lte0")
        assert lab.faults("lte0").clear
        assert (await _default_routes(lab))["lte0"] == ("10.77.3.1", 30)
        code, report = await _ping(lab, "lte0", tmp_path, "ping-restored")
        assert code == 0 and report["replies"] == 3


@requires_lab
async def test_lab_rejects_foreign_namespaces_and_unknown_paths(lab: Lab) -> None:
    with pytest.raises(ValueError):
        await lab.run("some-other-ns", "true")
    with pytest.raises(KeyError):
        await lab.link_down("wlan7")
    with pytest.raises(ValueError):
        await lab.loss("eth0", 120)
    with trio.fail_after(TEST_TIMEOUT_S):
        with pytest.raises(LabError, match="exit 1"):
            await lab.run(lab.client_ns, "false")


# -----------------------------------------------------------------------------
# Teardown
# -----------------------------------------------------------------------------


class _Boom(Exception):
    pass


@requires_lab
async def test_teardown_on_error_kills_processes_and_removes_namespaces() -> None:
    prefix = unique_prefix()
    with trio.fail_after(TEST_TIMEOUT_S):
        with pytest.raises(_Boom):
            async with open_lab(LabSpec(prefix=prefix)) as lab:
                sleeper = await lab.start_process(lab.client_ns, ["sleep", "60"])
                assert set(await namespaces()) >= {f"{prefix}-cli", f"{prefix}-gw"}
                raise _Boom
        assert sleeper.returncode == -signal.SIGTERM
        assert not [ns for ns in await namespaces() if ns.startswith(prefix)]


@requires_lab
async def test_teardown_on_cancellation_kills_even_a_stubborn_process(tmp_path: Path) -> None:
    prefix = unique_prefix()
    ready = tmp_path / "trap-installed"
    with trio.fail_after(TEST_TIMEOUT_S):
        with trio.CancelScope() as scope:
            async with open_lab(LabSpec(prefix=prefix)) as lab:
                # Ignores SIGTERM (inherited through exec), so teardown must fall back to SIGKILL.
                stubborn = await lab.start_process(
                    lab.gateway_ns, ["sh", "-c", f"trap '' TERM; touch {ready}; exec sleep 60"]
                )
                while not ready.exists():
                    await trio.sleep(READY_POLL_S)
                scope.cancel()
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert stubborn.returncode == -signal.SIGKILL
        assert not [ns for ns in await namespaces() if ns.startswith(prefix)]


# Run in a child process: the lab is built, a process started, then the child interrupts itself.
_CTRL_C_SCRIPT = """
import os, signal, sys, trio
from jvpn_trio.lab.netns import LabSpec, open_lab

# Ctrl-C as at a terminal, whatever this process inherited: a shell starts background jobs
# with SIGINT ignored, and then neither Python nor Trio would turn it into KeyboardInterrupt.
signal.signal(signal.SIGINT, signal.default_int_handler)

async def main():
    async with open_lab(LabSpec(prefix=sys.argv[1])) as lab:
        await lab.start_process(lab.client_ns, ["sleep", "60"])
        print("built", flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        await trio.sleep(30)

trio.run(main)
"""


@requires_lab
async def test_teardown_on_keyboard_interrupt() -> None:
    prefix = unique_prefix()
    with trio.fail_after(TEST_TIMEOUT_S):
        result = await trio.run_process(
            [sys.executable, "-c", _CTRL_C_SCRIPT, prefix], capture_stdout=True, capture_stderr=True, check=False
        )
        assert result.stdout == b"built\n", result.stderr
        assert b"KeyboardInterrupt" in result.stderr
        assert not [ns for ns in await namespaces() if ns.startswith(prefix)]


@requires_lab
async def test_keep_leaves_the_lab_and_destroy_stale_removes_it(capsys: pytest.CaptureFixture[str]) -> None:
    prefix = unique_prefix()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_lab(LabSpec(prefix=prefix), keep=True) as lab:
            await lab.start_process(lab.client_ns, ["sleep", "60"])
        assert f"ip netns del {prefix}-cli; ip netns del {prefix}-gw" in capsys.readouterr().err
        assert {f"{prefix}-cli", f"{prefix}-gw"} <= set(await namespaces())
        # A second lab with the same prefix refuses to build and leaves the kept one alone.
        with pytest.raises(LabError, match="destroy_stale"):
            async with open_lab(LabSpec(prefix=prefix)):
                pass  # pragma: no cover
        assert {f"{prefix}-cli", f"{prefix}-gw"} <= set(await namespaces())
        assert sorted(await destroy_stale(prefix)) == [f"{prefix}-cli", f"{prefix}-gw"]
        assert not [ns for ns in await namespaces() if ns.startswith(prefix)]
        assert await destroy_stale(prefix) == []


@requires_lab
async def test_a_failed_build_removes_only_what_it_created() -> None:
    prefix = unique_prefix()
    with trio.fail_after(TEST_TIMEOUT_S):
        await trio.run_process(["ip", "netns", "add", f"{prefix}-gw"])  # in the way of the gateway namespace
        try:
            with pytest.raises(LabError, match=f"{prefix}-gw"):
                async with open_lab(LabSpec(prefix=prefix)):
                    pass  # pragma: no cover
            assert [ns for ns in await namespaces() if ns.startswith(prefix)] == [f"{prefix}-gw"]
        finally:
            assert await destroy_stale(prefix) == [f"{prefix}-gw"]


# -----------------------------------------------------------------------------
# A laptop's network: a strict LAN, interfaces and addresses that change, a gateway that dies
# -----------------------------------------------------------------------------


async def _neighbour_state(lab: Lab, address: str, device: str) -> list[str]:
    """The client's neighbour-table states for ``address`` on ``device`` (``[]``: no entry)."""
    entries = await _json(lab, lab.client_ns, "ip", "-j", "neigh", "show", address, "dev", device)
    return [state for entry in entries for state in entry.get("state", [])]


async def _addresses(lab: Lab, ns: str, device: str) -> set[str]:
    (link,) = await _json(lab, ns, "ip", "-j", "addr", "show", "dev", device)
    return {f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if a["family"] == "inet"}


@requires_lab
@pytest.mark.parametrize("strict", [True, False])
async def test_the_router_answers_arp_only_for_its_own_addresses(strict: bool, tmp_path: Path) -> None:
    """An on-link route to the gateway's loopback address (no next hop) works only on a lax LAN.

    ``strict=False`` is the control: Linux's default answers ARP for any of its addresses on any
    interface, which is what hid missing routes before; the strict lab must not.
    """
    spec = LabSpec(prefix=unique_prefix(), arp_strict=strict)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_lab(spec) as lab:
            assert await lab.arp_ignore("gw-eth0") == (1 if strict else 0)
            assert lab.describe()["arp_strict"] is strict
            await _start_echo(lab, tmp_path)
            code, _report = await _ping(lab, "eth0", tmp_path, "via-next-hop")
            assert code == 0  # the proper route (via 10.77.1.1, an address of gw-eth0) works either way
            await lab.run(lab.client_ns, "ip", "route", "add", f"{lab.gateway_address}/32", "dev", "eth0")
            code, report = await _ping(lab, "eth0", tmp_path, "on-link")
            states = await _neighbour_state(lab, lab.gateway_address, "eth0")
            if strict:
                assert code == 1 and report["replies"] == 0
                assert "REACHABLE" not in states and "STALE" not in states, states
            else:
                assert code == 0 and report["replies"] == 3
                assert "REACHABLE" in states or "STALE" in states or "DELAY" in states, states


@requires_lab
async def test_a_path_absent_at_start_appears_works_vanishes_and_comes_back(tmp_path: Path) -> None:
    spec = LabSpec(prefix=unique_prefix(), absent={"lte0"})
    with trio.fail_after(TEST_TIMEOUT_S * 2):
        async with open_lab(spec) as lab:
            links = {link["ifname"] for link in await _json(lab, lab.client_ns, "ip", "-j", "link", "show")}
            assert "lte0" not in links and not lab.present("lte0")
            assert lab.current_address("lte0") is None and "lte0" not in await _default_routes(lab)
            assert [p["present"] for p in lab.describe()["paths"]] == [True, True, False]
            await _start_echo(lab, tmp_path)
            with pytest.raises(LabError):
                await lab.delete_path("lte0")

            for attempt in ("first", "again"):
                await lab.add_path("lte0")
                assert lab.present("lte0") and [p.name for p in lab.present_paths] == ["eth0", "wifi0", "lte0"]
                assert await _addresses(lab, lab.client_ns, "lte0") == {"10.77.3.2/24"}
                assert (await _default_routes(lab))["lte0"] == ("10.77.3.1", 30)
                assert await lab.arp_ignore("gw-lte0") == 1
                code, report = await _ping(lab, "lte0", tmp_path, f"ping-{attempt}")
                assert code == 0 and report["replies"] == 3
                await lab.blackhole("lte0", True)  # the fault chains came with it
                code, _report = await _ping(lab, "lte0", tmp_path, f"ping-blackholed-{attempt}")
                assert code == 1
                await lab.blackhole("lte0", False)

                await lab.delete_path("lte0")
                assert not lab.present("lte0") and lab.faults("lte0") == PathFaults()
                for ns, device in ((lab.client_ns, "lte0"), (lab.gateway_ns, "gw-lte0")):
                    names = {link["ifname"] for link in await _json(lab, ns, "ip", "-j", "link", "show")}
                    assert device not in names
                assert "lte0" not in await _default_routes(lab)
                code, _report = await _ping(lab, "eth0", tmp_path, f"ping-others-{attempt}")
                assert code == 0
            with pytest.raises(LabError):
                await lab.add_address("lte0")


@requires_lab
async def test_an_address_is_flushed_renewed_and_moved_to_another_subnet(lab: Lab, tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        await _start_echo(lab, tmp_path)
        await lab.flush_address("wifi0")
        assert await _addresses(lab, lab.client_ns, "wifi0") == set() and lab.current_address("wifi0") is None
        assert "wifi0" not in await _default_routes(lab)
        (link,) = await _json(lab, lab.client_ns, "ip", "-j", "link", "show", "wifi0")
        assert link["operstate"] == "UP"  # only the address went
        code, _report = await _ping(lab, "wifi0", tmp_path, "ping-flushed")
        assert code == 1
        with pytest.raises(LabError):
            await lab.flush_address("wifi0")

        assert await lab.add_address("wifi0", host=3) == ("10.77.2.3", "10.77.2.1")
        assert await _addresses(lab, lab.client_ns, "wifi0") == {"10.77.2.3/24"}
        assert (await _default_routes(lab))["wifi0"] == ("10.77.2.1", 20)
        code, _report = await _ping(lab, "wifi0", tmp_path, "ping-renewed")
        assert code == 0

        assert await lab.add_address("wifi0", subnet=1) == ("10.77.66.2", "10.77.66.1")
        assert await _addresses(lab, lab.client_ns, "wifi0") == {"10.77.66.2/24"}  # the old lease is gone
        assert "10.77.66.1/24" in await _addresses(lab, lab.gateway_ns, "gw-wifi0")
        assert (await _default_routes(lab))["wifi0"] == ("10.77.66.1", 20)
        code, _report = await _ping(lab, "wifi0", tmp_path, "ping-moved")
        assert code == 0

        await lab.link_down("wifi0")
        await lab.link_up("wifi0")  # the route comes back via the *current* next hop
        assert (await _default_routes(lab))["wifi0"] == ("10.77.66.1", 20)
        with pytest.raises(LabError):
            await lab.add_address("wifi0", subnet=9)


@requires_lab
async def test_every_path_down_leaves_no_route_and_one_comes_back(lab: Lab, tmp_path: Path) -> None:
    from jvpn_trio.lab.runner import apply_conditions, usable_paths
    from jvpn_trio.lab.scenario import Impairment

    with trio.fail_after(TEST_TIMEOUT_S):
        up, down = Impairment(), Impairment(link_up=False)
        current = {p.name: up for p in lab.paths}
        for path in lab.paths:
            assert await apply_conditions(lab, None, path.name, up, down) == ["link down"]
            current[path.name] = down
        assert await _default_routes(lab) == {} and usable_paths(lab, current) == ()
        await apply_conditions(lab, None, "wifi0", down, up)
        current["wifi0"] = up
        assert set(await _default_routes(lab)) == {"wifi0"} and usable_paths(lab, current) == ("wifi0",)


@requires_lab
async def test_the_gateway_is_killed_and_started_again_from_the_same_config(lab: Lab, tmp_path: Path) -> None:
    """The mechanics only: SIGKILL, the dead process's files moved aside, the same command line again."""
    from jvpn_trio.lab.processes import start_tunnel

    with trio.fail_after(TEST_TIMEOUT_S * 2):
        tunnel = await start_tunnel(lab, tmp_path, policy={})
        first = tunnel.gateway
        before = await tunnel.gateway_status()
        config = (tmp_path / "gateway.toml").read_text()
        run = await tunnel.kill_gateway()
        assert run.exit_code == -signal.SIGKILL and first.returncode == -signal.SIGKILL
        assert run.number == 1 and run.events.name == "gateway-events.1.jsonl" and run.trace.name == "gateway.1.trace.jsonl"
        assert run.trace.exists() and not (tmp_path / "gateway.trace.jsonl").exists()
        assert not tunnel.gateway_socket.exists()
        with pytest.raises(RuntimeError):
            await tunnel.kill_gateway()
        names = await lab.run(lab.gateway_ns, "sh", "-c", f"ls /proc/{first.pid} 2>/dev/null || true")
        assert names.stdout == b""

        second = await tunnel.start_gateway()
        assert second.pid != first.pid and second.argv == first.argv and tunnel.gateway is second
        after = await tunnel.gateway_status()
        assert after.get("node") == before.get("node") or after.keys() == before.keys()
        assert (tmp_path / "gateway.toml").read_text() == config
        with pytest.raises(RuntimeError):
            await tunnel.start_gateway()
        await tunnel.stop()
        assert (tmp_path / "gateway.trace.jsonl").exists()  # the second process recorded afresh
        assert tunnel.killed == [run]
