"""Two real gateways, one client with ``[[gateway]]`` entries: gateway A killed, the client comes back through B.

Real ``jvpn-trio serve`` (twice, in the lab's gateway namespace: A on PORT, B on
PORT + 10 with its own key, TUN and tunnel subnet) and ``jvpn-trio up`` listing A
then B.  A is killed with SIGKILL; the client's rescue round to A goes unanswered,
so its next round goes to B: a new session (a fresh handshake, docs/cluster.md),
whose BIRTH names the old one.

Both ``serve`` processes own the same nft table name (``inet jvpn_trio_gw``), so B's
start replaces A's forwarding table: this test checks sessions, not forwarding.
Determinism rules: every wait is bounded and polls the client's status; the
measured wall-clock figure is printed, not asserted beyond the bound.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import trio

from jvpn_trio.keyfile import generate_private_key_text, public_from_private_text, write_private_key
from jvpn_trio.lab.netns import Lab
from jvpn_trio.lab.processes import (
    CLIENT_TUNNEL,
    PORT,
    Tunnel,
    TunnelOptions,
    _wait_for_file,
    guard_tunnel,
    write_configs,
)
from tests.netns import lab, requires_lab  # noqa: F401  (lab is a fixture)

#: Gateway B: its own port, TUN, tunnel subnet and node id beside A's in the one gateway namespace.
PORT_B = PORT + 10
TUN_B = "jvgwb0"
TUNNEL_B = "10.67.0.1/24"
CLIENT_TUNNEL_B = "10.67.0.2"
#: Bound on the whole test: the lab, three processes, the failover and its waits.
TEST_BOUND_S = 90.0
#: From A's death to an attached session at B: recovery window, one rescue round, the back-off,
#: one handshake (the laptop default policy), with room for a loaded CI machine.
FAILOVER_BOUND_S = 30.0


def _multi_gateway_configs(directory: Path, lab: Lab) -> None:
    """The lab's configs, plus gateway B's, and the client's single gateway turned into two ``[[gateway]]`` entries."""
    write_configs(directory, lab, policy={}, options=TunnelOptions(kill_switch=True))  # B must be let out too
    gateway_a = (directory / "gateway.toml").read_text()
    client = (directory / "client.toml").read_text()
    key_b = generate_private_key_text(os.urandom)
    write_private_key(directory / "gateway-b.key", key_b)
    host = lab.gateway_address
    gateway_b = (
        gateway_a.replace('private_key_file = "gateway.key"', 'private_key_file = "gateway-b.key"')
        .replace(f'"{host}:{PORT}"', f'"{host}:{PORT_B}"')
        .replace('tun_name = "jvgw0"', f'tun_name = "{TUN_B}"')
        .replace('tunnel_address = "10.66.0.1/24"', f'tunnel_address = "{TUNNEL_B}"')
        .replace("gateway-events.jsonl", "gateway-b-events.jsonl")
        .replace(str(directory / "gateway.sock"), str(directory / "gateway-b.sock"))
        .replace(f'address = "{CLIENT_TUNNEL}"', f'address = "{CLIENT_TUNNEL_B}"')
        .replace('node_id = "gw-lab"', 'node_id = "gw-lab-b"')
    )
    assert gateway_b.count("gateway-b") == 3 and f":{PORT_B}" in gateway_b and TUN_B in gateway_b
    (directory / "gateway-b.toml").write_text(gateway_b)
    lines = client.splitlines(keepends=True)
    key_a = next(line for line in lines if line.startswith("gateway_public_key"))
    single = next(line for line in lines if line.startswith("gateway = "))
    client = client.replace(key_a, "").replace(single, "")
    entries = (
        f'[[gateway]]\nendpoint = "{host}:{PORT}"\npublic_key = {key_a.split("=", 1)[1].strip()}\n\n'
        f'[[gateway]]\nendpoint = "{host}:{PORT_B}"\npublic_key = "{public_from_private_text(key_b)}"\n\n'
    )
    (directory / "client.toml").write_text(client.replace("[[path]]", entries + "[[path]]", 1))


@requires_lab
async def test_gateway_a_killed_the_client_comes_back_through_b(lab: Lab, tmp_path: Path) -> None:  # noqa: F811
    with trio.fail_after(TEST_BOUND_S):
        await trio.to_thread.run_sync(_multi_gateway_configs, tmp_path, lab)
        await guard_tunnel(lab)

        def argv(command: str, side: str) -> tuple[str, ...]:
            return (sys.executable, "-m", "jvpn_trio", command, "--config", str(tmp_path / f"{side}.toml"), "--quiet")

        gateway_a = await lab.start_process(lab.gateway_ns, argv("serve", "gateway"), stderr_path=tmp_path / "gateway.err")
        await _wait_for_file(tmp_path / "gateway.sock", gateway_a, "gateway", tmp_path / "gateway.err")
        gateway_b = await lab.start_process(
            lab.gateway_ns, argv("serve", "gateway-b"), stderr_path=tmp_path / "gateway-b.err"
        )
        await _wait_for_file(tmp_path / "gateway-b.sock", gateway_b, "gateway B", tmp_path / "gateway-b.err")
        client = await lab.start_process(lab.client_ns, argv("up", "client"), stderr_path=tmp_path / "client.err")
        tunnel = Tunnel(directory=tmp_path, gateway=gateway_a, client=client, lab=lab, gateway_argv=argv("serve", "gateway"))

        first = await tunnel.wait_attached()
        assert first["gateway"] == f"{lab.gateway_address}:{PORT}"
        await tunnel.kill_gateway()
        killed_at = time.monotonic()
        tunnel.gateway = gateway_b  # the gateway that must stay alive from here (check_alive watches it)
        with trio.fail_after(FAILOVER_BOUND_S):
            second = await tunnel.wait_status(lambda s: s.get("sessions_started") == 2 and s.get("state") == "ATTACHED")
        failover_s = time.monotonic() - killed_at
        assert second["gateway"] == f"{lab.gateway_address}:{PORT_B}"
        assert second["session"] != first["session"]
        assert second.get("tunnel_address", "").startswith(CLIENT_TUNNEL_B)

        client_code, gateway_b_code = await tunnel.stop()
        assert (client_code, gateway_b_code) == (0, 0)
        births = [
            e for e in tunnel.events("client") if e.detail("to_state") == "BIRTH" and e.session == second["session"]
        ]  # fmt: skip
        assert births and births[0].detail("previous_session") == first["session"]
        stderr = (tmp_path / "client.err").read_text()
        assert "Traceback" not in stderr, stderr
        assert f"next handshakes go to {lab.gateway_address}:{PORT_B}" in stderr
    print(f"gateway A killed -> session attached at B: {failover_s:.3f} s")
