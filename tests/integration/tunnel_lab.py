"""Running real gateway and client processes in a lab: configs, start-up, status, event logs.

Shared by the runtime's namespace tests (and usable by the lab command): it
writes keys and TOML files into a directory, starts ``jvpn-trio serve`` in
the gateway namespace and ``jvpn-trio up`` in the client namespace, and
reads back what they logged.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import attrs
import trio

from jvpn_trio.core.actions import EmitEvent
from jvpn_trio.drivers.control import ControlError, query_control
from jvpn_trio.keyfile import generate_private_key_text, public_from_private_text, write_private_key
from jvpn_trio.labnet import Lab, LabProcess

GATEWAY_TUNNEL = "10.66.0.1"
CLIENT_TUNNEL = "10.66.0.2"
PORT = 51820
STATUS_POLL_S = 0.05


@attrs.frozen
class Tunnel:
    directory: Path
    gateway: LabProcess
    client: LabProcess

    @property
    def client_socket(self) -> Path:
        return self.directory / "client.sock"

    @property
    def gateway_socket(self) -> Path:
        return self.directory / "gateway.sock"

    async def client_status(self) -> dict[str, Any]:
        return await query_control(self.client_socket, {"cmd": "status"}, timeout=2.0)

    async def gateway_status(self) -> dict[str, Any]:
        return await query_control(self.gateway_socket, {"cmd": "status"}, timeout=2.0)

    async def wait_attached(self) -> dict[str, Any]:
        """Poll the client's control socket until its session is ATTACHED (caller bounds the time)."""
        while True:
            for proc, name in ((self.client, "client"), (self.gateway, "gateway")):
                if proc.returncode is not None:
                    err = (self.directory / f"{name}.err").read_text()
                    raise RuntimeError(f"{name} exited {proc.returncode}: {err}")
            try:
                status = await self.client_status()
                if status.get("state") == "ATTACHED":
                    return status
            except ControlError:
                pass
            await trio.sleep(STATUS_POLL_S)

    def events(self, side: str) -> list[EmitEvent]:
        path = self.directory / f"{side}-events.jsonl"
        return [EmitEvent.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line]

    def trace(self, side: str) -> Path:
        return self.directory / f"{side}.trace.jsonl"


def write_configs(directory: Path, lab: Lab, *, policy: dict[str, Any]) -> None:
    gateway_key = generate_private_key_text(os.urandom)
    client_key = generate_private_key_text(os.urandom)
    write_private_key(directory / "gateway.key", gateway_key)
    write_private_key(directory / "client.key", client_key)
    policy_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in policy.items())
    (directory / "gateway.toml").write_text(
        f"""[gateway]
private_key_file = "gateway.key"
listen = ["{lab.gateway_address}:{PORT}"]
tun_name = "jvgw0"
tunnel_address = "{GATEWAY_TUNNEL}/24"
events_file = "gateway-events.jsonl"
control_socket = "{directory / 'gateway.sock'}"
node_id = "gw-lab"

[[peer]]
name = "laptop"
public_key = "{public_from_private_text(client_key)}"
address = "{CLIENT_TUNNEL}"

[policy]
{policy_lines}
"""
    )
    paths = "\n".join(
        f'[[path]]\ninterface = "{p.name}"\nkind = "{p.kind}"\npriority = {p.metric}\n' for p in lab.paths
    )
    (directory / "client.toml").write_text(
        f"""[client]
private_key_file = "client.key"
gateway_public_key = "{public_from_private_text(gateway_key)}"
gateway = "{lab.gateway_address}:{PORT}"
tun_name = "jvcl0"
routes = ["0.0.0.0/0"]
events_file = "client-events.jsonl"
control_socket = "{directory / 'client.sock'}"

{paths}
[policy]
{policy_lines}
"""
    )


async def start_tunnel(lab: Lab, directory: Path, *, policy: dict[str, Any]) -> Tunnel:
    """Start the gateway, then the client, each recording its trace; return once both run."""
    write_configs(directory, lab, policy=policy)
    py = sys.executable
    gateway = await lab.start_process(
        lab.gateway_ns,
        [py, "-m", "jvpn_trio", "serve", "--config", str(directory / "gateway.toml"), "--quiet",
         "--record", str(directory / "gateway.trace.jsonl")],
        stderr_path=directory / "gateway.err",
    )
    while not (directory / "gateway.sock").exists():
        if gateway.returncode is not None:
            raise RuntimeError(f"gateway exited {gateway.returncode}: {(directory / 'gateway.err').read_text()}")
        await trio.sleep(STATUS_POLL_S)
    client = await lab.start_process(
        lab.client_ns,
        [py, "-m", "jvpn_trio", "up", "--config", str(directory / "client.toml"), "--quiet",
         "--record", str(directory / "client.trace.jsonl")],
        stderr_path=directory / "client.err",
    )
    return Tunnel(directory, gateway, client)
