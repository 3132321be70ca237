"""A multi-homed gateway, listening on the wildcards, answers from whichever address a client reached (root).

Real ``jvpn-trio serve`` (``listen = ["0.0.0.0:P", "[::]:P"]``) and ``jvpn-trio up`` processes
in a three-path lab.  The gateway namespace has many addresses: its service address on lo
(``lab.gateway_address``, ``lab.gateway_address6``) and one per path link.  The same client
is configured, in turn, with three of them:

1. the IPv4 service address on lo;
2. the gateway's address on eth0's link (the "first uplink");
3. the IPv6 service address on lo.

Each time the session attaches with all three paths HEALTHY (every path's probes are answered,
so every reply came from the address the client sent to: the client drops any other source,
and counts it as ``stray_source``, which must stay absent), and a UDP echo through the tunnel
answers.  Before the first run the test checks that the setup can fail: routing would answer
the client's eth0 address from the link address, not the service address, and answer the
wifi0 client from the wifi0 link address, not the eth0 one (docs/platform-notes.md,
"Multi-homed gateways").

Determinism rules: every wait is bounded (fail_after) and polls a real condition (status,
ready files); assertions are causal (which replies the client accepted), never durations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from jvpn_trio.lab.netns import Lab
from jvpn_trio.lab.processes import (
    GATEWAY_TUNNEL,
    PORT,
    Tunnel,
    TunnelOptions,
    start_tunnel,
)
from tests.netns import lab, requires_lab, run_tool, start_server  # noqa: F401  (lab is a fixture)

PHYSICAL = ("eth0", "wifi0", "lte0")
#: The gateway listens on both wildcards (IPV6_V6ONLY keeps them apart).
WILDCARDS = ("0.0.0.0", "::")


def endpoint(host: str) -> str:
    return f"[{host}]:{PORT}" if ":" in host else f"{host}:{PORT}"


def all_paths_healthy(status: dict[str, Any]) -> bool:
    paths = status.get("paths") or []
    return status.get("state") == "ATTACHED" and sum(1 for p in paths if p.get("verdict") == "HEALTHY") == len(PHYSICAL)


async def source_for(lab: Lab, destination: str) -> str:  # noqa: F811
    """The source address the gateway namespace's routing picks to reach ``destination``."""
    done = await lab.run(lab.gateway_ns, "ip", "-j", "route", "get", destination)
    (route,) = json.loads(done.stdout)
    return str(route["prefsrc"])


async def reconnect(tunnel: Tunnel, host: str, name: str) -> None:
    """Stop the client, point its config at the gateway's ``host``, and start it again (stderr: ``name``.err)."""
    await tunnel.client.terminate()
    config = tunnel.directory / "client.toml"
    lines = [
        f'gateway = "{endpoint(host)}"' if line.startswith("gateway = ") else line
        for line in config.read_text().splitlines()
    ]
    config.write_text("\n".join(lines) + "\n")
    tunnel.client_socket.unlink(missing_ok=True)
    tunnel.client = await tunnel.lab.start_process(
        tunnel.lab.client_ns, list(tunnel.client.argv), stderr_path=tunnel.directory / f"{name}.err"
    )


async def attached_and_carrying(tunnel: Tunnel, lab: Lab, tmp_path: Path, name: str) -> dict[str, Any]:  # noqa: F811
    """Wait until every path is healthy; then a UDP echo through the tunnel: (status, echo report)."""
    status = await tunnel.wait_status(all_paths_healthy)
    code, echo = await run_tool(
        lab, lab.client_ns, "udp-ping", "--connect", f"{GATEWAY_TUNNEL}:5003", "--count", "3",
        tmp_path=tmp_path, name=name,
    )  # fmt: skip
    assert code == 0, echo
    return {"status": status, "echo": echo}


@requires_lab
async def test_one_gateway_reached_at_three_addresses(lab: Lab, tmp_path: Path) -> None:  # noqa: F811
    service, service6 = lab.gateway_address, lab.gateway_address6
    eth0_client, eth0_link = lab.path_addresses("eth0")
    wifi0_client, _ = lab.path_addresses("wifi0")
    options = TunnelOptions(gateway_host=service, listen=WILDCARDS, routes=("0.0.0.0/0",))
    runs: dict[str, dict[str, Any]] = {}
    with trio.fail_after(150):
        # The setup can fail: routing alone would answer from other addresses than the ones reached.
        routed_sources = (await source_for(lab, eth0_client), await source_for(lab, wifi0_client))
        tunnel = await start_tunnel(lab, tmp_path, policy={}, options=options)
        await start_server(lab, lab.gateway_ns, "udp-echo", f"{GATEWAY_TUNNEL}:5003", tmp_path=tmp_path, name="echo")
        runs[service] = await attached_and_carrying(tunnel, lab, tmp_path, "via-service")
        for number, host in enumerate((eth0_link, service6), start=2):
            await reconnect(tunnel, host, f"client-{number}")
            runs[host] = await attached_and_carrying(tunnel, lab, tmp_path, f"ping-{number}")
        gateway = await tunnel.gateway_status()
        client_code, gateway_code = await tunnel.stop()

    assert routed_sources[0] == eth0_link != service, routed_sources
    assert routed_sources[1] != eth0_link, routed_sources
    for host, run in runs.items():
        status = run["status"]
        assert str(status["binding"]).endswith(f"@{endpoint(host)}"), (host, status)
        assert "stray_source" not in status.get("counters", {}), (host, status["counters"])
        assert run["echo"]["replies"] >= 1, (host, run["echo"])
    (session,) = gateway["sessions"]  # the last client's; each reconnect replaced the one before
    assert session["state"] == "ATTACHED", session
    assert (client_code, gateway_code) == (0, 0)
    for err in tmp_path.glob("*.err"):
        assert "Traceback" not in err.read_text(errors="replace"), err
