"""Two real clients holding one key against one gateway: the newer takes over, the older says so and holds (root).

The namespaces of tests/integration/test_gateway_peers_netns.py (its :func:`star`); clients 1 and 2
are used, both configured with the *same* private key, which the gateway knows as one peer.

1. Client 1 attaches.  Client 2 starts and attaches: the gateway ends client 1's session with
   ``SESSION_REPLACED`` (not ``PEER_CLOSE``) and client 1 logs TERMINATED ``PEER_CLOSE`` with
   ``peer_reason=SESSION_REPLACED``: the gateway's authenticated CLOSE reached it.  Client 1's
   status says ``REPLACED`` (``held: SESSION_REPLACED``, "replaced by another client with the same key").
2. No flapping: for longer than ``reconnect_max_ms`` (the longest the agent ever waits between
   handshakes) client 1 starts no session, client 2's session is untouched, the gateway has one.
3. ``reconnect`` on client 1's control socket: it takes the session back, and now client 2 is the
   one replaced and held.

Determinism rules: every wait is bounded (``trio.fail_after``) and polls a real condition
(status, event logs); the quiet window is the policy's own bound.  Every process and namespace
is removed on any exit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import trio

from jvpn_trio.core.policy import Policy
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.drivers.control import query_control
from jvpn_trio.keyfile import generate_private_key_text, public_from_private_text, write_private_key
from jvpn_trio.lab.netns import LabProcess
from jvpn_trio.lab.processes import CLIENT_TUN, PORT, STATUS_POLL_S, STATUS_TIMEOUT_S
from tests.integration.test_gateway_peers_netns import (
    GATEWAY_ADDRESS,
    client_status,
    events,
    gateway_toml,
    jvpn,
    star,
    terminated,
    until,
    wait_attached,
)
from tests.netns import requires_lab

#: The two clients (namespaces ``c1`` and ``c2`` of the star) and the one peer they both are.
LAPTOPS = (1, 2)
PEER = "shared"
#: The whole test; the quiet window is the policy's reconnect_max_ms plus this much.
TEST_TIMEOUT_S = 120
QUIET_MARGIN_S = 2.0


def write_configs(directory: Path) -> None:
    """A gateway knowing one peer, and two client configs using that peer's one key."""
    gateway_key = generate_private_key_text(os.urandom)
    write_private_key(directory / "gateway.key", gateway_key)
    shared = generate_private_key_text(os.urandom)
    write_private_key(directory / "shared.key", shared)
    (directory / "peers.d").mkdir()
    (directory / "peers.d" / f"{PEER}.toml").write_text(f'public_key = "{public_from_private_text(shared)}"\n')
    (directory / "gateway.toml").write_text(gateway_toml(directory, extra="nat = false\n"))
    for i in LAPTOPS:
        (directory / f"c{i}.toml").write_text(
            f"""[client]
private_key_file = "shared.key"
gateway_public_key = "{public_from_private_text(gateway_key)}"
gateway = "{GATEWAY_ADDRESS}:{PORT}"
tun_name = "{CLIENT_TUN}"
events_file = "c{i}-events.jsonl"
control_socket = "{directory / f'c{i}.sock'}"

[[path]]
interface = "eth0"
kind = "ethernet"
priority = 10
"""
        )


async def wait_replaced(directory: Path, i: int, process: LabProcess) -> dict[str, Any]:
    """Until client i's status says it was replaced; that status."""
    while True:
        assert process.returncode is None, (directory / f"c{i}.err").read_text()
        status = await client_status(directory, i)
        if status.get("held") == ReasonCode.SESSION_REPLACED.value:
            return status
        await trio.sleep(STATUS_POLL_S)


@requires_lab
async def test_two_laptops_with_one_key_the_older_is_told_and_does_not_flap(tmp_path: Path) -> None:
    directory = tmp_path
    quiet_s = Policy().reconnect_max_ms / 1000.0 + QUIET_MARGIN_S
    with trio.fail_after(TEST_TIMEOUT_S):
        async with star(directory) as s:
            await trio.to_thread.run_sync(write_configs, directory)
            py = sys.executable
            gateway = await s.start(
                s.gateway_ns, [py, "-m", "jvpn_trio", "serve", "--config", str(directory / "gateway.toml"), "--quiet"], name="gateway"
            )
            await until(lambda: (directory / "gateway.sock").exists(), gateway)

            async def up(i: int) -> LabProcess:
                argv = [py, "-m", "jvpn_trio", "up", "--config", str(directory / f"c{i}.toml"), "--no-tui", "--quiet"]
                return await s.start(s.client_ns(i), argv, name=f"c{i}")

            # 1. The first laptop, then the second with the same key.
            first = await up(1)
            first_session = await wait_attached(directory, 1, first)
            second = await up(2)
            second_session = await wait_attached(directory, 2, second)
            replaced = await wait_replaced(directory, 1, first)
            await until(lambda: terminated(events(directory / "gateway-events.jsonl")), gateway)

            # 2. Quiet for longer than the agent ever waits between handshakes.
            await trio.sleep(quiet_s)
            held = await client_status(directory, 1)
            kept = await client_status(directory, 2)
            gateway_status = await jvpn(s, "status")
            logs = {i: events(directory / f"c{i}-events.jsonl") for i in LAPTOPS}
            gateway_log = events(directory / "gateway-events.jsonl")

            # 3. A person takes the session back on the first laptop: the second is now the one held.
            reply = await query_control(directory / "c1.sock", {"cmd": "reconnect"}, timeout=STATUS_TIMEOUT_S)
            taken_back = await wait_attached(directory, 1, first, not_session=first_session)
            second_replaced = await wait_replaced(directory, 2, second)
            final_gateway = await jvpn(s, "status")
            final_logs = {i: events(directory / f"c{i}-events.jsonl") for i in LAPTOPS}
            errors = {name: (directory / f"{name}.err").read_text() for name in ("gateway", "c1", "c2")}

    # The older laptop was told, with the reason, and its status says what happened.
    (first_end,) = terminated(logs[1])
    assert (first_end.session, first_end.reason, first_end.detail("peer_reason")) == (
        first_session, ReasonCode.PEER_CLOSE, "SESSION_REPLACED",
    )  # fmt: skip
    assert (replaced["state"], replaced["session"]) == ("REPLACED", None), replaced
    assert replaced["held_because"] == "replaced by another client with the same key", replaced
    # The gateway ended it as replaced, not as closed by its peer.
    assert [(e.session, e.reason) for e in terminated(gateway_log)] == [(first_session, ReasonCode.SESSION_REPLACED)]
    # No flapping: the first laptop stayed held with one session, the second kept its session.
    assert (held["state"], held["sessions_started"]) == ("REPLACED", 1), held
    assert (kept["state"], kept["session"]) == ("ATTACHED", second_session), kept
    assert terminated(logs[2]) == [], logs[2]
    assert [str(x["session"]) for x in gateway_status["sessions"]] == [second_session], gateway_status
    # The reconnect took it back: the second laptop heard the same reason and holds in turn.
    assert reply["held"] is False, reply
    (second_end,) = terminated(final_logs[2])
    assert (second_end.session, second_end.detail("peer_reason")) == (second_session, "SESSION_REPLACED")
    assert second_replaced["state"] == "REPLACED", second_replaced
    assert [str(x["session"]) for x in final_gateway["sessions"]] == [taken_back], final_gateway
    for name, text in errors.items():
        assert "Traceback" not in text, (name, text)
