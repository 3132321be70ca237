"""DNS goes through the tunnel: a query from the client namespace reaches the tunnel's resolver, never the LAN's.

Real ``jvpn-trio serve`` and ``jvpn-trio up`` in a lab (full tunnel, so the kill
switch is on).  Two lab resolvers (``jvpn_trio/lab/dns_server.py``) run in the
gateway namespace: the *tunnel's* on the gateway's tunnel address (the client
config's ``dns``), and the *LAN's* on the router side of eth0, which the client
namespace's ``/etc/resolv.conf`` names before ``up`` (``ip netns exec``
bind-mounts ``/etc/netns/<ns>/resolv.conf`` over it, as it would be a laptop's
DHCP-given resolver).  While ``up`` runs, a lookup through the resolver
configuration reaches the tunnel's resolver with the client's tunnel address as
the asker, a query sent straight to the LAN resolver is refused by the kill
switch, and the LAN resolver counts nothing; after ``up`` stops, the file is
what it was, byte for byte.

Determinism rules: servers are used only after their ready file exists; every
wait is bounded; the assertions are counts of what each resolver received.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from jvpn_trio.lab.dns_server import dns_server_argv
from jvpn_trio.lab.netns import Lab, LabProcess
from jvpn_trio.lab.processes import CLIENT_TUNNEL, GATEWAY_TUNNEL, TunnelOptions, start_tunnel
from tests.netns import READY_POLL_S, lab, requires_lab  # noqa: F401  (lab is a fixture)

NAME = "intranet.vpn.test"
ANSWER = "10.77.0.7"
TEST_BOUND_S = 60.0
QUERY_TIMEOUT_S = 2.0


@contextlib.contextmanager
def namespace_resolv_conf(ns: str, text: str) -> Iterator[Path]:
    """``/etc/netns/<ns>/resolv.conf`` for the test's namespace only, removed afterwards."""
    directory = Path("/etc/netns") / ns
    directory.mkdir(parents=True, exist_ok=False)
    try:
        path = directory / "resolv.conf"
        path.write_text(text)
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def start_resolver(lab: Lab, listen: str, directory: Path, name: str) -> tuple[LabProcess, Path]:
    report, ready = directory / f"{name}.json", directory / f"{name}.ready"
    process = await lab.start_process(
        lab.gateway_ns,
        dns_server_argv("serve", "--listen", listen, "--answer", f"{NAME}={ANSWER}", "--report", str(report),
                        "--ready", str(ready), "--timeout", f"{TEST_BOUND_S:g}"),
        stderr_path=directory / f"{name}.err",
    )  # fmt: skip
    while not await trio.Path(ready).exists():
        assert process.returncode is None, (directory / f"{name}.err").read_text()
        await trio.sleep(READY_POLL_S)
    return process, report


async def stop_resolver(process: LabProcess, report: Path) -> dict[str, Any]:
    await process.terminate()  # SIGTERM: the tool writes its report
    data: dict[str, Any] = json.loads(report.read_text())
    return data


async def query(lab: Lab, directory: Path, name: str, *server: str) -> dict[str, Any]:
    report = directory / f"{name}.json"
    await lab.run(
        lab.client_ns,
        *dns_server_argv("query", "--name", NAME, "--timeout", f"{QUERY_TIMEOUT_S:g}", "--report", str(report), *server),
        check=False,
    )
    data: dict[str, Any] = json.loads(report.read_text()) if report.exists() else {}
    return data


@requires_lab
async def test_dns_goes_to_the_tunnels_resolver_and_never_to_the_lans(lab: Lab, tmp_path: Path) -> None:  # noqa: F811
    lan_resolver = lab.current_address("eth0")
    assert lan_resolver is not None
    lan = lan_resolver[1]
    original = f"# the LAN's resolver, as DHCP gave it\nnameserver {lan}\n"
    with trio.fail_after(TEST_BOUND_S), namespace_resolv_conf(lab.client_ns, original) as resolv_conf:
        lan_dns, lan_report = await start_resolver(lab, f"{lan}:53", tmp_path, "lan-dns")
        before = await query(lab, tmp_path, "before")  # the control: without the tunnel, the LAN answers
        tunnel = await start_tunnel(lab, tmp_path, policy={}, options=TunnelOptions(dns=(GATEWAY_TUNNEL,)))
        await tunnel.wait_attached()  # the gateway's TUN, and so its tunnel address, exist now
        tunnel_dns, tunnel_report = await start_resolver(lab, f"{GATEWAY_TUNNEL}:53", tmp_path, "tunnel-dns")
        applied = resolv_conf.read_text()
        through = await query(lab, tmp_path, "through-resolv-conf")
        direct = await query(lab, tmp_path, "direct-to-lan", "--server", f"{lan}:53")
        tunnel.check_alive()
        await tunnel.stop()
        after = resolv_conf.read_text()
        tunnel_seen = await stop_resolver(tunnel_dns, tunnel_report)
        lan_seen = await stop_resolver(lan_dns, lan_report)

    assert before.get("addresses") == [ANSWER] and str(before.get("server")).startswith(lan), before
    assert f"nameserver {GATEWAY_TUNNEL}" in applied and f"nameserver {lan}" not in applied, applied
    assert through.get("addresses") == [ANSWER] and str(through.get("server")).startswith(GATEWAY_TUNNEL), through
    assert not direct.get("addresses") and direct.get("error"), direct  # the kill switch: DNS to the LAN does not leave
    assert tunnel_seen["queries"] == 1 and tunnel_seen["askers"] == {CLIENT_TUNNEL: 1}, tunnel_seen
    assert lan_seen["queries"] == 1, lan_seen  # the control before `up`, and nothing else
    assert after == original  # restored byte for byte
